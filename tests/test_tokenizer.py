"""Tests for gptoss_jax.tokenizer: the Tokenizer wrapper and the demo tokenizer built on the spot."""

import functools
import json
import tempfile

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from gptoss_jax.tokenizer import (
    HARMONY_SPECIAL_TOKEN_IDS,
    O200K_HARMONY_VOCAB_SIZE,
    TOKENIZER_FILENAME,
    Tokenizer,
    TokenizerError,
    UnknownSpecialTokenError,
    build_demo_tokenizer,
    checkpoint_tokenizer_file,
)

DEMO_VOCAB_SIZE = 1024


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return build_demo_tokenizer(DEMO_VOCAB_SIZE)


HF_LAST_TOKEN_ID = 200018


@functools.cache
def hugging_face_like_tokenizer() -> Tokenizer:
    """The demo tokenizer at o200k_harmony's ids, cut where gpt-oss's Hugging Face tokenizer.json
    ends: its added tokens stop at `<|endofprompt|>` (200018), the reserved ids above are absent.
    (Also used by test_harmony.py.)"""
    with tempfile.TemporaryDirectory() as folder:
        saved = json.loads(build_demo_tokenizer(O200K_HARMONY_VOCAB_SIZE).save(folder).read_text())
    saved["added_tokens"] = [token for token in saved["added_tokens"] if token["id"] <= HF_LAST_TOKEN_ID]
    backend = BackendTokenizer.from_str(json.dumps(saved))
    assert backend.get_vocab_size(with_added_tokens=True) == HF_LAST_TOKEN_ID + 1
    return Tokenizer(backend)


def test_demo_tokenizer_puts_the_harmony_block_at_the_top_of_a_small_vocab(tokenizer):
    assert tokenizer.vocab_size == DEMO_VOCAB_SIZE
    first = DEMO_VOCAB_SIZE - len(HARMONY_SPECIAL_TOKEN_IDS)
    for name, real_id in HARMONY_SPECIAL_TOKEN_IDS.items():
        assert tokenizer.special_token_id(name) == first + real_id - 199998
    assert tokenizer.special_token_id("<|call|>") == DEMO_VOCAB_SIZE - 1
    assert dict(tokenizer.special_tokens) == {
        name: first + real_id - 199998 for name, real_id in HARMONY_SPECIAL_TOKEN_IDS.items()
    }


def test_demo_tokenizer_at_o200k_harmony_size_uses_the_real_ids():
    tokenizer = build_demo_tokenizer(O200K_HARMONY_VOCAB_SIZE)
    assert tokenizer.vocab_size == 201088
    expected = {
        "<|startoftext|>": 199998,
        "<|endoftext|>": 199999,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|call|>": 200012,
        "<|reserved_200013|>": 200013,
        "<|endofprompt|>": 200018,
        "<|reserved_201087|>": 201087,
    }
    for name, token_id in expected.items():
        assert tokenizer.special_token_id(name) == token_id
    assert len(tokenizer.special_tokens) == 201088 - 199998
    text = "Hello world"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_demo_tokenizer_is_deterministic(tmp_path):
    first = build_demo_tokenizer(512).save(tmp_path / "a")
    second = build_demo_tokenizer(512).save(tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()


def test_demo_tokenizer_learned_merges(tokenizer):
    # A trained BPE, not bytes only: common words of its text are single tokens.
    assert len(tokenizer.encode(" language")) == 1
    assert len(tokenizer.encode("123")) == 1


def test_demo_tokenizer_rejects_a_vocab_without_room():
    with pytest.raises(ValueError, match="too small"):
        build_demo_tokenizer(256)


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "  leading spaces\nand\ttabs\n\n", "naïve café, Привет, 你好, 😊👋🏾", ""],
)
def test_encode_decode_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_token_text_is_ordinary_text_unless_allowed(tokenizer):
    start = tokenizer.special_token_id("<|start|>")
    text = "<|start|>user<|message|>hi<|end|>"
    ordinary = tokenizer.encode(text)
    assert start not in ordinary
    assert tokenizer.decode(ordinary) == text

    all_special = tokenizer.encode(text, allowed_special="all")
    assert all_special[0] == start
    assert tokenizer.special_token_id("<|message|>") in all_special
    assert all_special[-1] == tokenizer.special_token_id("<|end|>")
    assert tokenizer.decode(all_special) == text

    only_start = tokenizer.encode(text, allowed_special={"<|start|>"})
    assert only_start[0] == start
    assert tokenizer.special_token_id("<|end|>") not in only_start
    assert tokenizer.decode(only_start) == text


