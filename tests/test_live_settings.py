"""Settings changed while the engine runs (issue 15 item 7, issue 13 item 4).

Every setting is either `restart=True` (config set and the web admin say "after restart") or
applied at once in every process of its scope; the table below names, for each live one, the
part that applies it, so that a new setting cannot be added without deciding. The end-to-end
tests change the settings that used to be read only at start on a real engine process (one
intake process, and several where the intake workers read the setting) and see their effect
over real sockets.
"""
from __future__ import annotations

import smtplib
import socket
import time
import urllib.request
from datetime import datetime, timedelta

import pytest

from mailengine import control
from mailengine.config import SETTINGS
from mailengine.setting import DELIVERY, SCOPES
from mailengine.testing.engine import RunningEngine, free_port, wait_until
from mailengine.testing.sink import ThreadedSink
from mailengine.workers import worker_values

# Each setting applied while running -> what applies it (in the engine process: app.py's
# Engine.apply_settings and the parts it calls, or a loop reading engine.cfg each time; in the
# intake worker processes: workers.WorkerPool.apply replaces them, for every scope but delivery).
LIVE = {
    "basic.dns_servers": "DeliveryEngine.apply -> MXResolver.set_bypass (cache dropped)",
    "basic.local_domains": "Policy.reload",
    "basic.admin_email": "diskwatch alert reads cfg",
    "basic.min_free_disk_mb": "DiskWatch.set_threshold",
    "network.helo_text": "Engine.apply_settings: hostname -> intake, InboundServer.apply, "
                         "DeliveryEngine.apply (helo)",
    "network.smtp_source_ip": "DeliveryEngine._new_session reads cfg",
    "network.web_ip": "WebSite checks clients against cfg (where it binds: at start)",
    "policy.rcpt_relay_domains": "Policy.reload",
    "policy.relay_ips": "Policy.reload, InboundServer.apply",
    "policy.refused_mail_from": "Policy.reload",
    "policy.refused_mail_servers": "DeliveryEngine.apply (and the resolver)",
    "queue.dsn": "Notices reads cfg",
    "queue.queue_check_interval": "Engine._scan_dropins: after_setting",
    "queue.pause_sending": "DeliveryEngine.apply -> set_paused; relay_dir reads cfg",
    "queue.relay_via_disk": "Engine.apply_settings -> spool.durable",
    "queue.save_done": "delivery reads cfg",
    "queue.done_retention_minutes": "Engine._expire reads cfg",
    "queue.save_incoming": "Intake, Engine._expire read cfg",
    "queue.incoming_retention_minutes": "Engine._expire reads cfg",
    "queue.retry_intervals": "delivery reads cfg",
    "logging.bounce_host": "Policy.reload; delivery reads cfg",
    "logging.log_retention_days": "logs.set_retention",
    "logging.log_undeliverable": "Notices reads cfg",
    "logging.stats_interval": "Engine._print_stats: after_setting",
    "limits.smtp_receive_timeout": "InboundServer.apply",
    "limits.smtp_connect_timeout": "DeliveryEngine._new_session reads cfg",
    "limits.smtp_write_timeout": "DeliveryEngine._new_session reads cfg",
    "limits.smtp_body_timeout": "DeliveryEngine._new_session reads cfg",
    "limits.smtp_read_timeout": "DeliveryEngine._new_session reads cfg",
    "limits.max_connections_per_host": "DeliveryEngine.apply",
    "limits.messages_in_memory": "Engine.has_room reads cfg",
    "limits.max_send_rate": "DeliveryEngine.apply",
    "limits.inbound_priority_ips": "InboundServer.apply",
    "limits.max_message_size": "InboundServer.apply",
    "limits.max_outbound_connections": "DeliveryEngine.apply",
    "limits.max_queue_memory_kb": "DeliveryEngine.apply",
    "limits.max_bandwidth": "DeliveryEngine.apply",
    "limits.max_inbound_connections": "InboundServer.apply",
    "limits.max_recipients": "InboundServer.apply",
    "limits.max_command_line": "InboundServer.apply",
    "limits.max_errors": "InboundServer.apply",
    "limits.max_hops": "InboundServer.apply",
    "limits.smtp_command_deadline": "InboundServer.apply",
    "limits.smtp_min_data_rate": "InboundServer.apply",
    "limits.max_connections_per_ip": "InboundServer.apply",
    "limits.max_intake_memory_mb": "InboundServer.apply",
    "limits.max_auth_checks": "InboundServer.apply",
    "debug.dns": "DeliveryEngine.apply -> resolver.debug",
    "debug.smtp_out": "DeliveryEngine.apply",
    "debug.smtp_in": "InboundServer.apply",
    "debug.program": "Engine.apply_settings -> logs.program_trace",
    "debug.send_loop": "DeliveryEngine.apply",
    "debug.queue_size": "Engine._log_queue: after_setting",
    "debug.queue_memory": "Engine._log_queue: after_setting",
    "reports.delivery_reports": "Notices reads cfg",
    "reports.recipients": "Notices reads cfg",
    "reports.domains": "Notices reads cfg",
    "unsubscribe.sender_domains": "DeliveryEngine.apply -> HeaderMaker.from_config",
    "unsubscribe.url_base": "DeliveryEngine.apply -> HeaderMaker.from_config",
    "unsubscribe.mailto_domain": "Policy.reload; Intake reads cfg; DeliveryEngine.apply",
    "suppression.enabled": "Policy.reload (intake workers are replaced)",
    "suppression.action": "Policy.reload (intake workers are replaced); sendmail reads cfg",
    "suppression.bounce_categories": "Notices.after_attempt and Intake (bounces) read cfg",
    "suppression.bounce_days": "Notices.after_attempt and Intake (bounces) read cfg",
    "suppression.trust_unsigned_bounces": "Intake (bounces) reads cfg",
    "complaints.addresses": "Policy.reload; ComplaintDesk (intake) reads cfg",
    "complaints.suppress_all_senders": "ComplaintDesk reads cfg",
    "complaints.trust_unsigned": "ComplaintDesk reads cfg",
    "complaints.rate_threshold_percent": "the complaints page reads cfg",
    "webhooks.urls": "Webhooks.run reconciles its URL tasks each second; Webhooks.attempt and "
                     "webhooks.emit read cfg",
    "webhooks.secret": "Webhooks._post reads cfg",
    "webhooks.events": "Webhooks.attempt and webhooks.emit read cfg",
    "webhooks.batch_size": "Webhooks._serve reads cfg",
    "webhooks.batch_wait": "Webhooks._serve reads cfg",
    "webhooks.timeout": "Webhooks._post reads cfg",
    "webhooks.retry_max_seconds": "Webhooks._serve reads cfg",
    "webhooks.max_age_hours": "Webhooks._deliver and Webhooks.prune read cfg",
}


