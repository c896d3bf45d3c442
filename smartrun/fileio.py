"""One way to write a file so that no reader ever sees half of it: a temp file beside it, then os.replace."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | Path, text: str, *, make_parents: bool = False) -> None:
    """Write `text` to `path` atomically; OSError (temp file removed) when it cannot be written.

    `make_parents` is for files under our own data dirs; a path the user typed keeps its missing
    directory an error, so a typo does not create directories.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