def test_the_longest_special_token_wins_where_names_overlap():
    backend = BackendTokenizer(models.BPE({char: i for i, char in enumerate(pre_tokenizers.ByteLevel.alphabet())}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<x>", special=True), AddedToken("<x>>", special=True)])
    tokenizer = Tokenizer(backend)
    assert tokenizer.encode("<x>><x>", allowed_special="all") == [257, 256]


def test_encode_adds_no_bos(tokenizer):
    ids = tokenizer.encode("Hi", allowed_special="all")
    assert tokenizer.special_token_id("<|startoftext|>") not in ids
    assert tokenizer.decode(ids) == "Hi"


def test_decode_bytes_keeps_partial_utf8(tokenizer):
    ids = tokenizer.encode("😊")
    assert len(ids) > 1  # the demo vocabulary has no emoji token
    pieces = [tokenizer.decode_bytes([token_id]) for token_id in ids]
    assert b"".join(pieces) == "😊".encode()
    assert tokenizer.decode(ids[:1]) == "\ufffd"


def test_decode_rejects_an_id_outside_the_vocabulary(tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([DEMO_VOCAB_SIZE])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([-1])


def test_reserved_ids_missing_from_hugging_faces_file_are_special_tokens():
    # The model has 201088 rows and may sample any id; HF's tokenizer.json stops at 200018.
    tokenizer = hugging_face_like_tokenizer()
    assert tokenizer.vocab_size == O200K_HARMONY_VOCAB_SIZE
    assert tokenizer.decode([HF_LAST_TOKEN_ID]) == "<|endofprompt|>"
    assert tokenizer.decode([200019, 200500, 201087]) == "<|reserved_200019|><|reserved_200500|><|reserved_201087|>"
    assert tokenizer.decode_bytes([200500]) == b"<|reserved_200500|>"
    assert tokenizer.special_token_id("<|reserved_201087|>") == 201087
    assert dict(tokenizer.special_tokens) == dict(build_demo_tokenizer(O200K_HARMONY_VOCAB_SIZE).special_tokens)
    assert tokenizer.encode("a<|reserved_200500|>", allowed_special="all")[-1] == 200500
    assert 200500 not in tokenizer.encode("a<|reserved_200500|>")
    for outside in (-1, O200K_HARMONY_VOCAB_SIZE):
        with pytest.raises(ValueError, match=f"token id {outside} is outside the vocabulary \\(size 201088\\)"):
            tokenizer.decode([outside])


def test_only_o200k_harmony_gets_the_reserved_ids(tokenizer):
    assert tokenizer.vocab_size == DEMO_VOCAB_SIZE
    assert len(tokenizer.special_tokens) == len(HARMONY_SPECIAL_TOKEN_IDS)


def test_unknown_special_token_name_is_a_clear_key_error(tokenizer):
    with pytest.raises(KeyError) as error:
        tokenizer.special_token_id("<|stop|>")
    assert isinstance(error.value, UnknownSpecialTokenError)
    assert "unknown special token '<|stop|>'" in str(error.value)
    assert "<|return|>" in str(error.value)
    with pytest.raises(UnknownSpecialTokenError, match="return"):
        tokenizer.special_token_id("return")
    with pytest.raises(UnknownSpecialTokenError, match="<|bogus|>"):
        tokenizer.encode("x", allowed_special={"<|bogus|>"})


def test_save_and_load_from_a_checkpoint_folder(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "checkpoint")
    assert path == tmp_path / "checkpoint" / TOKENIZER_FILENAME
    loaded = Tokenizer.from_pretrained_dir(tmp_path / "checkpoint")
    assert loaded.vocab_size == tokenizer.vocab_size
    assert dict(loaded.special_tokens) == dict(tokenizer.special_tokens)
    text = "<|start|>assistant<|channel|>final<|message|>The answer is 4.<|return|>"
    assert loaded.encode(text, allowed_special="all") == tokenizer.encode(text, allowed_special="all")
    assert Tokenizer.from_file(path).encode("abc") == tokenizer.encode("abc")


def test_saved_file_reads_special_tokens_the_hugging_face_way(tokenizer, tmp_path):
    # Plain `tokenizers` (as transformers uses it) must see the special tokens as added tokens.
    backend = BackendTokenizer.from_file(str(tokenizer.save(tmp_path)))
    assert backend.encode("<|start|>", add_special_tokens=False).ids == [tokenizer.special_token_id("<|start|>")]
    assert backend.decode(tokenizer.encode("Hello world")) == "Hello world"


def test_original_folder_falls_back_to_the_tokenizer_in_its_parent(tokenizer, tmp_path, monkeypatch):
    # Hugging Face's gpt-oss repositories keep tokenizer.json at the root and none in original/.
    tokenizer.save(tmp_path)
    (tmp_path / "original").mkdir()
    assert checkpoint_tokenizer_file(tmp_path / "original") == tmp_path / TOKENIZER_FILENAME
    assert Tokenizer.from_pretrained_dir(tmp_path / "original").vocab_size == tokenizer.vocab_size
    monkeypatch.chdir(tmp_path / "original")
    assert checkpoint_tokenizer_file(".") == (tmp_path / TOKENIZER_FILENAME).absolute()


def test_own_tokenizer_wins_over_the_parents(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    build_demo_tokenizer(512).save(tmp_path / "original")
    assert Tokenizer.from_pretrained_dir(tmp_path / "original").vocab_size == 512


def test_only_an_original_folder_looks_in_its_parent(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    (tmp_path / "converted").mkdir()
    assert checkpoint_tokenizer_file(tmp_path / "converted") is None
    with pytest.raises(FileNotFoundError) as error:
        Tokenizer.from_pretrained_dir(tmp_path / "converted")
    assert str(error.value).startswith(
        f"no tokenizer.json for checkpoint folder {tmp_path / 'converted'} "
        f"(looked for {tmp_path / 'converted' / TOKENIZER_FILENAME}); "
    )


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "original").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        Tokenizer.from_pretrained_dir(tmp_path / "original")
    message = str(error.value)
    assert f"looked for {tmp_path / 'original' / TOKENIZER_FILENAME} and {tmp_path / TOKENIZER_FILENAME}" in message
    assert "for an original/ folder in its parent" in message
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        Tokenizer.from_file(tmp_path / "missing.json")


def test_rejects_a_tokenizer_that_is_not_byte_level():
    backend = BackendTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="only byte-level BPE"):
        Tokenizer(backend)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 27868174\n",
         "is a Git LFS pointer, not the file itself: run `git lfs pull`"),
        ("{}", f"not a valid {TOKENIZER_FILENAME} (Model missing"),
        ("not json", f"not a valid {TOKENIZER_FILENAME} (expected"),
    ],
    ids=["git-lfs-pointer", "empty-object", "not-json"],
)
def test_unreadable_tokenizer_json_is_a_clear_error_naming_the_file(text, complaint, tmp_path):
    (tmp_path / TOKENIZER_FILENAME).write_text(text)
    with pytest.raises(TokenizerError) as error:
        Tokenizer.from_pretrained_dir(tmp_path)
    assert str(error.value).startswith(str(tmp_path / TOKENIZER_FILENAME))
    assert complaint in str(error.value)


def test_a_tokenizer_json_that_is_not_byte_level_is_named(tmp_path):
    backend = BackendTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.save(str(tmp_path / TOKENIZER_FILENAME))
    with pytest.raises(TokenizerError, match=f"^{tmp_path / TOKENIZER_FILENAME}: only byte-level BPE"):
        Tokenizer.from_pretrained_dir(tmp_path)
