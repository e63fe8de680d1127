"""A text stream that says it is a terminal, for what behaves differently on one."""

from __future__ import annotations

import io


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True
