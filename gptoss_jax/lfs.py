"""Git LFS pointer files: what a weight or tokenizer file is when its repository was cloned
without Git LFS fetching it (a clone of a Hugging Face repository without ``git lfs``, say).

Git then checks out a small text file (``version https://git-lfs.github.com/spec/v1``, the
object's hash and size) in place of the file, which every reader takes for a corrupt file.
"""

from __future__ import annotations

import os

_POINTER_START = b"version https://git-lfs"


def is_git_lfs_pointer(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` is a Git LFS pointer instead of the file it stands for."""
    try:
        with open(path, "rb") as file:
            return file.read(len(_POINTER_START)) == _POINTER_START
    except OSError:
        return False


def git_lfs_pointer_message(path: str | os.PathLike) -> str:
    """The error message for a Git LFS pointer found at ``path``."""
    return (
        f"{path} is a Git LFS pointer, not the file itself: run `git lfs pull` in its repository "
        "(or download the file)"
    )
