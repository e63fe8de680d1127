"""The gpt-oss tokenizer: a byte-level BPE (o200k_harmony) with the Harmony special tokens.

`Tokenizer` wraps a `tokenizers.Tokenizer` loaded from a checkpoint's `tokenizer.json`.
`o200k_harmony_tokenizer` builds gpt-oss's own from the o200k_base vocabulary that bpe-openai
ships (`gptoss_jax.o200k`), for a checkpoint folder without one. `build_demo_tokenizer` makes a
small tokenizer of the same kind on the spot, trained on a built-in English text, for tests and
for the embedded demo model. Nothing is downloaded.

Special tokens are looked up by name (`special_token_id("<|return|>")`), never by a fixed
id, because the demo tokenizer places them differently from o200k_harmony (see
`build_demo_tokenizer`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Collection, Iterable, Mapping
from functools import cache, lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer

from gptoss_jax.errors import GptOssError
from gptoss_jax.lfs import git_lfs_pointer_message, is_git_lfs_pointer
from gptoss_jax.o200k import (
    HARMONY_SPECIAL_TOKEN_IDS,
    O200K_HARMONY_VOCAB_SIZE,
    VocabularyError,
    build_o200k_harmony,
    byte_to_unicode,
    o200k_pre_tokenizer,
    reserved_token_name,
    special_token_names,
    vocabulary_source,
)

TOKENIZER_FILENAME = "tokenizer.json"
ORIGINAL_DIRNAME = "original"
"""The folder of OpenAI's checkpoint inside gpt-oss's Hugging Face repositories, which keep
`tokenizer.json` one level up, at the repository root."""

AllowedSpecial = Literal["all"] | Collection[str]


class TokenizerError(GptOssError):
    """A tokenizer that cannot be used (an unreadable `tokenizer.json`, an unsupported kind), or
    input it cannot take (a token id outside its vocabulary)."""


class TokenizerFallbackWarning(UserWarning):
    """A checkpoint folder without `tokenizer.json` gets o200k_harmony built from bpe-openai."""


class UnknownSpecialTokenError(GptOssError, KeyError):
    """A special-token name that the tokenizer does not have."""

    def __str__(self) -> str:
        # KeyError's own __str__ shows the repr of its argument; show the sentence instead.
        return str(self.args[0])


_UNICODE_TO_BYTE = {char: byte for byte, char in byte_to_unicode().items()}


@lru_cache(maxsize=32)
def _special_token_regex(names: frozenset[str]) -> re.Pattern[str]:
    # Longest first so that a name that is a prefix of another never wins the alternation.
    alternatives = sorted(names, key=len, reverse=True)
    return re.compile("|".join(re.escape(name) for name in alternatives))


class Tokenizer:
    """A byte-level BPE tokenizer with named special tokens (o200k_harmony or the demo one).

    Wraps a `tokenizers.Tokenizer`. Special tokens are the added tokens marked special in
    `tokenizer.json`. For o200k_harmony (the Harmony special tokens at their o200k_harmony ids)
    they also include every reserved id up to 201087 that the file leaves out, as
    `<|reserved_ID|>`: Hugging Face's gpt-oss `tokenizer.json` ends at 200018, while the model
    can generate any of its 201088 ids.

    Decoding works on bytes (`decode_bytes`) so that a caller streaming tokens can join partial
    UTF-8 sequences itself; `decode` replaces invalid UTF-8 with U+FFFD.
    """

    def __init__(self, backend: BackendTokenizer) -> None:
        """Wrap `backend`, which must be a byte-level BPE; the wrapper takes it over.

        Raises:
            TokenizerError: the backend does not decode with the byte-level decoder.
        """
        if not isinstance(backend.decoder, decoders.ByteLevel):
            raise TokenizerError(
                "only byte-level BPE tokenizers (like gpt-oss's o200k_harmony) are supported; "
                f"this tokenizer's decoder is {type(backend.decoder).__name__}"
            )
        # `encode` finds the allowed special tokens itself; the backend must treat every other
        # occurrence of a special token's text as ordinary text.
        backend.encode_special_tokens = True
        self._backend = backend
        special_ids = {
            token.content: token_id
            for token_id, token in sorted(backend.get_added_tokens_decoder().items())
            if token.special
        }
        self._backend_vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._vocab_size = self._backend_vocab_size
        if _is_o200k_harmony(special_ids) and self._vocab_size < O200K_HARMONY_VOCAB_SIZE:
            # Hugging Face's tokenizer.json stops at id 200018, but the model has a row for every
            # o200k_harmony id and may sample any of them.
            self._vocab_size = O200K_HARMONY_VOCAB_SIZE
            special_ids.update(
                (reserved_token_name(token_id), token_id)
                for token_id in range(self._backend_vocab_size, O200K_HARMONY_VOCAB_SIZE)
            )
        self._special_ids = MappingProxyType(special_ids)
        self._token_bytes: list[bytes] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json` file.

        Raises:
            FileNotFoundError: there is no file at `path`.
            TokenizerError: the file is not a tokenizer this class supports (the message names
                it, and says so when it is a Git LFS pointer).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if is_git_lfs_pointer(path):
            raise TokenizerError(git_lfs_pointer_message(path))
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exception for any bad file
            raise TokenizerError(f"{path}: not a valid {TOKENIZER_FILENAME} ({e})") from e
        try:
            return cls(backend)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained_dir(cls, directory: str | Path) -> Tokenizer:
        """Load the `tokenizer.json` of a checkpoint folder (see `checkpoint_tokenizer_file`):
        the folder's own, or for an `original/` folder the one in its parent.

        Without one, a folder whose `config.json` has gpt-oss's vocabulary size (201088: an
        `original/` folder copied alone, say) gets `o200k_harmony_tokenizer()` when bpe-openai
        (the `o200k` extra) is installed, with a `TokenizerFallbackWarning` naming where the
        vocabulary comes from.

        Raises:
            FileNotFoundError: there is no such `tokenizer.json`, and no o200k_harmony to build.
            TokenizerError: it cannot be read (see `from_file`).
        """
        directory = Path(directory)
        path = checkpoint_tokenizer_file(directory)
        if path is not None:
            return cls.from_file(path)
        looked_for = " and ".join(map(str, _tokenizer_candidates(directory)))
        missing = f"no {TOKENIZER_FILENAME} for checkpoint folder {directory} (looked for {looked_for})"
        advice = (
            f"put the tokenizer beside the weights, or for an {ORIGINAL_DIRNAME}/ folder in its "
            "parent, as gpt-oss's Hugging Face repositories do"
        )
        if not _has_o200k_harmony_vocab_size(directory):
            raise FileNotFoundError(f"{missing}; {advice}")
        try:
            source = vocabulary_source()
        except VocabularyError as error:
            raise FileNotFoundError(f"{missing}; {advice} ({error})") from None
        warnings.warn(
            f"{missing}; using gpt-oss's o200k_harmony tokenizer, built from OpenAI's o200k_base "
            f"vocabulary in {source}",
            TokenizerFallbackWarning,
            stacklevel=2,
        )
        return o200k_harmony_tokenizer()

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` into `directory` (created if needed) and return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILENAME
        self._backend.save(str(path))
        return path

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (201088 for o200k_harmony)."""
        return self._vocab_size

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """Every special token, name to id, in id order (read-only), reserved ones included."""
        return self._special_ids

    def special_token_id(self, name: str) -> int:
        """The id of the special token `name`, e.g. `"<|return|>"`.

        Raises:
            UnknownSpecialTokenError: (a `KeyError`) the tokenizer has no special token `name`.
        """
        try:
            return self._special_ids[name]
        except KeyError:
            harmony_names = ", ".join(n for n in HARMONY_SPECIAL_TOKEN_IDS if "reserved" not in n)
            raise UnknownSpecialTokenError(
                f"unknown special token {name!r}; special tokens are written like "
                f"'<|return|>' (the Harmony ones: {harmony_names})"
            ) from None

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Token ids of `text`; no BOS is added.

        Args:
            text: the text to encode.
            allowed_special: names of the special tokens that become their single id where their
                text occurs, or `"all"`. Every other occurrence of a special token's text is
                encoded as ordinary text, so user-supplied text cannot inject a control token.

        Raises:
            UnknownSpecialTokenError: `allowed_special` names a token the tokenizer lacks.
        """
        if allowed_special == "all":
            allowed = frozenset(self._special_ids)
        else:
            allowed = frozenset(allowed_special)
            for name in allowed:
                self.special_token_id(name)
        if not allowed:
            return self._encode_ordinary(text)
        ids: list[int] = []
        position = 0
        for match in _special_token_regex(allowed).finditer(text):
            ids += self._encode_ordinary(text[position : match.start()])
            ids.append(self._special_ids[match.group()])
            position = match.end()
        ids += self._encode_ordinary(text[position:])
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        if not text:
            return []
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes that `ids` stand for; a special token gives its own text.

        Raises:
            TokenizerError: an id is outside the vocabulary (negative, or `vocab_size` or more).
        """
        table = self._bytes_by_id()
        pieces = []
        for token_id in ids:
            if not 0 <= token_id < len(table):
                raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {len(table)})")
            pieces.append(table[token_id])
        return b"".join(pieces)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens included; invalid UTF-8 becomes U+FFFD.

        Raises:
            TokenizerError: an id is outside the vocabulary.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _bytes_by_id(self) -> list[bytes]:
        # Built on first use: o200k_harmony has 201088 entries, and a caller that only encodes
        # should not pay for it.
        if self._token_bytes is None:
            table = [b""] * self._backend_vocab_size
            for token, token_id in self._backend.get_vocab(with_added_tokens=False).items():
                table[token_id] = bytes(_UNICODE_TO_BYTE[char] for char in token)
            for token_id, token in self._backend.get_added_tokens_decoder().items():
                table[token_id] = token.content.encode("utf-8")
            table += [
                reserved_token_name(token_id).encode("utf-8")
                for token_id in range(self._backend_vocab_size, self._vocab_size)
            ]
            self._token_bytes = table
        return self._token_bytes


