"""client.enqueue(): the manual's sendMessage helper writes a drop-in the engine picks up."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailengine import client
from mailengine.envelope import parse_inf
from mailengine.queue_dirs import DIRS
from mailengine.spool import Spool

ROOT = Path(__file__).resolve().parent.parent


def test_enqueue_writes_a_dropin_that_parses_and_is_found(tmp_path):
    mailq = tmp_path / "mailq"
    mid = client.enqueue(mailq, "joe@hotmail.example", "munster@yahoo.example, dracula@aol.example",
                         ["From: joe@hotmail.example", "Subject: hi"], "Message text")
    assert sorted(os.listdir(mailq / "retry")) == [f"{mid}.dat", f"{mid}.inf"]
    m = parse_inf((mailq / "retry" / f"{mid}.inf").read_bytes(), mid)
    assert m.mail_from == "joe@hotmail.example"
    assert m.rcpt_to_send == ["munster@yahoo.example", "dracula@aol.example"]
    assert m.log and "enqueue" in m.log[0]
    spool = Spool(mailq)
    found, warnings = spool.scan_dropins(set())
    assert [f.id for f in found] == [mid] and warnings == []
    assert found[0].size == len((mailq / "retry" / f"{mid}.dat").read_bytes())
    # nothing left behind in mailq/ but the queue directories
    assert sorted(os.listdir(mailq)) == ["retry"]


def test_line_ends_become_crlf_and_headers_come_first(tmp_path):
    mid = client.enqueue(tmp_path, "a@b.example", ["c@d.example"],
                         "From: a@b.example\nSubject: x\n", "line1\nline2\r\nline3\rend",
                         add_missing_headers=False)
    data = (tmp_path / "retry" / f"{mid}.dat").read_bytes()
    assert data == (b"From: a@b.example\r\nSubject: x\r\n\r\n"
                    b"line1\r\nline2\r\nline3\r\nend\r\n")


def test_bytes_body_is_kept_and_date_and_message_id_added_when_missing(tmp_path):
    body = "Grüße\n".encode("utf-8") + b"\xff\xfe raw\n"
    mid = client.enqueue(tmp_path, "a@b.example", "c@d.example", ["Subject: x"], body,
                         hostname="mx.example")
    data = (tmp_path / "retry" / f"{mid}.dat").read_bytes()
    head, _, got_body = data.partition(b"\r\n\r\n")
    assert got_body == body.replace(b"\n", b"\r\n")
    names = [line.split(b":")[0] for line in head.split(b"\r\n")]
    assert names == [b"Subject", b"Date", b"Message-ID"]
    assert b"@mx.example>" in head


def test_present_date_and_message_id_are_not_duplicated(tmp_path):
    mid = client.enqueue(tmp_path, "a@b.example", "c@d.example",
                         ["Date: Fri, 22 Dec 2000 16:28:56 -0800", "message-id: <1@x>"], "x")
    head = (tmp_path / "retry" / f"{mid}.dat").read_bytes().split(b"\r\n\r\n")[0]
    assert head.count(b"Date:") == 1 and head.lower().count(b"message-id:") == 1


@pytest.mark.parametrize("rcpts", ["", " , ", [], ["not-an-address"], ["a\x00b@c.example"],
                                   ["a b@c.example"], ["a@b@c.example"], ["a@-bad-.example"]])
def test_bad_recipients_queue_nothing(tmp_path, rcpts):
    with pytest.raises(ValueError):
        client.enqueue(tmp_path, "a@b.example", rcpts, "Subject: x", "x")
    assert os.listdir(tmp_path / "retry") == []
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")] == []


def test_a_sender_that_is_not_an_address_queues_nothing(tmp_path):
    with pytest.raises(client.InfError, match="is not an address"):
        client.enqueue(tmp_path, "joe at example", ["a@c.example"], "Subject: x", "x")
    assert os.listdir(tmp_path / "retry") == []
    assert client.enqueue(tmp_path, "", ["a@c.example"], "Subject: x", "x")  # <> is fine


def test_quoted_local_parts_with_a_comma_or_space_are_queued(tmp_path):
    rcpts = ['"a,b"@c.example', '"john doe"@c.example']  # a list: a comma string would split them
    mid = client.enqueue(tmp_path, "a@b.example", rcpts, "Subject: x", "x")
    inf = parse_inf((tmp_path / "retry" / f"{mid}.inf").read_bytes(), mid)
    assert inf.rcpt_to_send == rcpts


def test_an_id_already_in_retry_is_never_overwritten(tmp_path, monkeypatch):
    (tmp_path / "retry").mkdir()
    (tmp_path / "retry" / "Taken@h.dat").write_bytes(b"someone else's message")
    ids = iter(["Taken@h", "Free@h"])
    monkeypatch.setattr(client, "make_id", lambda host: next(ids))
    mid = client.enqueue(tmp_path, "a@b.example", "c@d.example", "Subject: x", "mine")
    assert mid == "Free@h"
    assert (tmp_path / "retry" / "Taken@h.dat").read_bytes() == b"someone else's message"
    assert sorted(os.listdir(tmp_path / "retry")) == ["Free@h.dat", "Free@h.inf", "Taken@h.dat"]


def test_dat_arrives_before_inf(tmp_path, monkeypatch):
    # the engine looks for .inf files: the .dat must already be there when the .inf appears
    seen = []
    real = client._place

    def spy(src, dst):
        seen.append((Path(dst).suffix, sorted(os.listdir(Path(dst).parent))))
        return real(src, dst)
    monkeypatch.setattr(client, "_place", spy)
    mid = client.enqueue(tmp_path, "a@b.example", "c@d.example", "Subject: x", "x")
    assert seen == [(".dat", []), (".inf", [f"{mid}.dat"])]


def test_enqueue_from_another_program_without_an_engine(tmp_path):
    code = ("import sys; from mailengine.client import enqueue; "
            "print(enqueue(sys.argv[1], 'a@b.example', 'c@d.example,e@f.example', "
            "'Subject: from a script', 'hello'))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "mailq")], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    mid = out.stdout.strip()
    spool = Spool(tmp_path / "mailq")
    rep = spool.recover()  # an engine starting later finds it too
    assert [m.id for m in rep.messages] == [mid] and rep.warnings == []
    assert all((tmp_path / "mailq" / d).is_dir() for d in DIRS)
