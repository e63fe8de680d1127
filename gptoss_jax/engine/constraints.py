"""Steering a request's tokens on the host: a grammar's token masks and the reasoning budget.

A request with a constraint (``json_schema``, ``regex`` or ``grammar``) or a
``thinking_token_budget`` gets a :class:`RowSteering`. Before each of its steps the engine asks
it for the allowed tokens, as a bitmask row (``uint32 [vocab / 32]``, bit ``t % 32`` of word
``t // 32`` is token t), and the device applies it to the row's logits before sampling; after
the step the engine hands it the token.

A mask depends on the tokens before it, so a steered row's next mask is computed after each of
its tokens: the decode burst calls the host back at the start of every step (``io_callback``),
which hands the steerings the last step's tokens and returns this step's masks, so the rows
beside it keep their multi-step bursts at the cost of a host round trip per step. Where the grammar is free
text there is not even that: in an analysis message of a Harmony reply grammar (one that begins
with :data:`FREE_PRELUDE`) the mask stays the same until ``<|end|>``, so the row runs multi-step
bursts under that one mask, pausing at ``<|end|>``. An engine spread over several processes
would be called back on the first process only, whose steerings alone would follow, so there
the whole batch runs one-step bursts while a row is steered outside free text.

The grammar engine is llguidance (the ``structured`` extra): it computes a mask at o200k's
201,088 tokens in well under a millisecond, covers JSON Schema with ``$ref``, ``anyOf``,
patterns and bounds, refuses what it does not implement at compile time (so a request fails
when it is submitted, never mid-stream), and needs no torch.

The reasoning budget counts the tokens written before the final channel opens. When the count
reaches the budget, the row is forced, one singleton mask per step, through whatever ends the
open message and opens the final one (``<|end|><|start|>assistant<|channel|>final<|message|>``
from inside a message). Forced tokens are generated tokens: they count toward ``max_tokens``.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from gptoss_jax.engine.programs import RowMasks
from gptoss_jax.engine.requests import RequestError, SamplingParams
from gptoss_jax.harmony.grammar import FREE_PRELUDE, AnswerGrammar, reply_grammar
from gptoss_jax.harmony.parser import HarmonyTokenIds, StreamParser, StreamState
from gptoss_jax.tokenizer import Tokenizer

if TYPE_CHECKING:
    import llguidance

MASK_BITS = 32


def mask_words(vocab_size: int) -> int:
    """uint32 words per row of a token bitmask."""
    return -(-vocab_size // MASK_BITS)


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise RequestError("structured output (json_schema, regex, grammar) needs llguidance: "
                           "pip install 'gptoss-jax[structured]'") from None
    return llguidance


class _GrammarTokenizer:
    """The tokenizer's vocabulary as llguidance's ``TokenizerWrapper`` reads it (bytes per id)."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[int]):
        self._tokenizer = tokenizer
        self.eos_token_id = stops[0]
        self.bos_token_id = None
        self.tokens = [tokenizer.decode_bytes([token]) for token in range(tokenizer.vocab_size)]
        self.special_token_ids = list(tokenizer.special_tokens.values())

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)


_GRAMMAR_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def grammar_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of ``tokenizer`` (built once per tokenizer: about a second for o200k)."""
    built = _GRAMMAR_TOKENIZERS.get(tokenizer)
    if built is None:
        llguidance = _llguidance()
        ids = HarmonyTokenIds.of(tokenizer)
        wrapper = llguidance.TokenizerWrapper(_GrammarTokenizer(tokenizer, [ids.return_, ids.call]))
        built = llguidance.LLTokenizer(wrapper, eos_token=[ids.return_, ids.call])
        _GRAMMAR_TOKENIZERS[tokenizer] = built
    return built


def prepare(tokenizer: Tokenizer) -> bool:
    """Build llguidance's view of ``tokenizer`` now, when the ``structured`` extra is installed, so
    that the first constrained request does not wait for it; returns whether it is installed."""
    try:
        grammar_tokenizer(tokenizer)
    except RequestError:
        return False
    return True


def grammar_of(params: SamplingParams) -> str | None:
    """The Lark grammar a request's settings ask for (None: unconstrained)."""
    answer = AnswerGrammar(params.json_schema, params.regex, params.grammar)
    if answer == AnswerGrammar():
        return None
    return reply_grammar(answer) if params.harmony_frame else f"start: {answer.body()}\n"


