"""Fixtures shared by several test modules."""
from __future__ import annotations

import pytest

from mailengine.spool import Spool


@pytest.fixture
def sp(tmp_path):
    """A spool in a fresh mailq/ with its directories made; closed afterwards."""
    s = Spool(tmp_path / "mailq", hostname="mx.example")
    s.ensure_dirs()
    yield s
    s.close()
