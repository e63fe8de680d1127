"""Tests for gptoss_jax.harmony's message types: bad input is refused with a clear error."""

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from gptoss_jax.harmony import (
    Conversation,
    DeveloperContent,
    HarmonyError,
    Message,
    StreamParser,
    SystemContent,
    ToolDescription,
    render_for_completion,
    stop_token_ids,
)
from gptoss_jax.tokenizer import Tokenizer, TokenizerError, build_demo_tokenizer
from harmony_cases import PYTHON_NAMESPACE

def test_invalid_reasoning_effort():
    with pytest.raises(HarmonyError, match="unknown reasoning effort 'extreme'; expected one of low, medium, high"):
        SystemContent(reasoning_effort="extreme")


def test_unknown_role():
    with pytest.raises(HarmonyError, match="unknown role 'robot'; expected one of system, developer, user, assistant, tool"):
        Message("robot", "beep")
    with pytest.raises(HarmonyError, match="unknown role 'robot'"):
        render_for_completion([Message("user", "hi")], next_role="robot")
    with pytest.raises(HarmonyError, match="unknown role 'robot'"):
        StreamParser(build_demo_tokenizer(300), role="robot")


def test_misplaced_or_incomplete_messages():
    with pytest.raises(HarmonyError, match="SystemContent belongs in a system message"):
        Message("user", SystemContent())
    with pytest.raises(HarmonyError, match="DeveloperContent belongs in a developer message"):
        Message("system", DeveloperContent(instructions="x"))
    with pytest.raises(HarmonyError, match="a tool message needs name="):
        Message("tool", "42")
    with pytest.raises(TypeError, match="message content must be a str"):
        Message("user", 42)
    with pytest.raises(TypeError, match="a conversation holds Message objects"):
        Conversation([SystemContent()])
    with pytest.raises(TypeError, match="parameters must be a JSON-schema object"):
        ToolDescription("f", "d", parameters="{}")
    with pytest.raises(HarmonyError, match="tool namespace names must be unique"):
        SystemContent(tools=[PYTHON_NAMESPACE, PYTHON_NAMESPACE])


def test_tokenizer_without_harmony_tokens_is_rejected():
    backend = BackendTokenizer(models.BPE({char: i for i, char in enumerate(pre_tokenizers.ByteLevel.alphabet())}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    plain = Tokenizer(backend)
    with pytest.raises(TokenizerError, match="lacks a Harmony special token"):
        stop_token_ids(plain)
    with pytest.raises(TokenizerError, match="lacks a Harmony special token"):
        StreamParser(plain)