def compile_grammar(tokenizer: Tokenizer, grammar: str, field: str = "grammar") -> llguidance.LLMatcher:
    """A fresh matcher of ``grammar``, or a :class:`RequestError` naming ``field`` and the problem."""
    llguidance = _llguidance()
    lltokenizer = grammar_tokenizer(tokenizer)
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_lark(grammar), lltokenizer)
    if failed:
        raise RequestError(f"{field}: {messages[0]}")
    matcher = llguidance.LLMatcher(lltokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    if matcher.is_error():
        raise RequestError(f"{field}: {matcher.get_error()}")
    return matcher


@functools.cache
def _bit_table() -> np.ndarray:
    return (np.uint32(1) << np.arange(MASK_BITS, dtype=np.uint32)).astype(np.uint32)


def set_only(mask: np.ndarray, tokens: Sequence[int]) -> None:
    """Fill a bitmask row (``uint32 [words]``) so that it allows ``tokens`` only."""
    mask[:] = 0
    for token in tokens:
        mask[token // MASK_BITS] |= _bit_table()[token % MASK_BITS]


class RowSteering:
    """One request's grammar matcher and reasoning budget; the engine's thread alone uses it.

    Args:
      tokenizer: the model's tokenizer (Harmony's control tokens and the forced text).
      matcher: llguidance's matcher of the reply's grammar, or None.
      thinking_token_budget: tokens the reply may write before its final channel opens (None: no
        cap); the prompt must end with ``<|start|>assistant``, as Harmony prompts do.
      free_prelude: the grammar begins with :data:`FREE_PRELUDE`, so its analysis messages are
        free text (see :attr:`pause_token`).
    """

    def __init__(self, tokenizer: Tokenizer, matcher: llguidance.LLMatcher | None,
                 thinking_token_budget: int | None, *, free_prelude: bool = False):
        self._matcher = matcher
        self._budget = thinking_token_budget
        self._free_prelude = free_prelude and matcher is not None
        tracks_harmony = thinking_token_budget is not None or self._free_prelude
        self._harmony = StreamParser(tokenizer, strict=False) if tracks_harmony else None
        self._written = 0  # tokens before the final channel opened
        # The matcher as a free-text message's content began (see accept).
        self._free_content_start: llguidance.LLMatcher | None = None
        self._forcing: list[int] = []
        ids = HarmonyTokenIds.of(tokenizer)
        self._stops = [ids.return_, ids.call]
        self._end = ids.end
        open_final = tokenizer.encode("<|channel|>final<|message|>", allowed_special="all")
        start = tokenizer.encode("<|start|>assistant", allowed_special="all")
        self._closings = {
            "content": [ids.end, *start, *open_final],
            "between": [*start, *open_final],
            "header": open_final,
            "channel": tokenizer.encode("final<|message|>", allowed_special="all"),
            "unfinished header": [ids.message, ids.end, *start, *open_final],
        }

    @property
    def needs_mask(self) -> bool:
        """Whether the next token is steered (by a grammar, or forced)."""
        return self._matcher is not None or bool(self._forcing) or self._budget_reached()

    @property
    def pause_token(self) -> int | None:
        """While the row writes a free-text message of its grammar: the token (``<|end|>``) until
        which its mask stays the same, so it may run a multi-step burst that pauses there; else None."""
        harmony = self._harmony
        free = (self._free_prelude and not self._forcing and not self._budget_reached()
                and harmony.state is StreamState.CONTENT and harmony.current_channel in ("analysis", "commentary")
                and harmony.current_recipient is None)
        return self._end if free else None

    @property
    def free_steps(self) -> int | None:
        """Tokens the row may make unsteered before the budget bites (None: any number)."""
        if self._budget is None or self._final_open():
            return None
        return max(self._budget - self._written, 0)

    def fill_mask(self, mask: np.ndarray) -> None:
        """Write the allowed next tokens into ``mask`` (``uint32 [words]``)."""
        if not self._forcing and self._budget_reached():
            self._forcing = self._closing()
        if self._forcing:
            set_only(mask, self._forcing[:1])
        elif self._matcher is None:
            mask[:] = np.uint32(0xFFFFFFFF)
        elif self._matcher.is_stopped() or self._matcher.is_error():
            # The grammar is complete (or, never expected, broken): the reply can only end.
            set_only(mask, self._stops)
        else:
            self._matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)

    def accept(self, token: int) -> None:
        """The row's next token (sampled under the last mask, or not steered at all)."""
        in_free_text = self.pause_token is not None
        if self._forcing:
            self._forcing.pop(0)
        if self._matcher is not None and not self._matcher.is_stopped():
            if in_free_text and self._matcher.validate_tokens([token]) == 0:
                # The grammar's text rule matches characters, so a byte token that leaves a UTF-8
                # sequence unfinished, followed by one that does not finish it (<|end|> included),
                # breaks the matcher, though the burst's mask (fixed until <|end|>) allowed both.
                # The message is free text and nothing after it depends on it: go on as from the
                # content's start.
                self._matcher = self._free_content_start.deep_copy()
            if not in_free_text or self._matcher.validate_tokens([token]) == 1:
                self._matcher.consume_token(token)
        if self._harmony is not None and not self._final_open():
            if self._budget is not None:
                self._written += 1
            self._harmony.process(token)
        if not in_free_text and self.pause_token is not None:
            self._free_content_start = self._matcher.deep_copy()

    def _final_open(self) -> bool:
        harmony = self._harmony
        return harmony is not None and harmony.state is StreamState.CONTENT and harmony.current_channel == "final"

    def _budget_reached(self) -> bool:
        return self._budget is not None and not self._final_open() and self._written >= self._budget \
            and not self._forcing

    def _closing(self) -> list[int]:
        """The tokens that end what is open and open the final channel, or [] to wait a token.

        The row waits while a tool call's message is open (its arguments are not reasoning),
        and, under a grammar, while the grammar refuses the closing (mid-way through a header).
        """
        harmony = self._harmony
        if harmony.state is StreamState.CONTENT:
            if harmony.current_recipient is not None:
                return []
            candidates = [self._closings["content"]]
        elif harmony.state is StreamState.EXPECT_START:
            candidates = [self._closings["between"]]
        elif not harmony.header_text:
            candidates = [self._closings["header"]]
        elif self._matcher is not None:
            candidates = [self._closings["channel"], self._closings["unfinished header"]]
        elif harmony.header_text.strip() == "<|channel|>":
            candidates = [self._closings["channel"]]
        else:
            candidates = [self._closings["unfinished header"]]
        for tokens in candidates:
            if self._matcher is None or self._matcher.validate_tokens(tokens) == len(tokens):
                return list(tokens)
        return []


def steering_for(params: SamplingParams, tokenizer: Tokenizer | None) -> RowSteering | None:
    """The steering of a request (None when it has no constraint and no budget).

    Raises:
      RequestError: the constraint does not compile (the message names the setting), or the
        engine has no tokenizer to steer with.
    """
    grammar = grammar_of(params)
    if grammar is None and params.thinking_token_budget is None:
        return None
    if tokenizer is None:
        raise RequestError("json_schema, regex, grammar and thinking_token_budget need the engine's tokenizer: "
                           "create the Engine with tokenizer=...")
    field = "json_schema" if params.json_schema is not None else "regex" if params.regex is not None else "grammar"
    matcher = compile_grammar(tokenizer, grammar, field) if grammar is not None else None
    return RowSteering(tokenizer, matcher, params.thinking_token_budget,
                       free_prelude=grammar is not None and grammar.startswith(FREE_PRELUDE))


def step_masks(steerings: Sequence[RowSteering | None], vocab_size: int,
               rows: Sequence[int] | None = None) -> RowMasks | None:
    """The next step's masks of a batch whose rows have these steerings.

    Args:
      rows: the rows to give a mask (None: those steered now; then None is returned if there are
        none). Their count is padded to a power of two, so a few programs serve every count.
    """
    if rows is None:
        rows = [row for row, steering in enumerate(steerings) if steering is not None and steering.needs_mask]
        if not rows:
            return None
    count = 1 << max(len(rows) - 1, 0).bit_length()
    masked = np.full(count, len(steerings), np.int32)
    masked[:len(rows)] = rows
    bits = np.full((count, mask_words(vocab_size)), 0xFFFFFFFF, np.uint32)
    for mask, row in zip(bits, rows):
        if steerings[row] is not None and steerings[row].needs_mask:
            steerings[row].fill_mask(mask)
    return RowMasks(masked, bits)


def burst_steps(steerings: Sequence[RowSteering | None], steps: int) -> int:
    """How many steps the next decode burst may run under one set of masks: 1 while a row is
    steered outside free text (its next mask depends on its last token), else up to the nearest
    reasoning budget. Fewer than ``steps``: the engine steers the burst token by token instead,
    where it can (see :func:`gptoss_jax.engine.programs.decode_burst`)."""
    live = [steering for steering in steerings if steering is not None]
    if any(steering.needs_mask and steering.pause_token is None for steering in live):
        return 1
    budgets = [steering.free_steps for steering in live if steering.free_steps is not None]
    return max(1, min([steps, *budgets]))


def pause_tokens(steerings: Sequence[RowSteering | None]) -> np.ndarray:
    """int32 ``[rows]``: each row's :attr:`RowSteering.pause_token`, -1 where it has none."""
    return np.array([-1 if steering is None or steering.pause_token is None else steering.pause_token
                     for steering in steerings], np.int32)
