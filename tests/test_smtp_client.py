"""The sans-IO SMTP client (mailengine/smtp/client.py): bytes in, bytes out, no sockets.

Most cases are a table: the server's capabilities, one transaction, and the conversation as
(server bytes, bytes the client must send next) pairs, then the outcome per recipient. Hypothesis
then feeds arbitrary and near-valid server bytes to check that nothing but SMTPClientError can
ever escape and that every transaction ends with an outcome for every recipient.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from mailengine.smtp.client import (Body, Capabilities, DSNRequest, SMTPClient, SMTPClientError,
                                    State, normalize_line_endings)

FULL = ["PIPELINING", "SIZE 10000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN"]
PLAIN = ["SIZE 10000", "8BITMIME"]  # no PIPELINING
MSG = b"Subject: hi\r\n\r\nhello\r\n"
BODY = MSG + b".\r\n"


def ehlo_reply(keywords: list[str]) -> bytes:
    lines = ["mx.test Hello"] + keywords
    return "".join(f"250{'-' if i < len(lines) - 1 else ' '}{k}\r\n"
                   for i, k in enumerate(lines)).encode()


def ready(keywords=FULL, starttls=False) -> SMTPClient:
    c = SMTPClient("client.test", starttls=starttls)
    assert c.data_to_send() == b""
    c.receive_data(b"220 mx.test ESMTP\r\n")
    assert c.data_to_send() == b"EHLO client.test\r\n"
    c.receive_data(ehlo_reply(keywords))
    assert c.state is State.READY, c.state
    return c


def converse(c: SMTPClient, steps):
    for server, expected in steps:
        if server:
            c.receive_data(server)
        assert c.data_to_send() == expected, (server, expected)


def outcome(tx):
    return [(r.address, r.code, r.enhanced, r.stage) for r in tx.result.recipients]


# -- transactions, table-driven ---------------------------------------------------------------------

CASES = [
    dict(id="pipelined-happy", caps=FULL, rcpts=["a@x.test", "b@x.test"], steps=[
        (None, b"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n"
               b"DATA\r\n"),
        (b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n", b""),
        (b"250 2.1.5 Ok\r\n", b""),
        (b"354 go\r\n", BODY),
        (b"250 2.0.0 queued as X\r\n", b"")],
     out=[("a@x.test", 250, "2.0.0", "body"), ("b@x.test", 250, "2.0.0", "body")],
     state=State.READY, site=False),
    dict(id="one-by-one-without-pipelining", caps=PLAIN, rcpts=["a@x.test", "b@x.test"], steps=[
        (None, b"MAIL FROM:<s@y.test> SIZE=22\r\n"),
        (b"250 ok\r\n", b"RCPT TO:<a@x.test>\r\n"),
        (b"250 ok\r\n", b"RCPT TO:<b@x.test>\r\n"),
        (b"550 5.1.1 no such user\r\n", b"DATA\r\n"),
        (b"354 go\r\n", BODY),
        (b"250 ok\r\n", b"")],
     out=[("a@x.test", 250, "", "body"), ("b@x.test", 550, "5.1.1", "rcpt")],
     state=State.READY, site=False),
    dict(id="mixed-4xx-5xx", caps=FULL, rcpts=["a@x.test", "b@x.test", "c@x.test"], steps=[
        (None, b"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n"
               b"RCPT TO:<c@x.test>\r\n"
               b"DATA\r\n"),
        (b"250 ok\r\n451 4.7.1 greylisted\r\n550 5.1.1 unknown\r\n250 ok\r\n", b""),
        (b"354 go\r\n", BODY),
        (b"250 2.0.0 ok\r\n", b"")],
     out=[("a@x.test", 451, "4.7.1", "rcpt"), ("b@x.test", 550, "5.1.1", "rcpt"),
          ("c@x.test", 250, "2.0.0", "body")],
     state=State.READY, site=False),
    dict(id="all-refused-no-data-rset", caps=FULL, rcpts=["a@x.test", "b@x.test"], steps=[
        (None, b"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n"
               b"DATA\r\n"),
        (b"250 ok\r\n550 5.1.1 no\r\n452 4.5.3 too many\r\n", b""),
        (b"554 5.5.1 no valid recipients\r\n", b"RSET\r\n"),
        (b"250 ok\r\n", b"")],
     out=[("a@x.test", 550, "5.1.1", "rcpt"), ("b@x.test", 452, "4.5.3", "rcpt")],
     state=State.READY, site=False),
    dict(id="all-refused-yet-354-gets-a-lone-dot", caps=FULL, rcpts=["a@x.test"], steps=[
        (None, b"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<a@x.test>\r\nDATA\r\n"),
        (b"250 ok\r\n550 5.1.1 no\r\n354 go ahead anyway\r\n", b".\r\n"),
        (b"554 5.5.1 no valid recipients\r\n", b"")],
     out=[("a@x.test", 550, "5.1.1", "rcpt")], state=State.READY, site=False),
    dict(id="mail-refused-pipelined", caps=FULL, rcpts=["a@x.test", "b@x.test"], steps=[
        (None, b"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n"
               b"DATA\r\n"),
        (b"553 5.7.1 sender refused\r\n503 5.5.1 need MAIL\r\n", b""),
        (b"503 5.5.1 need MAIL\r\n", b""),
        (b"503 5.5.1 need MAIL\r\n", b"RSET\r\n"),
        (b"250 ok\r\n", b"")],
     out=[("a@x.test", 553, "5.7.1", "mail"), ("b@x.test", 553, "5.7.1", "mail")],
     state=State.READY, site=False),
    dict(id="mail-refused-unpipelined", caps=PLAIN, rcpts=["a@x.test"], steps=[
        (None, b"MAIL FROM:<s@y.test> SIZE=22\r\n"),
        (b"451 4.3.0 try later\r\n", b"RSET\r\n"),
        (b"250 ok\r\n", b"")],
     out=[("a@x.test", 451, "4.3.0", "mail")], state=State.READY, site=False),
    dict(id="data-refused", caps=FULL, rcpts=["a@x.test", "b@x.test"], steps=[
        (None, b"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n"
               b"DATA\r\n"),
        (b"250 ok\r\n250 ok\r\n550 no\r\n", b""),
        (b"554 5.5.1 no valid recipients\r\n", b"RSET\r\n"),
        (b"250 ok\r\n", b"")],
     out=[("a@x.test", 554, "5.5.1", "data"), ("b@x.test", 550, "", "rcpt")],
     state=State.READY, site=False),
    dict(id="body-refused-temporarily", caps=FULL, rcpts=["a@x.test"], steps=[
        (None, b"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<a@x.test>\r\n"
               b"DATA\r\n"),
        (b"250 ok\r\n250 ok\r\n", b""),
        (b"354 go\r\n", BODY),
        (b"451 4.3.0 queue full\r\n", b"")],  # the end of data resets: no RSET needed
     out=[("a@x.test", 451, "4.3.0", "body")], state=State.READY, site=False),
    dict(id="421-during-rcpt", caps=FULL, rcpts=["a@x.test", "b@x.test", "c@x.test"], steps=[
        (None, b"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n"
               b"RCPT TO:<c@x.test>\r\n"
               b"DATA\r\n"),
        (b"250 ok\r\n250 ok\r\n550 no\r\n421 4.3.2 shutting down\r\n", b"")],
     out=[("a@x.test", 421, "4.3.2", "rcpt"), ("b@x.test", 550, "", "rcpt"),
          ("c@x.test", 421, "4.3.2", "rcpt")],
     state=State.CLOSED, site=True),
    dict(id="test-mode-rset-quit", caps=FULL, rcpts=["a@x.test", "b@x.test"], test_mode=True,
         steps=[
        (None, b"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n"),
        (b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n", b"RSET\r\n"),
        (b"250 ok\r\n", b"QUIT\r\n"),
        (b"221 bye\r\n", b"")],
     out=[("a@x.test", 250, "2.0.0", "test"), ("b@x.test", 550, "5.1.1", "rcpt")],
     state=State.CLOSED, site=False),
    dict(id="size-too-big", caps=["PIPELINING", "SIZE 10"], rcpts=["a@x.test"], steps=[(None, b"")],
     out=[("a@x.test", 552, "5.3.4", "local")], state=State.READY, site=False),
    dict(id="8bit-without-8bitmime", caps=["PIPELINING"], rcpts=["a@x.test"],
         data="Subject: é\r\n\r\nçà\r\n".encode(), steps=[(None, b"")],
     out=[("a@x.test", 554, "5.6.3", "local")], state=State.READY, site=False),
    dict(id="utf8-address-without-smtputf8", caps=["PIPELINING", "8BITMIME"], rcpts=["jörg@x.test"],
         steps=[(None, b"")],
     out=[("jörg@x.test", 553, "5.6.7", "local")], state=State.READY, site=False),
    dict(id="injection-in-address", caps=FULL, rcpts=["a@x.test\r\nDATA", "b@x.test"], steps=[
        (None, b"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<b@x.test>\r\n"
               b"DATA\r\n"),
        (b"250 ok\r\n250 ok\r\n", b""),
        (b"354 go\r\n", BODY),
        (b"250 ok\r\n", b"")],
     out=[("a@x.test\r\nDATA", 553, "5.1.3", "local"), ("b@x.test", 250, "", "body")],
     state=State.READY, site=False),
    dict(id="garbage-reply", caps=FULL, rcpts=["a@x.test"], steps=[
        (None, b"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<a@x.test>\r\n"
               b"DATA\r\n"),
        (b"250 ok\r\nHTTP/1.1 400 Bad Request\r\n", b"")],
     out=[("a@x.test", 451, "4.5.0", "connection")], state=State.ERROR, site=True),
    dict(id="354-to-mail-is-a-violation", caps=FULL, rcpts=["a@x.test"], steps=[
        (None, b"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<a@x.test>\r\n"
               b"DATA\r\n"),
        (b"354 what\r\n", b"")],
     out=[("a@x.test", 451, "4.5.0", "connection")], state=State.ERROR, site=True),
    dict(id="250-to-data-is-a-violation", caps=FULL, rcpts=["a@x.test"], steps=[
        (None, b"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<a@x.test>\r\n"
               b"DATA\r\n"),
        (b"250 ok\r\n250 ok\r\n", b""),
        (b"250 ok\r\n", b"")],
     out=[("a@x.test", 451, "4.5.0", "connection")], state=State.ERROR, site=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_transaction_table(case):
    c = ready(case["caps"])
    tx = c.start_transaction("s@y.test", case["rcpts"], case.get("data", MSG),
                             test_mode=case.get("test_mode", False))
    converse(c, case["steps"])
    assert tx.done
    assert outcome(tx) == case["out"]
    assert c.state is case["state"]
    assert tx.result.site_failure is case["site"]


def test_same_conversation_fed_one_byte_at_a_time():
    c = ready(PLAIN)
    tx = c.start_transaction("s@y.test", ["a@x.test"], MSG)
    out = c.data_to_send()
    for server in (b"250-2.1.0 first\r\n250 2.1.0 Ok\r\n", b"250 ok\r\n", b"354 go\r\n",
                   b"250 2.0.0 done\r\n"):
        for i in range(len(server)):
            c.receive_data(server[i:i + 1])
        out += c.data_to_send()
    assert out == (b"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<a@x.test>\r\nDATA\r\n" + BODY)
    assert outcome(tx) == [("a@x.test", 250, "2.0.0", "body")]


def test_connection_reused_for_three_messages():
    c = ready(FULL)
    for n in range(3):
        tx = c.start_transaction("s@y.test", [f"r{n}@x.test"], MSG)
        converse(c, [
            (None, f"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<r{n}@x.test>\r\nDATA\r\n"
                   .encode()),
            (b"250 ok\r\n250 ok\r\n", b""), (b"354 go\r\n", BODY),
            (b"250 ok\r\n", b"")])
        assert tx.result.delivered and c.is_ready
    c.quit()
    assert c.data_to_send() == b"QUIT\r\n"
    c.receive_data(b"221 bye\r\n")
    assert c.state is State.CLOSED


def test_params_8bitmime_smtputf8_dsn():
    c = ready(FULL)
    dsn = DSNRequest(ret="hdrs", envid="id+1=x", notify="FAILURE,DELAY",
                     orcpt={"jörg@x.test": "rfc822;Jörg@x.test"})
    c.start_transaction("s@y.test", ["jörg@x.test", "b@x.test"], "é\r\n".encode(), dsn=dsn)
    assert c.data_to_send().decode() == (
        "MAIL FROM:<s@y.test> SIZE=4 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id+2B1+3Dx\r\n"
        "RCPT TO:<jörg@x.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;J+C3+B6rg@x.test\r\n"
        "RCPT TO:<b@x.test> NOTIFY=FAILURE,DELAY\r\n"
        "DATA\r\n")


def test_dsn_params_dropped_when_not_offered_and_no_size_when_not_offered():
    c = ready(["PIPELINING"])
    c.start_transaction("", ["b@x.test"], MSG, dsn=DSNRequest(ret="FULL", notify="NEVER"))
    assert c.data_to_send() == b"MAIL FROM:<>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n"


def test_body_normalised_and_dot_stuffed():
    assert normalize_line_endings(b"a\nb\r\nc\rd") == b"a\r\nb\r\nc\r\nd"
    body = Body.from_bytes(b".top\n..two\nmid\n.\nend")
    assert body.payload == b"..top\r\n...two\r\nmid\r\n..\r\nend\r\n.\r\n"
    assert not body.eight_bit and body.size == len(b".top\r\n..two\r\nmid\r\n.\r\nend")
    assert Body.from_bytes(b"\xe9").eight_bit


def test_capabilities_parsed():
    c = ready(["PIPELINING", "SIZE 52428800", "8BITMIME", "SMTPUTF8", "STARTTLS",
               "ENHANCEDSTATUSCODES", "CHUNKING", "DSN", "AUTH PLAIN LOGIN", "size"])
    caps = c.capabilities
    assert (caps.esmtp, caps.pipelining, caps.size, caps.eightbitmime, caps.smtputf8,
            caps.starttls, caps.enhancedstatuscodes, caps.chunking, caps.dsn) == \
        (True, True, 0, True, True, True, True, True, True)  # the last "size" wins: no limit
    assert caps.keywords["AUTH"] == "PLAIN LOGIN"
    assert Capabilities().size is None


def test_enhanced_codes_extracted_only_when_class_matches():
    c = ready(FULL)
    tx = c.start_transaction("s@y.test", ["a@x.test", "b@x.test", "c@x.test"], MSG)
    c.data_to_send()
    c.receive_data(b"250 ok\r\n550-5.1.1 The email account\r\n550-5.1.1 does not exist\r\n"
                   b"550 5.1.1 https://help\r\n250 5.1.1 odd\r\n451 4.7.1\r\n")
    c.receive_data(b"354 go\r\n")
    c.receive_data(b"250 2.0.0 ok\r\n")
    a, b, cc = tx.result.recipients
    assert (a.code, a.enhanced, a.text) == (550, "5.1.1",
                                           "The email account does not exist https://help")
    assert (b.code, b.enhanced) == (250, "2.0.0")  # '250 5.1.1' is no enhanced code of class 2
    assert (cc.code, cc.enhanced, cc.text) == (451, "4.7.1", "")


# -- the session around transactions -------------------------------------------------------------

def test_421_greeting_is_a_site_failure_without_quit():
    c = SMTPClient("client.test")
    c.receive_data(b"421 4.3.2 too busy\r\n")
    assert c.state is State.CLOSED and c.data_to_send() == b""
    assert (c.failure.code, c.failure.enhanced) == (421, "4.3.2")


def test_554_greeting_quits_politely():
    c = SMTPClient("client.test")
    c.receive_data(b"554 5.7.1 go away\r\n")
    assert c.data_to_send() == b"QUIT\r\n" and c.state is State.QUIT
    c.receive_data(b"221 bye\r\n")
    assert c.state is State.CLOSED and c.failure.code == 554
    with pytest.raises(SMTPClientError):
        c.start_transaction("a@b", ["c@d"], MSG)


@pytest.mark.parametrize("code", [b"500", b"502", b"550"])
def test_helo_fallback_when_ehlo_refused(code):
    c = SMTPClient("client.test")
    converse(c, [(b"220 old\r\n", b"EHLO client.test\r\n"),
                 (code + b" what?\r\n", b"HELO client.test\r\n"),
                 (b"250 old.test\r\n", b"")])
    assert c.is_ready and not c.capabilities.esmtp and not c.capabilities.pipelining
    tx = c.start_transaction("s@y.test", ["a@x.test"], MSG)
    assert c.data_to_send() == b"MAIL FROM:<s@y.test>\r\n"  # no SIZE, no pipelining


def test_helo_refused_too_is_a_site_failure():
    c = SMTPClient("client.test")
    converse(c, [(b"220 x\r\n", b"EHLO client.test\r\n"), (b"502 no\r\n", b"HELO client.test\r\n"),
                 (b"550 no\r\n", b"QUIT\r\n"), (b"221 bye\r\n", b"")])
    assert c.state is State.CLOSED and c.failure.code == 550


def test_starttls_then_ehlo_again():
    c = SMTPClient("client.test", starttls=True)
    converse(c, [(b"220 x\r\n", b"EHLO client.test\r\n"),
                 (ehlo_reply(["STARTTLS", "PIPELINING"]), b"STARTTLS\r\n"),
                 (b"220 2.0.0 go ahead\r\n", b"")])
    assert c.state is State.TLS_PENDING
    c.tls_started()
    assert c.data_to_send() == b"EHLO client.test\r\n" and c.capabilities.pipelining is False
    c.receive_data(ehlo_reply(["PIPELINING", "STARTTLS"]))
    assert c.is_ready and c.tls_active and c.data_to_send() == b""  # no second STARTTLS


def test_starttls_refused_continues_in_plain_text():
    c = SMTPClient("client.test", starttls=True)
    converse(c, [(b"220 x\r\n", b"EHLO client.test\r\n"),
                 (ehlo_reply(["STARTTLS"]), b"STARTTLS\r\n"), (b"454 4.7.0 no TLS now\r\n", b"")])
    assert c.is_ready and not c.tls_active


def test_starttls_not_asked_when_disabled():
    c = SMTPClient("client.test", starttls=False)
    converse(c, [(b"220 x\r\n", b"EHLO client.test\r\n"), (ehlo_reply(["STARTTLS"]), b"")])
    assert c.is_ready


def test_bytes_injected_after_starttls_220_are_an_error():
    c = SMTPClient("client.test", starttls=True)
    converse(c, [(b"220 x\r\n", b"EHLO client.test\r\n"), (ehlo_reply(["STARTTLS"]), b"STARTTLS\r\n")])
    c.receive_data(b"220 go\r\n250 injected\r\n")
    assert c.state is State.ERROR
    with pytest.raises(SMTPClientError):
        c.tls_started()


def test_connection_lost_mid_data_fails_every_recipient_temporarily():
    c = ready(FULL)
    tx = c.start_transaction("s@y.test", ["a@x.test", "b@x.test", "c@x.test"], MSG)
    converse(c, [(None, b"MAIL FROM:<s@y.test> SIZE=22\r\nRCPT TO:<a@x.test>\r\n"
                        b"RCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n"),
                 (b"250 ok\r\n250 ok\r\n250 ok\r\n550 no\r\n", b""),
                 (b"354 go\r\n", BODY)])
    assert c.waiting_for == "BODY"
    c.connection_lost()
    assert outcome(tx) == [("a@x.test", 451, "4.4.2", "connection"),
                           ("b@x.test", 451, "4.4.2", "connection"),
                           ("c@x.test", 550, "", "rcpt")]
    assert tx.result.site_failure and c.state is State.CLOSED
    assert "Connection lost while waiting for the reply to BODY" in tx.result.transcript[-1]


def test_timeout_is_an_error_state_with_temporary_results():
    c = ready(FULL)
    tx = c.start_transaction("s@y.test", ["a@x.test"], MSG)
    c.data_to_send()
    c.timed_out()
    assert c.state is State.ERROR and outcome(tx) == [("a@x.test", 451, "4.4.2", "connection")]
    assert "Timed out waiting for the reply to MAIL" in tx.result.reply.text


def test_unsolicited_421_while_idle_closes():
    c = ready(FULL)
    c.receive_data(b"421 4.4.2 idle timeout\r\n")
    assert c.state is State.CLOSED and not c.is_ready


def test_overlong_reply_line_is_garbage():
    c = ready(FULL)
    c.receive_data(b"250 " + b"x" * 10000)
    assert c.state is State.ERROR


def test_start_transaction_out_of_order_raises():
    c = SMTPClient("client.test")
    with pytest.raises(SMTPClientError):
        c.start_transaction("a@b", ["c@d"], MSG)
    c = ready(FULL)
    c.start_transaction("a@b", ["c@d"], MSG)
    with pytest.raises(SMTPClientError):
        c.start_transaction("a@b", ["c@d"], MSG)
    with pytest.raises(SMTPClientError):
        SMTPClient("bad name")


def test_transcript_in_the_manuals_format():
    c = SMTPClient("io.lyris.com")
    c.receive_data(b"220 luna.somecompany.net MailShield SMTP\r\n")
    c.receive_data(b"502 unknown\r\n")
    c.receive_data(b"250 Hello io.lyris.com, pleased to meet you\r\n")
    tx = c.start_transaction("somebody@somewhere.com", ["john@somecompany.com"], MSG)
    c.receive_data(b"250 <somebody@somewhere.com>... Sender ok\r\n")
    c.receive_data(b"550 <john@somecompany.com>... no such user\r\n")
    c.receive_data(b"250 reset\r\n")
    assert tx.result.transcript_text() == """\
