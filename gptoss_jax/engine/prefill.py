"""Batched prefill: one call runs the next chunk of several waiting prompts, within a token budget.

The rows of a call share one static shape ``[rows, width]``: ``width`` is the smallest power of
two (at least 16) that holds the longest chunk taken, ``rows`` the smallest power of two times the
mesh's ``data`` axis that holds the chunks. Chunks are taken oldest prompt first while
``rows * width`` stays within the budget (the oldest is always taken), so a call costs at most
about one budget of tokens and the running streams wait about that long for their next burst.
A call's rows are all first chunks (attention within the chunk: the prefill kernel) or all
later ones (attention over the cache as well).
"""

from __future__ import annotations

import dataclasses

import numpy as np

MIN_CHUNK = 16


def power_of_two_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class Chunk:
    """The next piece of one slot's prompt: positions ``[start, end)``."""

    slot: int
    prompt: np.ndarray
    start: int
    end: int
    first: bool  # the slot's cache holds nothing of this prompt yet


@dataclasses.dataclass(frozen=True)
class PrefillCall:
    """One prefill call's chunks and its arrays (rows past the chunks are padding: slot ``pad_slot``)."""

    chunks: list[Chunk]
    first: bool
    slots: np.ndarray  # int32 [rows]
    tokens: np.ndarray  # int32 [rows, width]
    positions: np.ndarray  # int32 [rows, width], -1 past a chunk's end
    last_index: np.ndarray  # int32 [rows]: the chunk's last token, whose logits the call returns


def plan_call(waiting: list[Chunk], budget: int, data_shards: int, max_rows: int, pad_slot: int) -> PrefillCall:
    """The call for the oldest chunks of ``waiting`` (oldest first) of the oldest's kind, within ``budget`` tokens."""
    first = waiting[0].first
    taken: list[Chunk] = []
    for chunk in waiting:
        if chunk.first != first:
            continue
        trial = [*taken, chunk]
        if taken and _rows(len(trial), data_shards, max_rows) * _width(trial) > budget:
            break
        taken = trial
    rows, width = _rows(len(taken), data_shards, max_rows), _width(taken)
    slots = np.full(rows, pad_slot, np.int32)
    tokens = np.zeros((rows, width), np.int32)
    positions = np.full((rows, width), -1, np.int32)
    last_index = np.zeros(rows, np.int32)
    for row, chunk in enumerate(taken):
        length = chunk.end - chunk.start
        slots[row] = chunk.slot
        tokens[row, :length] = chunk.prompt[chunk.start:chunk.end]
        positions[row, :length] = np.arange(chunk.start, chunk.end)
        last_index[row] = length - 1
    return PrefillCall(taken, first, slots, tokens, positions, last_index)


def _rows(count: int, data_shards: int, max_rows: int) -> int:
    return min(max_rows, data_shards * power_of_two_at_least(-(-count // data_shards), 1))


def _width(chunks: list[Chunk]) -> int:
    return power_of_two_at_least(max(chunk.end - chunk.start for chunk in chunks), MIN_CHUNK)
