"""Replacing a small file whole: a reader, or the next start after a crash, sees the old
contents or the new, never a part (the settings file, kept counts and states)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, text: str, mode: int | None = None) -> None:
    """Write a temporary file beside `path`, sync it and rename it over `path`. `mode`: the
    file's permissions; by default the old file's, or 0644 for a new one. Raises OSError."""
    path = Path(path)
    if mode is None:
        mode = 0o644
        try:
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