<-- 220 luna.somecompany.net MailShield SMTP
--> EHLO io.lyris.com
<-- 502 unknown
--> HELO io.lyris.com
<-- 250 Hello io.lyris.com, pleased to meet you
--> MAIL FROM:<somebody@somewhere.com>
<-- 250 <somebody@somewhere.com>... Sender ok
--> RCPT TO:<john@somecompany.com>
<-- 550 <john@somecompany.com>... no such user
--> RSET
<-- 250 reset
"""


# -- fuzzing: whatever the server sends -----------------------------------------------------------

RCPTS = ["a@x.test", "b@x.test", "c@x.test"]


def drive(chunks, starttls: bool, test_mode: bool):
    """Feed chunks; start a transaction whenever the client is ready; check the invariants."""
    c = SMTPClient("client.test", starttls=starttls)
    txs = []
    for chunk in chunks:
        try:
            c.receive_data(chunk)
            if c.state is State.TLS_PENDING:
                c.tls_started()
            if c.is_ready and len(txs) < 3:
                txs.append(c.start_transaction("s@y.test", RCPTS, MSG, test_mode=test_mode))
        except SMTPClientError:  # the only error the module may raise
            pass
        assert isinstance(c.data_to_send(), bytes)
    c.connection_lost()
    assert c.is_finished or c.is_ready
    for tx in txs:
        assert tx.done
        res = tx.result.recipients
        assert [r.address for r in res] == RCPTS
        assert all(200 <= r.code <= 599 for r in res)
        if test_mode:
            assert not any(r.stage == "body" for r in res)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=12), st.booleans(), st.booleans())
def test_fuzz_arbitrary_bytes(chunks, starttls, test_mode):
    drive(chunks, starttls, test_mode)


_LINES = st.sampled_from([
    b"220 mx ESMTP\r\n", b"250 ok\r\n", b"250-mx\r\n", b"250-PIPELINING\r\n", b"250-STARTTLS\r\n",
    b"250 SIZE 100\r\n", b"250 8BITMIME\r\n", b"354 go\r\n", b"421 4.3.2 bye\r\n",
    b"451 4.7.1 later\r\n", b"452 too many\r\n", b"500 what\r\n", b"502 no\r\n",
    b"550 5.1.1 unknown\r\n", b"554 no\r\n", b"221 bye\r\n", b"250\n", b"220-multi\r\n",
    b"hello\r\n", b"\r\n", b"999 x\r\n", b"25", b"0 ok\r\n"])


@settings(max_examples=600, deadline=None)
@given(st.lists(st.lists(_LINES, max_size=4).map(b"".join), max_size=16), st.booleans(),
       st.booleans())
def test_fuzz_plausible_replies(chunks, starttls, test_mode):
    drive(chunks, starttls, test_mode)


_REACTIVE = st.sampled_from([
    b"220 mx ESMTP\r\n", b"250 ok\r\n", b"250 ok\r\n", b"250 2.1.5 ok\r\n", b"354 go\r\n",
    b"354 go\r\n", b"250-mx\r\n250-PIPELINING\r\n250-STARTTLS\r\n250-SIZE 1000\r\n250 8BITMIME\r\n",
    b"250-mx\r\n250 SIZE 5\r\n", b"250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n",
    b"451 4.7.1 later\r\n", b"550 5.1.1 unknown\r\n", b"502 no\r\n", b"421 4.3.2 bye\r\n",
    b"221 bye\r\n", b"garbage\r\n", b"250-unfinished\r\n"])


_EXPECTED = {"GREETING": b"220 mx\r\n", "EHLO": b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n",
             "STARTTLS": b"220 go\r\n", "DATA": b"354 go\r\n", "QUIT": b"221 bye\r\n"}


@settings(max_examples=400, deadline=None)
@given(st.data(), st.booleans(), st.booleans())
def test_fuzz_reactive_server(data, starttls, test_mode):
    """A server that answers whatever the client is waiting for with plausible or wrong replies,
    split at random points, so the fuzzing reaches DATA, the body and connection reuse."""
    c = SMTPClient("client.test", starttls=starttls)
    txs = []
    for _ in range(30):
        if c.is_finished:
            break
        if c.state is State.TLS_PENDING:
            c.tls_started()
        if c.is_ready:
            if len(txs) == 3:
                break
            txs.append(c.start_transaction("s@y.test", RCPTS, MSG, test_mode=test_mode))
        c.data_to_send()
        if data.draw(st.integers(0, 9)) < 6:  # mostly the reply that moves the session on
            reply = _EXPECTED.get(c.waiting_for, b"250 ok\r\n")
        else:
            reply = data.draw(_REACTIVE | st.binary(max_size=12))
        cut = data.draw(st.integers(0, len(reply)))
        c.receive_data(reply[:cut])
        c.receive_data(reply[cut:])
    if data.draw(st.booleans()):
        c.timed_out()
    c.connection_lost()
    assert c.is_finished
    for tx in txs:
        res = tx.result.recipients
        assert tx.done and [r.address for r in res] == RCPTS
        assert all(200 <= r.code <= 599 for r in res)
        if test_mode:
            assert not any(r.stage in ("body", "data") for r in res)
        assert not any(300 <= r.code < 400 for r in res)
        if any(r.stage == "body" and r.ok for r in res):
            assert tx.result.reply.code // 100 == 2
