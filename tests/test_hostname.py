"""The engine's name with `network.helo_text` empty (issue 15.9): the host's fully qualified name,
as Postfix's myhostname, in the greeting and in EHLO to other servers; a warning at start when
the host has none. Each engine runs in its own UTS and mount namespace (unshare, needs root)
with its own host name and /etc/hosts, so the real resolver functions answer."""
from __future__ import annotations

import smtplib
import subprocess

import pytest

from mailengine.testing.engine import RunningEngine, wait_until
from mailengine.testing.sink import ThreadedSink


def namespaced(hosts_file) -> list[str]:
    """Run the engine with host name `mail` and `hosts_file` as /etc/hosts."""
    return ["unshare", "-u", "-m", "sh", "-c",
            'mount --bind "$0" /etc/hosts && hostname mail && exec "$@"', str(hosts_file)]


@pytest.fixture(scope="module")
def can_unshare(tmp_path_factory):
    hosts = tmp_path_factory.mktemp("probe") / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    try:
        r = subprocess.run(namespaced(hosts) + ["true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("no unshare")
    if r.returncode != 0:
        pytest.skip(f"cannot make a UTS and mount namespace: {r.stderr.decode().strip()}")


def run_engine(tmp_path, hosts_line: str):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + hosts_line)
    sink = ThreadedSink("127.0.0.156", 0).start()
    try:
        with RunningEngine(tmp_path / "home", {
                "queue.pause_sending": False, "queue.queue_check_interval": 0.5,
                "basic.dns_servers": [f"name.test,mx.name.test,MX,127.0.0.156:{sink.port}"]},
                wrapper=namespaced(hosts)) as eng:
            with smtplib.SMTP(timeout=10) as s:
                banner = s.connect("127.0.0.1", eng.smtp_port)[1].decode()  # the 220 greeting
                s.sendmail("a@src.test", ["x@name.test"], b"Subject: n\r\n\r\nhi\r\n")
            wait_until(lambda: sink.messages, 20, "the delivery")
            helo = sink.sessions[0].helo
        return banner, helo, eng.read_output()
    finally:
        sink.stop()


def test_empty_helo_text_means_the_fully_qualified_name(tmp_path, can_unshare):
    banner, helo, out = run_engine(tmp_path, "127.0.1.1 mail.engine.test mail\n")
    assert helo == "mail.engine.test"  # not the bare "mail"
    assert banner.startswith("mail.engine.test ")
    assert "not fully qualified" not in out


def test_a_host_without_a_domain_name_is_warned_about(tmp_path, can_unshare):
    banner, helo, out = run_engine(tmp_path, "")
    assert helo == "mail"
    assert "this engine's name 'mail' is not fully qualified" in out
    assert "set network.helo_text" in out
