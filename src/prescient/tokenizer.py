"""Tokenizers for the live stack: a real Hugging Face one, or a file-free approximation.

The gateway counts prompt tokens (and hashes them for cache-aware scheduling) and the
simulated engine's server turns text into token ids and sampled ids back into text. Both need
the same tokenizer as the engine behind them, so both load it the same way: `load_tokenizer`
with a directory holding `tokenizer.json` (the `tokenizers` library, no `transformers`) and,
optionally, a chat template (`chat_template.jinja` or `tokenizer_config.json`'s
"chat_template"). Without a directory, `ApproxTokenizer` gives deterministic ids and roughly
English-sized counts, so the stack runs with no model files at all.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RawTokenizer

from prescient.errors import ConfigError

ROLE_FALLBACK_DOC = "'<role>: <content>\\n' per message, then 'assistant:'"


class Tokenizer(Protocol):
    """What the gateway and the simulated engine need from a tokenizer."""

    name: str

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens=False` for an already templated chat."""
        ...

    def count(self, text: str, *, add_special_tokens: bool = True) -> int:
        """`len(encode(text))`, without building the ids where that is cheaper."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        ...

    def apply_chat_template(self, messages: list[dict[str, str]], *,
                            add_generation_prompt: bool = True,
                            continue_final_message: bool = False) -> str:
        """The prompt text for `messages` ({"role", "content"}), ending with the assistant
        turn's opening (`add_generation_prompt`), or, with `continue_final_message` (vLLM's
        parameter), with the last message left open so generation continues its text."""
        ...


def fallback_chat_prompt(messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
                         continue_final_message: bool = False) -> str:
    """The template used when a model has none: one "role: content" line per message, then
    "assistant:".

    A continued final message is written "role:content", open: the generation prompt
    "assistant:" followed by the text generated after it, so a stream resumed from its text so
    far (the gateway's replay) has exactly the original prompt plus that text as its prompt.
    """
    if continue_final_message and messages:
        *head, last = messages
        opened = f"{last.get('role', 'user')}:{last.get('content', '')}"
        return fallback_chat_prompt(head, add_generation_prompt=False) + opened
    lines = [f"{m.get('role', 'user')}: {m.get('content', '')}\n" for m in messages]
    return "".join(lines) + ("assistant:" if add_generation_prompt else "")


# ---- the file-free approximation -----------------------------------------------------------

# Common English words, in a fixed order: the first ids of ApproxTokenizer's vocabulary (each
# also with a leading space), so that sampled ids decode to real words. Changing this list
# changes every id: append only.
_WORD_TEXT = (
    "the of and to a in is it you that he was for on are with as I his they be at one have "
    "this from or had by not word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come did "
    "number sound no most people my over know water than call first who may down side been now "
    "find any new work part take get place made live where after back little only round man "
    "year came show every good me give our under name very through just form sentence great "
    "think say help low line differ turn cause much mean before move right boy old too same "
    "tell does set three want air well also play small end put home read hand port large spell "
    "add even land here must big high such follow act why ask men change went light kind off "
    "need house picture try us again animal point mother world near build self earth father "
    "head stand own page should country found answer school grow study still learn plant cover "
    "food sun four between state keep eye never last let thought city tree cross farm hard "
    "start might story saw far sea draw left late run while press close night real life few "
    "north open seem together next white children begin got walk example ease paper group "
    "always music those both mark often letter until mile river car feet care second book "
    "carry took science eat room friend began idea fish mountain stop once base hear horse "
    "cut sure watch color face wood main enough plain girl usual young ready above ever red "
    "list though feel talk bird soon body dog family direct pose leave song measure door "
    "product black short numeral class wind question happen complete ship area half rock "
    "order fire south problem piece told knew pass since top whole king space heard best hour "
    "better true during hundred five remember step early hold west ground interest reach fast "
    "verb sing listen six table travel less morning ten simple several vowel toward war lay "
    "against pattern slow center love person money serve appear road map rain rule govern "
    "pull cold notice voice unit power town fine certain fly fall lead cry dark machine note "
    "wait plan figure star box noun field rest correct able pound done beauty drive stood "
    "contain front teach week final gave green oh quick develop ocean warm free minute strong "
    "special mind behind clear tail produce fact street inch multiply nothing course stay "
    "wheel full force blue object decide surface deep moon island foot system busy test "
    "record boat common gold possible plane stead dry wonder laugh thousand ago ran check game "
    "shape equate hot miss brought heat snow tire bring yes distant fill east paint language "
    "among model server request token cache prefix queue batch latency engine scheduler"
)
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())
_PUNCTUATION = (".", ",", "!", "?", ";", ":", "'", '"', "(", ")", "-", "/")
_WHITESPACE = (" ", "  ", "\n", "\n\n", "\t")
_SPECIAL = ("<unk>", "<s>", "</s>")


class ApproxTokenizer:
    """A deterministic stand-in for a real tokenizer, needing no files.

    Text is cut by the regex ``' ?[A-Za-z]+| ?[0-9]| ?[^\\sA-Za-z0-9]|\\s+'`` (a word, digit
    or symbol with its leading space, or a whitespace run); a piece outside the vocabulary and
    longer than 8 characters is cut into 6-character parts, so an English text gives about one
    token per 4 to 5 characters, as real BPE tokenizers do. Ids: 0-2 are ``<unk> <s> </s>``;
    then the built-in word list `WORDS` (each word bare, capitalised, and both with a leading
    space), digits, common punctuation and whitespace runs: `vocab_start_hashed` (about 2,100)
    ids in all.
    Any other piece maps to ``vocab_start_hashed + crc32(piece) % (32000 -
    vocab_start_hashed)``, stable across processes (unlike Python's salted `hash`).

    `decode` round-trips ids of known pieces exactly; a hashed id cannot be inverted and
    decodes as the placeholder ``" <id>"`` (a word-like text, so output stays readable).
    Sampled output drawn from `known_ids()` always decodes to real words. No BOS is added.
    """

    VOCAB_SIZE = 32000
    _SPLIT = re.compile(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\s+")

    def __init__(self) -> None:
        self.name = "approx"
        pieces = [*_SPECIAL]
        for w in (*WORDS, *(w.capitalize() for w in WORDS), *_PUNCTUATION, *"0123456789"):
            pieces += [w, " " + w]
        pieces += _WHITESPACE
        self._pieces = tuple(dict.fromkeys(pieces))  # keep the first of any duplicate
        self._ids = {p: i for i, p in enumerate(self._pieces)}
        self.vocab_start_hashed = len(self._pieces)

    @property
    def vocab_size(self) -> int:
        return self.VOCAB_SIZE

    def known_ids(self) -> tuple[int, ...]:
        """Ids that decode to a real word (with its leading space)."""
        return tuple(self._ids[" " + w] for w in WORDS)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        out: list[int] = []
        known = self._ids
        for piece in self._SPLIT.findall(text):
            if piece in known:
                out.append(known[piece])
            else:
                out.extend(self._id(part) for part in self._cut(piece))
        return out

    def count(self, text: str, *, add_special_tokens: bool = True) -> int:
        # `len(encode(text))`: a piece is one token, but an unknown one over 8 characters its
        # 6-character parts (`_cut`); a plain loop, as the gateway counts every prompt
        known = self._ids
        n = 0
        for piece in self._SPLIT.findall(text):
            if len(piece) <= 8 or piece in known:
                n += 1
            else:
                n += -(-len(piece) // 6)
        return n

    def decode(self, ids: Sequence[int]) -> str:
        pieces, n = self._pieces, len(self._pieces)
        return "".join(pieces[i] if 3 <= i < n else f" <{i}>" if i >= n else "" for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]], *,
                            add_generation_prompt: bool = True,
                            continue_final_message: bool = False) -> str:
        return fallback_chat_prompt(messages, add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message)

    @staticmethod
    def _cut(piece: str) -> list[str]:
        if len(piece) <= 8:
            return [piece]
        return [piece[i:i + 6] for i in range(0, len(piece), 6)]

    def _id(self, piece: str) -> int:
        known = self._ids.get(piece)
        if known is not None:
            return known
        span = self.VOCAB_SIZE - self.vocab_start_hashed
        return self.vocab_start_hashed + zlib.crc32(piece.encode()) % span


# ---- Hugging Face tokenizers ----------------------------------------------------------------


class HfTokenizer:
    """A `tokenizers` tokenizer from a model directory, with its Jinja chat template.

    The template is rendered as `transformers` does: a sandboxed Jinja environment with
    `trim_blocks`, `lstrip_blocks` and loop controls, given `messages`,
    `add_generation_prompt=True`, `bos_token`, `eos_token` and `raise_exception`. Without a
    template, `fallback_chat_prompt` is used.
    """

    def __init__(self, directory: Path) -> None:
        self.name = directory.name
        try:
            self._tok = RawTokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the library raises a bare Exception on bad files
            raise ConfigError(f"tokenizer {directory}: cannot load tokenizer.json: {e}") from e
        config = _read_json(directory / "tokenizer_config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self._template: Any = None
        self.chat_template = _chat_template(directory, config)

    @property
    def chat_template(self) -> str | None:
        """The Jinja source; setting it compiles it (ConfigError if it does not compile)."""
        return self._template_source

    @chat_template.setter
    def chat_template(self, source: str | None) -> None:
        self._template = None if source is None else _compile(source, self.name)
        self._template_source = source

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def count(self, text: str, *, add_special_tokens: bool = True) -> int:
        return len(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def known_ids(self) -> tuple[int, ...]:
        """Ids of common English words as this tokenizer splits them (for sampled output)."""
        ids = self.encode(" " + " ".join(WORDS), add_special_tokens=False)
        specials = {self._tok.token_to_id(t) for t in (self.bos_token, self.eos_token) if t}
        keep = [i for i in dict.fromkeys(ids) if i not in specials and self.decode([i]).strip()]
        if not keep:  # a vocabulary with none of the words: any ids that decode to text
            keep = [i for i in range(min(self.vocab_size, 4096)) if self.decode([i]).strip()]
        return tuple(keep)

    def apply_chat_template(self, messages: list[dict[str, str]], *,
                            add_generation_prompt: bool = True,
                            continue_final_message: bool = False) -> str:
        if self._template is None:
            return fallback_chat_prompt(messages, add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message)
        try:
            text = str(self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or ""))
        except (_TemplateError, TemplateError) as e:  # bad messages for this template
            raise ValueError(f"chat template of {self.name}: {e}") from e
        return _open_final_message(text, messages) if continue_final_message else text


def _open_final_message(text: str, messages: list[dict[str, str]]) -> str:
    """`text` cut right after the last message's content (what `transformers` does for
    `continue_final_message`): the template's end-of-turn tokens after it are dropped."""
    content = messages[-1].get("content", "") if messages else ""
    at = text.rfind(content) if content else -1
    if at < 0:
        raise ValueError("continue_final_message: the final message's content is not in the "
                         "rendered chat template")
    return text[:at + len(content)]


class _TemplateError(Exception):
    """`raise_exception(...)` called from a chat template."""


def _raise_exception(message: str) -> None:
    raise _TemplateError(message)


def _compile(source: str, name: str) -> Any:

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ConfigError(f"tokenizer {name}: chat template does not compile: {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer config {path}: not readable JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_text(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """`chat_template.jinja` (newer transformers), else the config's "chat_template" (a string,
    or a list of named templates of which "default" is taken)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_tokenizer(path: str | None) -> ApproxTokenizer | HfTokenizer:
    """The tokenizer in directory `path` (or of `path`, a tokenizer.json file); None or "" gives
    `ApproxTokenizer`.

    Raises:
        ConfigError: `path` does not exist or holds no loadable tokenizer.json.
    """
    if not path:
        return ApproxTokenizer()
    p = Path(path).expanduser()
    directory = p.parent if p.is_file() and p.name == "tokenizer.json" else p
    if not (directory / "tokenizer.json").is_file():
        raise ConfigError(f"tokenizer {path}: no such directory or no tokenizer.json in it")
    return HfTokenizer(directory)
