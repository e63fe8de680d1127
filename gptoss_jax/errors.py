"""The one base class of every error the project raises on bad input.

A caller catches :class:`GptOssError` alone: the CLI prints its message as one line, and the
server answers it with HTTP 400. It derives from ``ValueError`` so that code written against the
older, separate classes (each a ``ValueError``) keeps working.
"""

from __future__ import annotations


class GptOssError(ValueError):
    """Input gpt-oss-jax cannot work with: the message says what is wrong and, where known, where."""
