"""Accept only what can be stored (issue 14, item 6), over real sockets to a real engine.

Bad input is refused at the command that carries it (HELO/EHLO, an ESMTP parameter, an address),
never with a 451 after DATA; every RFC 5321 address, quoted local parts with a space or a comma
included, is stored (docs/QUEUE.md: `<`percent-encoded`>` items) and delivered unchanged.
"""
from __future__ import annotations

import smtplib

import pytest

from mailengine.envelope import parse_inf
from mailengine.testing.engine import RunningEngine, wait_until
from mailengine.testing.sink import ThreadedSink

MSG = b"Subject: quoted\r\n\r\nhello\r\n"
QUOTED = ['"john doe"@dest.test', '"doe,john"@dest.test']


def client(eng: RunningEngine) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10)
    s.command_encoding = "utf-8"  # the non-printable SMTPUTF8 addresses below
    return s


def good_message_after(s: smtplib.SMTP) -> tuple[int, bytes]:
    """The session still works after a refusal: a clean transaction gets its 250."""
    s.rset()
    assert s.mail("a@example.org")[0] == 250
    assert s.rcpt("x@dest.test")[0] == 250
    return s.data(MSG)


def assert_no_traceback(eng: RunningEngine) -> None:
    out = eng.read_output()
    assert "Traceback" not in out and "storing a message" not in out, out[-3000:]


# (what to send first, the command with the bad input, its expected reply code and enhanced code)
BAD = [
    ("helo-nul", None, ("HELO", "client\x00.test"), 501, b"5.5.2"),
    ("ehlo-nul", None, ("EHLO", "client\x00.test"), 501, b"5.5.2"),
    ("ehlo-escape", None, ("EHLO", "client\x1b[31m.test"), 501, b"5.5.2"),
    ("envid-nul", "ehlo", ("MAIL", "FROM:<a@example.org> ENVID=+00"), 501, b"5.5.4"),
    ("envid-line-break", "ehlo", ("MAIL", "FROM:<a@example.org> ENVID=x+0D+0Ay"), 501, b"5.5.4"),
    ("orcpt-nul", "mail", ("RCPT", "TO:<x@dest.test> ORCPT=rfc822;x+00@dest.test"), 501, b"5.5.4"),
    ("sender-not-printable", "ehlo", ("MAIL", "FROM:<a\u0085b@example.org> SMTPUTF8"), 553, b"5.1.7"),
    ("rcpt-not-printable", "mail", ("RCPT", "TO:<\"a\u2028b\"@dest.test>"), 553, b"5.1.3"),
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with RunningEngine(tmp_path_factory.mktemp("storable")) as eng:
        yield eng


@pytest.mark.parametrize("before, cmd, code, enhanced", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_refused_at_its_command(engine, before, cmd, code, enhanced):
    with client(engine) as s:
        if before in ("ehlo", "mail"):
            assert s.ehlo("client.test")[0] == 250
        if before == "mail":
            assert s.mail("a@example.org", ["SMTPUTF8"])[0] == 250
        reply = s.docmd(*cmd)
        assert reply[0] == code and reply[1].startswith(enhanced), reply
        if cmd[0] in ("HELO", "EHLO"):
            assert s.ehlo("client.test")[0] == 250  # refused: no name; a good one is taken
        code, text = good_message_after(s)
        assert code == 250, text
    assert_no_traceback(engine)


def test_quoted_local_parts_are_stored_and_round_trip(engine):
    with client(engine) as s:
        s.ehlo("client.test")
        assert s.mail('"doe, jane"@example.org')[0] == 250
        for r in QUOTED + ["plain@dest.test"]:
            assert s.rcpt(r, ["NOTIFY=FAILURE"]) == (250, b"2.1.5 Recipient OK")
        code, text = s.data(MSG)
    assert code == 250, text  # on disk
    msg_id = text.split()[-1].decode()
    raw = (engine.mailq / "retry" / f"{msg_id}.inf").read_bytes()
    assert (b'rcpttosend=<"john%20doe"@dest.test>,<"doe%2Cjohn"@dest.test>,plain@dest.test\n'
            in raw)
    inf = parse_inf(raw, msg_id)
    assert inf.mail_from == '"doe, jane"@example.org'
    assert inf.rcpt_to_send == QUOTED + ["plain@dest.test"]
    assert set(inf.dsn_rcpt) == set(QUOTED + ["plain@dest.test"])
    assert_no_traceback(engine)


def test_local_mail_kept_in_incoming_lists_quoted_recipients_unambiguously(tmp_path):
    with RunningEngine(tmp_path, {"basic.local_domains": ["here.test"],
                                  "queue.save_incoming": True}) as eng:
        with client(eng) as s:
            s.sendmail("a@example.org", ['"doe,john"@here.test', "a@here.test"], MSG)
        inf, = (eng.mailq / "incoming").glob("*.inf")
        assert b'rcptto=<"doe%2Cjohn"@here.test>,a@here.test\n' in inf.read_bytes()
        assert_no_traceback(eng)


def test_quoted_local_part_is_delivered_intact(tmp_path):
    sink = ThreadedSink("127.0.0.140", 0).start()
    try:
        with RunningEngine(tmp_path, {
                "queue.pause_sending": False, "queue.save_done": True,
                "network.helo_text": "engine.test", "logging.stats_interval": 0,
                "basic.dns_servers": [f"dest.test,mx.dest.test,MX,127.0.0.140:{sink.port}"]}) as eng:
            with client(eng) as s:
                s.sendmail("a@example.org", QUOTED, MSG)
            sink.wait_messages(1, timeout=20)
            wait_until(lambda: list((eng.mailq / "done").glob("*.inf")), what="done")
            done, = [parse_inf(p.read_bytes(), p.name[:-4])
                     for p in (eng.mailq / "done").glob("*.inf")]
        m, = sink.messages
        assert sorted(m.rcpts) == sorted(QUOTED)
        assert m.data.endswith(MSG)
        assert sorted(done.rcpt_sent) == sorted(QUOTED) and done.status == "done"
        assert_no_traceback(eng)
    finally:
        sink.stop()
