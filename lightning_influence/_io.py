"""Atomic file writes: the one write-then-rename used by the score store, the retraining cache and the report store.

A reader never sees a half-written file: the bytes go to a unique temporary sibling (created with the process umask),
are flushed and fsynced, then :func:`os.replace` moves them over the target; on any error the temporary file is removed
and the error propagates, so the target keeps its previous content (or stays absent).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "temporary_sibling"]


def temporary_sibling(path: Path) -> Path:
    """A unique hidden sibling of ``path`` for write-then-rename.

    Returns:
        ``<dir>/.<name>.<pid>.<random>.tmp``.

    Example::

        >>> p = temporary_sibling(Path("/data/scores.npy"))
        >>> p.parent.as_posix(), p.name.startswith(".scores.npy."), p.suffix
        ('/data', True, '.tmp')
    """
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def atomic_write(path: Path, write: Callable[[IO[Any]], object], *, binary: bool = True) -> None:
    """Write ``path`` through ``write(file)`` atomically (temporary sibling, fsync, :func:`os.replace`).

    Args:
        path: The target file (its directory must exist).
        write: Writes the content to the open file it is given.
        binary: Open the file in ``"xb"`` (default) or ``"x"`` text mode (UTF-8).

    Example::

        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "note.txt"
        >>> atomic_write(target, lambda f: f.write("done"), binary=False)
        >>> target.read_text(), [p.name for p in target.parent.iterdir()]
        ('done', ['note.txt'])
    """
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "xb") if binary else open(tmp, "x", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
