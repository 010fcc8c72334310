"""What every child process of the engine does first (intake workers, delivery processes)."""
from __future__ import annotations

import os
import signal
import sys


def die_with_parent() -> None:
    """Linux: get SIGTERM when the engine dies (even by SIGKILL), so no child outlives it (an
    intake worker would keep the SMTP port, a delivery process its connections)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the engine died before prctl took effect
        sys.exit(0)
