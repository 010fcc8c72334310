"""limits.messages_in_memory: beyond it, queued mail waits on disk only and is taken in later."""
import smtplib
import subprocess
import sys

from mailengine.testing.engine import RunningEngine, wait_until
from mailengine.testing.sink import ThreadedSink


def test_mail_beyond_messages_in_memory_waits_on_disk_then_is_delivered(tmp_path):
    sink = ThreadedSink().start()
    try:
        settings = {"limits.messages_in_memory": 3,
                    "basic.dns_servers": [f"dest.test,mx.dest.test,MX,127.0.0.1:{sink.port}"],
                    "queue.queue_check_interval": 600}  # only the backlog may find them
        with RunningEngine(tmp_path, settings) as eng:  # sending paused: all stay queued
            for i in range(8):
                with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                    s.sendmail("a@src.test", [f"r{i}@dest.test"], f"Subject: {i}\r\n\r\nx\r\n")
            assert len(list((eng.mailq / "retry").glob("*.inf"))) == 8  # all on disk
            status = subprocess.run([sys.executable, "-m", "mailengine.cli", "--home",
                                     str(tmp_path), "status"], capture_output=True, text=True)
            # the whole queue, of which only 3 in memory
            assert "queue     8 messages (3 in memory (3 recipients to send), 5 on disk only)" \
                in status.stdout, status.stdout
            assert "further mail waits on disk" in eng.read_output()
            out = subprocess.run([sys.executable, "-m", "mailengine.cli", "--home", str(tmp_path),
                                  "config", "set", "queue.pause_sending", "false"],
                                 capture_output=True, text=True)
            assert out.returncode == 0, out.stdout + out.stderr
            wait_until(lambda: len(sink.messages) == 8, 30, "all 8 messages at the sink")
        assert sorted(r for m in sink.messages for r in m.rcpts) == \
            sorted(f"r{i}@dest.test" for i in range(8))
    finally:
        sink.stop()