def test_every_setting_is_marked_after_restart_or_applied_live():
    live = {s.name for s in SETTINGS if not s.restart}
    assert live - set(LIVE) == set(), "decide: restart=True, or apply it live and list it here"
    assert set(LIVE) - live == set(), "marked restart=True (or gone): take it out of LIVE"
    assert all(s.scope in SCOPES for s in SETTINGS)


def test_the_intake_processes_get_every_setting_but_the_delivery_ones():
    values = {s.name: s.default for s in SETTINGS}
    sent = worker_values(values)
    assert set(sent) == {s.name for s in SETTINGS if s.scope != DELIVERY}
    # the workers' greeting and Received: name: a change restarts them (it did not)
    assert "network.helo_text" in sent and "basic.min_free_disk_mb" in sent
    assert "limits.max_send_rate" not in sent and "dkim.signing_table" not in sent


def test_readme_config_reference_marks_the_after_restart_settings():
    import re
    from pathlib import Path
    from mailengine.config import BY_NAME
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    reference = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = 0
    for row in reference.splitlines():
        keys = re.findall(r"`([\w.]+)`", row.split(" | ")[0])
        if not row.startswith("| `") or not keys:
            continue
        section = keys[0].split(".")[0]
        names = [k if "." in k else f"{section}.{k}" if not k.startswith("_") else
                 f"{keys[0].rsplit('_', 2)[0]}{k}" for k in keys]
        names = [n for n in names if n in BY_NAME]
        assert names, row
        rows += 1
        restart = {BY_NAME[n].restart for n in names}
        assert len(restart) == 1, row
        assert ("**after restart**" in row) == restart.pop(), row
    assert rows > 40


