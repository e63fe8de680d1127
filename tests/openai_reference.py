"""OpenAI's own tokenizer (tiktoken) and Harmony renderer (openai_harmony), as references for
test_o200k.py and test_harmony_openai.py, on the o200k_base vocabulary that bpe-openai ships.

Both libraries would download the vocabulary; here they read it from a temporary folder that
holds the file under the two names they look for, so nothing is downloaded: openai_harmony
reads `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken`, tiktoken its cache,
`$TIKTOKEN_CACHE_DIR/<sha1 of the download URL>` (and checks the file's sha256 there).
"""

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from gptoss_jax.o200k import o200k_base_tiktoken
from gptoss_jax.tokenizer import Tokenizer, o200k_harmony_tokenizer

O200K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


@pytest.fixture(scope="session")
def openai_vocabulary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder with o200k_base.tiktoken, and the environment pointing both libraries at it."""
    folder = tmp_path_factory.mktemp("o200k_base")
    data = o200k_base_tiktoken()
    (folder / "o200k_base.tiktoken").write_bytes(data)
    (folder / hashlib.sha1(O200K_BASE_URL.encode()).hexdigest()).write_bytes(data)
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("TIKTOKEN_ENCODINGS_BASE", str(folder))
        environment.setenv("TIKTOKEN_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiktoken_o200k_harmony(openai_vocabulary_folder: Path):
    """tiktoken's o200k_harmony encoding."""
    import tiktoken

    return tiktoken.get_encoding("o200k_harmony")


@pytest.fixture(scope="session")
def openai_harmony_encoding(openai_vocabulary_folder: Path):
    """openai_harmony's gpt-oss encoding (HarmonyEncodingName.HARMONY_GPT_OSS)."""
    import openai_harmony

    return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture(scope="session")
def o200k_harmony() -> Tokenizer:
    """This project's o200k_harmony, built from the same file (once per test run, ~4 s)."""
    return o200k_harmony_tokenizer()