def _is_o200k_harmony(special_ids: Mapping[str, int]) -> bool:
    """Whether the special tokens sit at o200k_harmony's ids, as in gpt-oss's tokenizer.json."""
    return all(special_ids.get(name) == token_id for name, token_id in HARMONY_SPECIAL_TOKEN_IDS.items())


@cache
def o200k_harmony_tokenizer() -> Tokenizer:
    """gpt-oss's tokenizer, o200k_harmony, built from the o200k_base vocabulary that bpe-openai
    ships (see `gptoss_jax.o200k`); once per process, in about 5 s, then shared.

    It equals gpt-oss's Hugging Face `tokenizer.json` and encodes as tiktoken's o200k_harmony.

    Raises:
        VocabularyError: bpe-openai (the `o200k` extra) is not installed, or its file differs.
    """
    return Tokenizer(build_o200k_harmony())


def _has_o200k_harmony_vocab_size(directory: Path) -> bool:
    """Whether `directory/config.json` gives gpt-oss's vocabulary size, so o200k_harmony fits.

    Both config.json dialects call it `vocab_size`; a config that cannot be read is left for the
    model loader to report.
    """
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("vocab_size") == O200K_HARMONY_VOCAB_SIZE


def checkpoint_tokenizer_file(directory: str | Path) -> Path | None:
    """The `tokenizer.json` that belongs to the checkpoint in `directory`, or None if there is none.

    The folder's own; failing that, for a folder named `original` (OpenAI's layout), the one in
    its parent folder: gpt-oss's Hugging Face repositories keep `tokenizer.json` at their root,
    beside `original/`, and none inside it.
    """
    return next((path for path in _tokenizer_candidates(Path(directory)) if path.is_file()), None)


