"""Intake.on_message in process, on the test's own event loop."""
import asyncio
import os

import pytest

from mailengine.config import from_dict
from mailengine.intake import Intake
from mailengine.smtp.server import MessageReceived, Session, Transaction
from mailengine.spool import Spool


def test_failed_local_store_leaves_no_relayed_copy_behind(tmp_path):
    """Relayed + local recipients: when keeping the local copy fails, the client gets no 250
    and sends again, so the relayed copy stored just before must not stay in working/ (nothing
    would send it before the next start, then as a duplicate)."""
    async def main():
        cfg = from_dict(tmp_path, {"queue": {"save_incoming": True}})
        spool = Spool(tmp_path / "mailq", hostname="e.test")
        spool.ensure_dirs()
        incoming = tmp_path / "mailq" / "incoming"
        os.rmdir(incoming)
        incoming.write_text("not a directory: storing there fails")
        handed = []
        intake = Intake(cfg, spool, "e.test", lambda *a: handed.append(a),
                        relay_dir=lambda: "working")
        txn = Transaction(mail_from="a@src.test", rcpts=["x@far.test", "y@local.test"],
                          local={"y@local.test"})
        try:
            with pytest.raises(OSError):
                await intake.on_message(MessageReceived(Session(peer_ip="127.0.0.1"), txn,
                                                        b"Subject: x\r\n\r\nx\r\n"))
            assert not handed
            assert os.listdir(tmp_path / "mailq" / "working") == []
        finally:
            spool.close()
    asyncio.run(main())
