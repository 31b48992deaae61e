"""`prescient.tokenizer`: a real tiny HF tokenizer built here, and the approximation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from prescient.errors import ConfigError
from prescient.tokenizer import (
    WORDS,
    ApproxTokenizer,
    HfTokenizer,
    fallback_chat_prompt,
    load_tokenizer,
)

CORPUS = [
    "the cat runs over the dog",
    "a server answers the request fast",
    "why is the queue slow today",
    "hello world the model is a cache",
] * 20
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def word_level(directory: Path, *, template: str | None = TEMPLATE) -> Path:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(
        special_tokens=["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    config: dict[str, object] = {"bos_token": {"content": "<s>", "special": True},
                                 "eos_token": "</s>"}
    if template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def byte_bpe(directory: Path) -> Path:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "chat_template.jinja").write_text(TEMPLATE)  # newer transformers' layout
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    return directory


def test_hf_tokenizer_encodes_decodes_and_adds_bos(tmp_path: Path) -> None:
    tok = load_tokenizer(str(word_level(tmp_path / "wl")))
    assert isinstance(tok, HfTokenizer) and tok.name == "wl"
    ids = tok.encode("the cat runs")
    assert ids[0] == 1  # <s> from the post-processor
    assert len(ids) == 4
    assert tok.encode("the cat runs", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == "the cat runs"  # special tokens skipped


def test_hf_chat_template_is_rendered_with_generation_prompt_and_bos(tmp_path: Path) -> None:
    tok = load_tokenizer(str(word_level(tmp_path / "wl")))
    text = tok.apply_chat_template([{"role": "user", "content": "why is the queue slow"}])
    assert text == "<s><|user|>\nwhy is the queue slow\n<|assistant|>\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(1) == 1  # the template's BOS only


def test_chat_template_file_wins_and_tokenizer_json_path_is_accepted(tmp_path: Path) -> None:
    directory = byte_bpe(tmp_path / "bpe")
    tok = load_tokenizer(str(directory / "tokenizer.json"))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).startswith(
        "<s><|user|>\nhi\n")
    text = "hello world the model"
    assert tok.decode(tok.encode(text)) == text


def test_no_template_falls_back_to_role_lines(tmp_path: Path) -> None:
    tok = load_tokenizer(str(word_level(tmp_path / "wl", template=None)))
    messages = [{"role": "system", "content": "be fast"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "system: be fast\nuser: hi\nassistant:"
    assert fallback_chat_prompt(messages) == tok.apply_chat_template(messages)


def test_template_raise_exception_becomes_value_error(tmp_path: Path) -> None:
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                "{% endif %}")
    tok = load_tokenizer(str(word_level(tmp_path / "wl", template=template)))
    with pytest.raises(ValueError, match="user first"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_sandbox_refuses_unsafe_template_access(tmp_path: Path) -> None:
    template = "{{ messages.__class__.__mro__ }}"
    tok = load_tokenizer(str(word_level(tmp_path / "wl", template=template)))
    with pytest.raises(ValueError, match=r"unsafe|not safely|access"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_known_ids_decode_to_words(tmp_path: Path) -> None:
    tok = load_tokenizer(str(word_level(tmp_path / "wl")))
    known = tok.known_ids()
    assert known and all(tok.decode([i]).strip() for i in known)
    assert 0 not in known and 1 not in known  # neither <unk> nor <s>


def test_missing_paths_raise_config_error_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty"):
        load_tokenizer(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="broken"):
        load_tokenizer(str(broken))


# ---- the approximation -------------------------------------------------------------------


def test_none_or_empty_gives_the_approximation() -> None:
    assert isinstance(load_tokenizer(None), ApproxTokenizer)
    assert isinstance(load_tokenizer(""), ApproxTokenizer)


def test_approx_round_trips_known_text_and_counts_about_four_chars_a_token() -> None:
    tok = ApproxTokenizer()
    text = ("The model will answer the question, and then the server must find the next "
            "request in the queue. Why is it slow? Every batch must wait for 10 more step.")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 3.0 <= len(text) / len(ids) <= 6.0
    long_text = "internationalization " * 50
    assert 3.0 <= len(long_text) / len(tok.encode(long_text)) <= 8.0


def test_approx_ids_are_stable_across_processes() -> None:
    text = "Zyxwv quixotic tokens, unknown to the word list: 42!"
    here = ApproxTokenizer().encode(text)
    code = ("from prescient.tokenizer import ApproxTokenizer;"
            f"print(ApproxTokenizer().encode({text!r}))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert str(here) == there.strip()
    assert all(0 <= i < ApproxTokenizer.VOCAB_SIZE for i in here)


def test_approx_unknown_pieces_decode_as_placeholders_and_known_ids_as_words() -> None:
    tok = ApproxTokenizer()
    (unknown,) = tok.encode(" Zyxwv")
    assert unknown >= tok.vocab_start_hashed
    assert tok.decode([unknown]) == f" <{unknown}>"
    words = set(WORDS)
    assert all(tok.decode([i]).strip() in words for i in tok.known_ids())
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"


def test_a_template_set_later_replaces_the_file_one_and_must_compile(tmp_path: Path) -> None:
    tok = load_tokenizer(str(word_level(tmp_path / "wl")))
    assert isinstance(tok, HfTokenizer)
    tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"
    with pytest.raises(ConfigError, match="does not compile"):
        tok.chat_template = "{% for m in messages %}"
    with pytest.raises(ConfigError, match="does not compile"):
        load_tokenizer(str(word_level(tmp_path / "bad", template="{% if %}")))


def test_a_continued_final_message_is_left_open(tmp_path: Path) -> None:
    """vLLM's continue_final_message: the prompt ends with the last message's text, so it is
    the generation prompt plus that text (what the gateway's stream replay relies on)."""
    tok = load_tokenizer(str(word_level(tmp_path / "wl")))
    asked = [{"role": "user", "content": "hi"}]
    continued = [*asked, {"role": "assistant", "content": "the cat"}]
    text = tok.apply_chat_template(continued, add_generation_prompt=False,
                                   continue_final_message=True)
    assert text == "<s><|user|>\nhi\n<|assistant|>\nthe cat"
    assert text == tok.apply_chat_template(asked) + "the cat"
    approx = ApproxTokenizer()
    assert approx.apply_chat_template(
        [*asked, {"role": "assistant", "content": " the"}], add_generation_prompt=False,
        continue_final_message=True) == approx.apply_chat_template(asked) + " the"
    assert fallback_chat_prompt(asked, add_generation_prompt=False) == "user: hi\n"


def test_approx_count_is_the_length_of_the_encoding() -> None:
    tok = ApproxTokenizer()
    texts = ["", "Write a short story about a robot learning to paint, in three sentences.",
             "internationalization " * 3, " Zyxwvutsrqponm  \n\n\t  tabs 1234567890 !?",
             "reconciliation considerations", "a" * 40 + " " + "b" * 9 + " " + "c" * 8,
             "     " * 4 + "x"]
    for text in texts:
        assert tok.count(text) == len(tok.encode(text)), text