# --- end to end ------------------------------------------------------------------------------------

RESTARTED = "intake processes restarted with the new settings"


def _set(eng: RunningEngine, name: str, value) -> dict:
    """config.set over the control socket; returns once every intake process has the value."""
    before = eng.read_output().count(RESTARTED)
    answer = control.request(eng.home / "mailengine.sock", "config.set", name=name, value=value)
    assert answer["applied"], answer
    if any("intake processes are restarted" in n for n in answer.get("notes", [])):
        wait_until(lambda: eng.read_output().count(RESTARTED) > before, 20,
                   "the intake processes replaced")
    return answer


def _greeting_and_ehlo(port: int) -> tuple[str, str]:
    with smtplib.SMTP(timeout=10) as s:
        greeting = s.connect("127.0.0.1", port)[1].decode()
        text = s.ehlo("client.test")[1]
        return greeting, text.decode().splitlines()[0]


def _mail_from_reply(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        return s.mail("a@src.test")


def _send(port: int, rcpt: str, body: bytes = b"Subject: live\r\n\r\nx\r\n") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("a@src.test", [rcpt], body)


@pytest.mark.parametrize("processes", [1, 2])
def test_greeting_name_and_free_disk_threshold_change_in_every_intake_process(tmp_path,
                                                                             processes):
    with RunningEngine(tmp_path, {"network.intake_workers": processes,
                                  "network.helo_text": "one.example.test",
                                  "basic.local_domains": ["."]}) as eng:
        greeting, ehlo = _greeting_and_ehlo(eng.smtp_port)
        assert "one.example.test" in greeting and ehlo.startswith("one.example.test")
        _set(eng, "network.helo_text", "two.example.test")
        for _ in range(4 * processes):  # new sessions, whichever process takes them
            greeting, ehlo = _greeting_and_ehlo(eng.smtp_port)
            assert "two.example.test" in greeting and ehlo.startswith("two.example.test")
            assert _mail_from_reply(eng.smtp_port)[0] == 250
        _set(eng, "basic.min_free_disk_mb", 1e12)  # more than any disk has
        for _ in range(4 * processes):
            code, text = _mail_from_reply(eng.smtp_port)
            assert (code, text[:5]) == (452, b"4.3.1")
        _set(eng, "basic.min_free_disk_mb", 0)  # no check: accepted again
        for _ in range(4 * processes):
            assert _mail_from_reply(eng.smtp_port)[0] == 250


def test_dns_servers_pin_and_debug_dns_change_while_running(tmp_path):
    first, second = ThreadedSink().start(), ThreadedSink().start()
    try:
        with RunningEngine(tmp_path, {
                "queue.pause_sending": False, "network.helo_text": "engine.test",
                "basic.dns_servers": [f"pin.test,mx.pin.test,MX,127.0.0.1:{first.port}"]}) as eng:
            _send(eng.smtp_port, "a@pin.test")
            first.wait_messages(1)
            assert "DNS pin.test" not in eng.read_output()
            _set(eng, "basic.dns_servers", [f"pin.test,mx.pin.test,MX,127.0.0.1:{second.port}"])
            _set(eng, "debug.dns", True)
            _send(eng.smtp_port, "b@pin.test")
            second.wait_messages(1)
            wait_until(lambda: "DNS pin.test" in eng.read_output(), 10, "the DNS trace line")
        assert [m.rcpts for m in first.messages] == [["a@pin.test"]]
        assert [m.rcpts for m in second.messages] == [["b@pin.test"]]
    finally:
        first.stop()
        second.stop()


def test_stats_interval_and_queue_lines_are_turned_on_while_running(tmp_path):
    with RunningEngine(tmp_path, {"basic.local_domains": ["."], "logging.stats_interval": 0,
                                  "debug.queue_size": False, "debug.queue_memory": False}) as eng:
        _send(eng.smtp_port, "u@local.test")
        time.sleep(1.5)
        assert " recv [" not in eng.read_output() and "messages queued" not in eng.read_output()
        _set(eng, "logging.stats_interval", 1)
        wait_until(lambda: " recv [" in eng.read_output(), 10, "the statistics line")
        _set(eng, "debug.queue_size", True)
        wait_until(lambda: "messages queued" in eng.read_output(), 10, "the queue size line")


def test_log_retention_days_lowered_while_running_prunes_old_files(tmp_path):
    log_dir = tmp_path / "log"
    log_dir.mkdir(parents=True)
    old = log_dir / f"mailengine-{(datetime.now() - timedelta(days=20)):%Y-%m-%d}.log"
    recent = log_dir / f"mailengine-{(datetime.now() - timedelta(days=2)):%Y-%m-%d}.log"
    old.write_text("old\n")
    recent.write_text("recent\n")
    with RunningEngine(tmp_path, {"logging.log_retention_days": 30}) as eng:
        time.sleep(0.5)
        assert old.exists()
        _set(eng, "logging.log_retention_days", 5)
        wait_until(lambda: not old.exists(), 5, "the 20-day-old log file removed")
        assert recent.exists()


def test_max_queue_memory_kb_lowered_while_running_keeps_big_mail_on_disk_only(tmp_path):
    """Mail that fits `max_queue_memory_kb` is sent from the copy intake handed over; the
    rewritten ID.dat shows which copy was sent."""
    sink = ThreadedSink().start()
    body = b"Subject: big\r\n\r\n" + (b"A" * 998 + b"\r\n") * 1200  # 1.2 MB
    try:
        with RunningEngine(tmp_path, {
                "basic.dns_servers": [f"big.test,mx.big.test,MX,127.0.0.1:{sink.port}"]}) as eng:
            _set(eng, "limits.max_queue_memory_kb", 1000)  # 1,024,000 bytes: too small for it
            _send(eng.smtp_port, "u@big.test", body)
            dat, = (eng.mailq / "retry").glob("*.dat")
            dat.write_bytes(dat.read_bytes().replace(b"A", b"B"))
            _set(eng, "queue.pause_sending", False)
            sink.wait_messages(1, 20)
        data = sink.messages[0].data
        assert b"B" * 998 in data and b"A" * 998 not in data  # read from the file, not memory
    finally:
        sink.stop()


def _flushes(web_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("mailengine_spool_flushes_total "):
                return int(float(line.split()[1]))
    raise AssertionError("no mailengine_spool_flushes_total in /metrics")


def test_relay_via_disk_turned_off_with_one_intake_process(tmp_path):
    web = free_port()
    with RunningEngine(tmp_path, {"network.web_port": web}) as eng:
        wait_until(lambda: _port_open(web), 10, "the web port")
        _send(eng.smtp_port, "a@relay.test")
        durable = _flushes(web)
        assert durable >= 1  # stored with a sync
        _set(eng, "queue.relay_via_disk", False)
        for i in range(3):
            _send(eng.smtp_port, f"b{i}@relay.test")
        assert len(list((eng.mailq / "retry").glob("*.inf"))) == 4
        assert _flushes(web) == durable  # memory mode: stored without a sync


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False
