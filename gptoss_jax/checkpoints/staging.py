"""Writing a checkpoint folder atomically: into a hidden sibling, renamed into place when whole.

Any error, Ctrl-C included, removes the sibling (and the parent folders made for it), so the
destination either does not exist or holds a whole checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def check_new_destination(dst: str | os.PathLike) -> Path:
    """``dst`` as an absolute path, checked not to exist (a checkpoint is never written over)."""
    destination = Path(dst).absolute()
    if destination.exists() or destination.is_symlink():
        raise FileExistsError(f"{dst} already exists; choose a new destination folder")
    return destination


@contextlib.contextmanager
def staged_folder(dst: str | os.PathLike, purpose: str) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``dst`` to write into; rename it to ``dst`` on success.

    Args:
      dst: the folder to create; it must not exist. Missing parent folders are made, as
        ``mkdir -p`` would, and removed again if writing fails.
      purpose: a word for the hidden folder's name (``.DST.<purpose>-<random>``).

    Raises:
      FileExistsError: ``dst`` exists, before or (made by someone else) after writing.
    """
    destination = check_new_destination(dst)
    staging = destination.parent / f".{destination.name}.{purpose}-{uuid.uuid4().hex[:8]}"
    made_parents: list[Path] = []
    try:
        for folder in reversed(destination.parents):
            if not folder.exists():
                folder.mkdir()
                made_parents.append(folder)
        staging.mkdir()
        yield staging
        if destination.exists():
            raise FileExistsError(f"{destination} appeared while writing it; what was written was discarded")
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(made_parents):
            with contextlib.suppress(OSError):  # something else was put there meanwhile
                folder.rmdir()
        raise
