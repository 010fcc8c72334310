"""Which directory is the MailEngine home: the manual's rule, shared by every command."""
from __future__ import annotations

import os
from pathlib import Path


def resolve_home(cli_home: str | None) -> Path:
    """--home, else $MAILENGINE_HOME, else the current directory (as in the manual)."""
    return Path(cli_home or os.environ.get("MAILENGINE_HOME") or os.getcwd()).absolute()