def _tokenizer_candidates(directory: Path) -> list[Path]:
    """Where `checkpoint_tokenizer_file` looks, in order."""
    own = directory / TOKENIZER_FILENAME
    # absolute(): `Path(".")` inside original/ has an empty name and no parent to look in.
    if directory.absolute().name != ORIGINAL_DIRNAME:
        return [own]
    return [own, directory.absolute().parent / TOKENIZER_FILENAME]


def _demo_special_token_names(vocab_size: int) -> list[str]:
    """Special tokens of the demo tokenizer, in id order, ending at the top of the vocabulary."""
    if vocab_size != O200K_HARMONY_VOCAB_SIZE:
        return list(HARMONY_SPECIAL_TOKEN_IDS)
    return special_token_names(O200K_HARMONY_VOCAB_SIZE - 1)


def build_demo_tokenizer(vocab_size: int) -> Tokenizer:
    """Build a small byte-level BPE tokenizer with the Harmony special tokens; no download.

    The BPE merges are trained (deterministically, in milliseconds) on a built-in English text
    and the numbers 0..999, with o200k's pre-tokenization regex. Layout of the ids:

    - `vocab_size == 201088` (o200k_harmony's size): the special tokens sit at exactly their
      o200k_harmony ids, 199998..201087 (`<|return|>` = 200002, `<|call|>` = 200012, ...;
      200018 is `<|endofprompt|>` as in Hugging Face's tokenizer.json).
    - any other size (the compact placement): the 15-token block 199998..200012 of
      `HARMONY_SPECIAL_TOKEN_IDS` moves to the top of the vocabulary, keeping its order, so its
      first token `<|startoftext|>` has id `vocab_size - 15` and `<|call|>` has id
      `vocab_size - 1`.

    Below the special tokens: the 256 byte tokens, then the learned merges. When the built-in text
    yields fewer merges than there are slots, the remaining slots hold placeholder tokens
    `<|unused_ID|>` that encoding never produces (they decode to their own text).

    Raises:
        TokenizerError: `vocab_size` leaves no room for the 256 byte tokens and the special tokens.
    """
    special_names = _demo_special_token_names(vocab_size)
    regular_size = vocab_size - len(special_names)
    if regular_size < 256:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small: the demo tokenizer needs 256 byte tokens "
            f"and {len(special_names)} special tokens (at least {256 + len(special_names)})"
        )
    trainee = BackendTokenizer(models.BPE())
    trainee.pre_tokenizer = o200k_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=regular_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Every 1-3 digit number is a token in o200k; training on them all gives the demo the same
    # property and about a thousand more merges than the prose alone.
    numbers = " ".join(str(n) for n in range(1000))
    trainee.train_from_iterator([_DEMO_CORPUS, numbers], trainer=trainer)
    vocab = dict(trainee.get_vocab(with_added_tokens=False))
    merges = [tuple(pair) for pair in json.loads(trainee.to_str())["model"]["merges"]]
    for token_id in range(len(vocab), regular_size):
        vocab[f"<|unused_{token_id}|>"] = token_id

    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = trainee.pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in special_names])
    return Tokenizer(backend)


