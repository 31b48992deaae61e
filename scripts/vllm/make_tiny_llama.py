"""Make a tiny random-weight Llama and its BPE tokenizer, offline, for tests on vLLM CPU.

Run with the vLLM venv's Python (it has torch, transformers and tokenizers):
`python make_tiny_llama.py OUT_DIR`. Deterministic (fixed seeds); ~5 s. The model's text is
gibberish: tests use `ignore_eos` and token-id prompts for exact lengths.
"""

import os
import random
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = tuple(" ".join([
    "the a cat dog runs jumps over under server request token cache prefix model queue batch",
    "latency fast slow red blue green one two three hello world user assistant system please",
    "answer question why how what when where and or not is are was were be to of in on"]).split())
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + "
                 "message['content'] + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def corpus(n: int, rng: random.Random) -> list[str]:
    def word() -> str:
        return rng.choice(WORDS) + (str(rng.randint(0, 999)) if rng.random() < 0.2 else "")
    return [" ".join(word() for _ in range(rng.randint(3, 20))) + rng.choice([".", "?", "!", ""])
            for _ in range(n)]


def main(out: str) -> None:
    rng = random.Random(0)
    torch.manual_seed(0)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(20000, rng), trainer=trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>", pad_token="<pad>", model_max_length=4096)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=4096, bos_token_id=hf_tok.bos_token_id,
                      eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/tiny-llama")
