"""Tests for gptoss_jax.o200k and o200k_harmony_tokenizer: gpt-oss's tokenizer built from the
o200k_base vocabulary that bpe-openai ships, against tiktoken's o200k_harmony and transformers'
conversion; and the fallback to it for a checkpoint folder without tokenizer.json.

The tokenizer is built once per test run (about 4 s); nothing is downloaded.
"""

import json
import random
import warnings
from pathlib import Path

import pytest

from gptoss_jax import o200k
from gptoss_jax.o200k import (
    HARMONY_SPECIAL_TOKEN_IDS,
    O200K_HARMONY_VOCAB_SIZE,
    VocabularyError,
    bpe_vocab_and_merges,
    o200k_base_ranks,
)
from gptoss_jax.tokenizer import Tokenizer, TokenizerFallbackWarning, o200k_harmony_tokenizer
from harmony_cases import RENDER_FUNCTIONS_WITH_PARAMETERS
from openai_reference import o200k_harmony, openai_vocabulary_folder, tiktoken_o200k_harmony  # noqa: F401

REPOSITORY = Path(__file__).resolve().parents[1]

SAMPLE_TEXTS = [
    "",
    "Hello world",
    "Hello, World! HELLO world... hello_world helloWorld",
    "I'M here, you're there; they'LL go, we'd see, it's done",
    "  two spaces, then\ttab\t\tand\n\nnewlines\r\nCRLF\rCR   \n   \n\n\n",
    "                                        forty spaces",
    "trailing spaces    ",
    "\n",
    "12 123 1234 12345 123456789012 3.14159 -42 +7 1e10 0x1F 1_000_000 ٣٤٥ ½ ²",
    "Dates: 2025-06-28, 28/06/2025, 10:30:00Z; prices $1,299.99 €5 ¥1000",
    "日本語のテキストと中文文本，한국어 텍스트",
    "Привет, мир! Ünïcödé façade naïve résumé Ærøskøbing Straße",
    "مرحبا بالعالم — שלום עולם — नमस्ते दुनिया — สวัสดีชาวโลก — გამარჯობა",
    "Emoji: 👋🏾 😊 🇫🇷 👨‍👩‍👧‍👦 ❤️ 🧑🏽‍💻",
    "Combining: e\u0301 a\u0308 n\u0303; zero width: a\u200bb\u200dc; BOM \ufeff; NBSP a\u00a0b",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    'x = {"k": [1, 2, 3], "s": "a\\nb"}\nprint(f"{x!r:>10}")\n',
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 2; }  // C\n#include <stdio.h>",
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%o''brien%';",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "$$\\int_0^\\infty e^{-x^2}\\,dx = \\frac{\\sqrt{\\pi}}{2}$$",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" * 20,
    "!!!???...,,,;;;:::---___===+++***&&&^^^%%%$$$###@@@~~~```'''\"\"\"",
    "https://example.com/path/to/page?query=1&x=y#frag user@example.org",
    "\x00\x01\x7f control \x1b[31mred\x1b[0m",
    RENDER_FUNCTIONS_WITH_PARAMETERS,
]


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Strings of letters from several scripts, digits, punctuation and whitespace runs."""
    rng = random.Random(seed)
    alphabets = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r",
        "'.,;:!?-_()[]{}<>/\\\"@#$%^&*+=|~`",
        "éèêëàâäôöûüçñßÆØÅ",
        "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВ",
        "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年",
        "あいうえおかきくけこアイウエオカキクケコ",
        "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
        "😀😁😂🤣😃👍👋🏽🔥✨",
    ]
    texts = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randrange(1, 12)):
            alphabet = rng.choice(alphabets)
            pieces.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 9))))
        texts.append("".join(pieces))
    return texts


def sample() -> list[str]:
    files = [REPOSITORY / "README.md", REPOSITORY / "gptoss_jax" / "o200k.py", REPOSITORY / "tests" / "harmony_cases.py"]
    return SAMPLE_TEXTS + random_texts(300) + [path.read_text() for path in files]


def test_encodes_as_tiktoken_token_for_token(o200k_harmony, tiktoken_o200k_harmony):
    for text in sample():
        ids = o200k_harmony.encode(text)
        assert ids == tiktoken_o200k_harmony.encode_ordinary(text), text[:80]
        assert o200k_harmony.decode(ids) == text


def test_special_tokens_encode_and_decode_as_tiktoken(o200k_harmony, tiktoken_o200k_harmony):
    assert o200k_harmony.vocab_size == tiktoken_o200k_harmony.n_vocab == O200K_HARMONY_VOCAB_SIZE
    for name, token_id in HARMONY_SPECIAL_TOKEN_IDS.items():
        assert o200k_harmony.special_token_id(name) == token_id
        assert tiktoken_o200k_harmony.encode(name, allowed_special="all") == [token_id]
    text = (
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"location": "東京"}<|call|><|reserved_200500|><|return|>'
    )
    assert o200k_harmony.encode(text, allowed_special="all") == tiktoken_o200k_harmony.encode(text, allowed_special="all")
    # Without allowing them, special tokens' text is ordinary text in both.
    assert o200k_harmony.encode(text) == tiktoken_o200k_harmony.encode_ordinary(text)


def test_every_id_decodes_to_tiktokens_bytes(o200k_harmony, tiktoken_o200k_harmony):
    for token_id in range(O200K_HARMONY_VOCAB_SIZE):
        expected = tiktoken_o200k_harmony.decode_single_token_bytes(token_id)
        assert o200k_harmony.decode_bytes([token_id]) == expected, token_id


def test_vocabulary_and_merges_equal_transformers_conversion(openai_vocabulary_folder):
    # transformers' TikTokenConverter made gpt-oss's Hugging Face tokenizer.json.
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(openai_vocabulary_folder / "o200k_base.tiktoken"))
    expected_vocab, expected_merges = converter.extract_vocab_merges_from_model(converter.vocab_file)
    vocab, merges = bpe_vocab_and_merges(o200k_base_ranks())
    assert vocab == expected_vocab
    assert merges == expected_merges
    assert len(vocab) == 199998 and len(merges) == 446189


def test_the_tokenizer_is_built_once_per_process_like_hugging_faces(o200k_harmony, tmp_path):
    assert o200k_harmony_tokenizer() is o200k_harmony
    saved = json.loads(o200k_harmony.save(tmp_path).read_text())
    assert saved["model"]["ignore_merges"] is True
    assert [token["content"] for token in saved["added_tokens"]][-1] == "<|endofprompt|>"
    assert saved["added_tokens"][-1]["id"] == 200018  # where Hugging Face's tokenizer.json ends


def write_config(folder: Path, vocab_size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"vocab_size": vocab_size, "hidden_size": 2880}))
    return folder


def test_an_original_folder_copied_alone_gets_o200k_harmony(o200k_harmony, tmp_path):
    folder = write_config(tmp_path / "original", O200K_HARMONY_VOCAB_SIZE)
    with pytest.warns(TokenizerFallbackWarning) as caught:
        tokenizer = Tokenizer.from_pretrained_dir(folder)
    assert tokenizer is o200k_harmony
    (message,) = [str(warning.message) for warning in caught]
    assert message.startswith(f"no tokenizer.json for checkpoint folder {folder} (looked for ")
    assert "using gpt-oss's o200k_harmony tokenizer, built from OpenAI's o200k_base vocabulary in bpe-openai 0.1.4 (" in message
    assert message.endswith("bpe_openai/data/o200k_base.tiktoken.gz)")


def test_a_folder_for_another_vocabulary_gets_no_fallback(tmp_path):
    folder = write_config(tmp_path / "original", 2048)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FileNotFoundError, match="no tokenizer.json for checkpoint folder"):
            Tokenizer.from_pretrained_dir(folder)


def test_without_bpe_openai_the_error_says_what_to_install(tmp_path, monkeypatch):
    def not_installed(name):
        raise o200k.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(o200k.importlib.metadata, "distribution", not_installed)
    folder = write_config(tmp_path / "original", O200K_HARMONY_VOCAB_SIZE)
    with pytest.raises(FileNotFoundError) as error:
        Tokenizer.from_pretrained_dir(folder)
    assert "as gpt-oss's Hugging Face repositories do (OpenAI's o200k_base vocabulary comes from the bpe-openai " in str(error.value)
    assert str(error.value).endswith("which is not installed: pip install 'gptoss-jax[o200k]')")
    with pytest.raises(VocabularyError, match="not installed"):
        o200k_base_ranks()


def test_a_vocabulary_file_that_is_not_tiktokens_is_refused(monkeypatch):
    monkeypatch.setattr(o200k, "O200K_BASE_SHA256", "0" * 64)
    with pytest.raises(VocabularyError, match=r"has sha256 446a9538\w+, not tiktoken's 0000"):
        o200k_base_ranks()

