"""Has a file the engine rereads (bounce_categories.toml, shaping.toml) changed since last time?

`file_stamp(path)` is what two looks compare: modification time, size and inode (an editor's
save-by-rename changes the inode even within one mtime tick); None when the file is missing; an
("error", why) pair when it cannot be looked at, so a file that turns unreadable counts as a
change and its reader says why.
"""
from __future__ import annotations

import os
from pathlib import Path


def file_stamp(path: Path | str) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return ("error", str(e))
    return (st.st_mtime_ns, st.st_size, st.st_ino)
