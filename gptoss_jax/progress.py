"""A one-line terminal progress bar: tensors done and bytes, redrawn in place on stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 30
_REDRAW_SECONDS = 0.1


def _gigabytes(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f} GB"


class ProgressBar:
    """Counts tensors and bytes; draws only when ``enabled`` and the stream is a terminal.

    Use as a context manager: leaving it ends the line, so an error message that follows
    starts on a line of its own.
    """

    def __init__(self, label: str, total_tensors: int, total_bytes: int, *, enabled: bool,
                 stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.label = label
        self.total_tensors = total_tensors
        self.total_bytes = total_bytes
        self.tensors = 0
        self.bytes = 0
        self._last_draw = -float("inf")

    def __enter__(self) -> ProgressBar:
        self._draw()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()

    def advance(self, num_bytes: int) -> None:
        """Record one more tensor of ``num_bytes``."""
        self.tensors += 1
        self.bytes += num_bytes
        self._draw(force=self.tensors == self.total_tensors)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last_draw < _REDRAW_SECONDS):
            return
        self._last_draw = now
        fraction = self.bytes / self.total_bytes if self.total_bytes else 1.0
        filled = round(fraction * _WIDTH)
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (_WIDTH - filled)}] {self.tensors}/{self.total_tensors} "
            f"tensors, {_gigabytes(self.bytes)}/{_gigabytes(self.total_bytes)}"
        )
        self.stream.flush()