# The demo tokenizer's training text: original prose, plus the words that Harmony prompts repeat
# (roles, channels, the default system message) so that those become single tokens.
_DEMO_CORPUS = """\
You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: 2025-06-28

Reasoning: low
Reasoning: medium
Reasoning: high

# Valid channels: analysis, commentary, final. Channel must be included for every message.
Calls to these tools must go to the commentary channel: 'functions'.

# Instructions

Answer the user's questions clearly and briefly. Use a friendly tone.

# Tools

## functions

namespace functions {

// Gets the current weather in the provided location.
type get_current_weather = (_: {
// The city and state, e.g. San Francisco, CA
location: string,
format?: "celsius" | "fahrenheit", // default: celsius
}) => any;

} // namespace functions

system developer user assistant tool
analysis commentary final
to=functions.get_current_weather json {"location": "San Francisco", "temperature": 20, "sunny": true}

User asks: "What is the weather in Tokyo?" We need to use the weather tool.
The user wants a short answer. Let me think about the question step by step.
The answer is 4. Two plus two equals four. Nine divided by two is four and a half.

The morning was cold and clear. A thin layer of frost covered the grass in the park, and the
river moved slowly under the old stone bridge. People walked to work with their hands in their
pockets, talking about the weather, the news, and the small plans they had for the weekend.
A baker opened the door of his shop and the smell of fresh bread filled the street.

In the library, a student read about the history of numbers. The first people to count used
their fingers, then small stones, then marks cut into wood and bone. Later, merchants needed to
write down prices and debts, and so writing itself grew from the need to keep records. The idea
of zero came much later, and it changed mathematics for ever.

Computers store every number as a pattern of bits. A byte holds eight bits, which is enough for
two hundred and fifty six different values. Text is stored as a sequence of bytes, and a
tokenizer splits that text into pieces that a language model can read. Common words become a
single token, while rare words are built from several smaller pieces.

A language model predicts the next token from the tokens before it. It does this again and again,
one token at a time, until it reaches a stop token or a limit on the length of the answer. The
model does not see letters; it sees token ids, and each id has a vector of numbers that the
model learned during training. Attention lets each position look back at earlier positions, and
a mixture of experts sends each token to a few small networks chosen by a router.

Good questions are specific. Instead of asking "How is the weather?", ask "Will it rain in Paris
tomorrow afternoon?" The more context a question carries, the better the answer can be. When the
answer needs a calculation, it helps to write the steps down: first the numbers, then the
operation, then the result, and finally a check that the result makes sense.

The garden behind the house had apple trees, a few rows of beans, and a bench where the old
woman liked to sit in the evening. She watched the birds and the light changing on the hills.
Her grandchildren visited on Sundays; they played games, told stories, and helped her pick the
fruit when it was ripe. Every year she made jam and gave jars of it to the neighbours.

Travel teaches patience. Trains are late, roads are closed, and plans change. A traveller learns
to read maps, to ask for directions, and to enjoy the unexpected: a quiet village, a market full
of colour, a conversation with a stranger who becomes a friend for an afternoon.

Science moves forward by testing ideas against the world. A good experiment changes one thing at
a time and measures the effect carefully. Results are shared so that others can repeat them, and
a claim that cannot be repeated is treated with doubt until better evidence arrives.

Here is a simple list:
1. Read the question.
2. Think about what is being asked.
3. Write a clear answer.
4. Check the answer again.

def add(a, b):
    return a + b

print(add(2, 2))
"""
