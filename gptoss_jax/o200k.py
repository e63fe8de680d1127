"""o200k_harmony, gpt-oss's encoding: its special-token ids, its split pattern, and its
tokenizer built from OpenAI's o200k_base vocabulary file.

o200k_harmony is o200k_base (OpenAI's 199,998-token byte-level BPE) with the Harmony special
tokens above it. gpt-oss's Hugging Face `tokenizer.json` was made from the vocabulary file by
transformers' `TikTokenConverter`; `build_o200k_harmony` makes the same file (vocabulary,
merges, pre-tokenizer, decoder, and the added tokens up to 200018), with the vocabulary read
from the `bpe-openai` package (the `o200k` extra), which ships it. Nothing is downloaded.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.metadata
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from gptoss_jax.errors import GptOssError

O200K_HARMONY_VOCAB_SIZE = 201088
"""Ids in o200k_harmony, and rows in gpt-oss's embedding table (spec section 4.1)."""

HARMONY_SPECIAL_TOKEN_IDS: Mapping[str, int] = MappingProxyType(
    {
        "<|startoftext|>": 199998,
        "<|endoftext|>": 199999,
        "<|reserved_200000|>": 200000,
        "<|reserved_200001|>": 200001,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|reserved_200004|>": 200004,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|reserved_200009|>": 200009,
        "<|reserved_200010|>": 200010,
        "<|reserved_200011|>": 200011,
        "<|call|>": 200012,
    }
)
"""The contiguous block of o200k_harmony special tokens that carries every named Harmony token
(spec section 4.1). Ids 200013..201087 above it are reserved."""

FIRST_RESERVED_ABOVE_BLOCK = 200013
HF_ENDOFPROMPT_ID = 200018
"""Hugging Face's tokenizer.json keeps o200k_base's name `<|endofprompt|>` for this reserved id,
and its added tokens end there (spec section 4.1)."""

O200K_SPLIT_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
"""o200k's pre-tokenization regex (tiktoken `openai_public.py`); the demo tokenizer uses it too so
that it splits text the way gpt-oss's tokenizer does."""

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
"""sha256 of `o200k_base.tiktoken`, as tiktoken checks it after a download."""

VOCABULARY_PACKAGE = "bpe-openai"
"""The PyPI package whose wheel ships `o200k_base.tiktoken.gz` (the `o200k` extra)."""

_VOCABULARY_PATH = "bpe_openai/data/o200k_base.tiktoken.gz"
_BYTE_LEVEL_SIZE = 256


class VocabularyError(GptOssError):
    """OpenAI's o200k_base vocabulary is not available, or not the expected file."""


def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: each byte value as the printable character that stands for it.

    Printable Latin-1 bytes stand for themselves; the others are shifted to code points from 256
    up, in byte order (GPT-2's `bytes_to_unicode`, which every byte-level BPE vocabulary uses).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    next_code_point = 256
    for b in range(_BYTE_LEVEL_SIZE):
        if b not in mapping:
            mapping[b] = chr(next_code_point)
            next_code_point += 1
    return mapping


def reserved_token_name(token_id: int) -> str:
    """The name o200k_harmony gives a reserved id: `<|reserved_200013|>`."""
    return f"<|reserved_{token_id}|>"


def special_token_names(last_id: int) -> list[str]:
    """o200k_harmony's special tokens from 199998 up to `last_id`, in id order, with 200018
    named `<|endofprompt|>` as in Hugging Face's tokenizer.json."""
    block = [name for name, token_id in HARMONY_SPECIAL_TOKEN_IDS.items() if token_id <= last_id]
    reserved = [
        "<|endofprompt|>" if token_id == HF_ENDOFPROMPT_ID else reserved_token_name(token_id)
        for token_id in range(FIRST_RESERVED_ABOVE_BLOCK, last_id + 1)
    ]
    return block + reserved


def _vocabulary_file() -> tuple[str, Path]:
    # Found through the package's metadata, not by importing it: its import loads a 74 MB
    # compiled tokenizer that this project does not use.
    try:
        distribution = importlib.metadata.distribution(VOCABULARY_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise VocabularyError(
            f"OpenAI's o200k_base vocabulary comes from the {VOCABULARY_PACKAGE} package, which is "
            f"not installed: pip install 'gptoss-jax[o200k]'"
        ) from None
    path = Path(distribution.locate_file(_VOCABULARY_PATH))
    return f"{VOCABULARY_PACKAGE} {distribution.version} ({path})", path


def vocabulary_source() -> str:
    """Where `o200k_base_ranks` reads the vocabulary: the package, its version and the file.

    Raises:
        VocabularyError: bpe-openai is not installed.
    """
    return _vocabulary_file()[0]


def o200k_base_tiktoken() -> bytes:
    """The file `o200k_base.tiktoken` (one `base64-token rank` line a token), from bpe-openai.

    Raises:
        VocabularyError: bpe-openai is not installed, or its file is missing or is not
            tiktoken's (sha256).
    """
    source, path = _vocabulary_file()
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as error:
        raise VocabularyError(f"cannot read the o200k_base vocabulary in {source}: {error}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise VocabularyError(
            f"the o200k_base vocabulary in {source} has sha256 {digest}, not tiktoken's "
            f"{O200K_BASE_SHA256}; install {VOCABULARY_PACKAGE}==0.1.4"
        )
    return data


def o200k_base_ranks() -> dict[bytes, int]:
    """OpenAI's o200k_base vocabulary, each token's bytes to its rank (= id), 0..199997.

    Raises:
        VocabularyError: see `o200k_base_tiktoken`.
    """
    ranks = {}
    for line in o200k_base_tiktoken().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bpe_vocab_and_merges(ranks: Mapping[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A tiktoken vocabulary as a byte-level BPE's vocabulary and merges (transformers'
    `TikTokenConverter.extract_vocab_merges_from_model`, which made gpt-oss's tokenizer.json).

    tiktoken merges, at each step, the adjacent pair whose joined bytes have the lowest rank. A
    merge list gives the same result when it holds every split of each token into two tokens,
    ordered by the joined token's rank (then by the parts' ranks), and the BPE looks up a whole
    pre-tokenized piece first (`ignore_merges`), as tiktoken does.
    """
    # Latin-1 reads each byte as the code point of its value, which the table then maps; the
    # text has one character per byte, so splitting it at i splits the token's bytes at i.
    to_unicode = byte_to_unicode()
    vocab = {}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        text = token.decode("latin-1").translate(to_unicode)
        vocab[text] = rank
        splits = []
        for i in range(1, len(token)):
            left = ranks.get(token[:i])
            right = ranks.get(token[i:]) if left is not None else None
            if right is not None:
                splits.append((left, right, i))
        merges += [(text[:i], text[i:]) for _, _, i in sorted(splits)]
    return vocab, merges


def o200k_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """o200k's split of text into pieces, then each piece's bytes as byte-level characters."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def build_o200k_harmony() -> BackendTokenizer:
    """gpt-oss's tokenizer.json, made from bpe-openai's o200k_base vocabulary (a few seconds).

    Raises:
        VocabularyError: bpe-openai is not installed, or its file is not tiktoken's.
    """
    vocab, merges = bpe_vocab_and_merges(o200k_base_ranks())
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = o200k_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    names = special_token_names(HF_ENDOFPROMPT_ID)
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names])
    return backend
