"""Signed per-recipient tokens (recipient_token.py): made here, verified here, forged nowhere."""
from __future__ import annotations

import multiprocessing
import os
import stat

from mailengine import recipient_token as rt


def test_round_trip_names_the_recipient_and_sender_domain():
    secret = b"k" * 32
    tok = rt.make(secret, "Alice@Example.COM", "News.Example", issued=1_700_000_000)
    who = rt.verify(secret, tok)
    assert who == rt.Recipient("alice@example.com", "news.example", 1_700_000_000)
    assert all(c.isalnum() or c in "-_." for c in tok)  # safe in a URL and a mailto


def test_another_key_or_a_changed_address_is_refused():
    secret = b"k" * 32
    tok = rt.make(secret, "alice@example.com", "news.example")
    assert rt.verify(b"x" * 32, tok) is None
    body, sig = tok.split(".")
    forged_body = rt._b64(rt._unb64(body).replace(b"alice", b"bobby"))
    assert rt.verify(secret, f"{forged_body}.{sig}") is None  # moved to another address
    other = rt.make(secret, "bob@example.com", "news.example")
    assert rt.verify(secret, f"{body}.{other.split('.')[1]}") is None  # signatures don't swap


def test_garbage_is_refused_without_raising():
    secret = b"k" * 32
    for junk in ["", ".", "a.b", "!!!.???", "x" * 5000, "a.b.c", rt._b64(b"v1|x") + ".AAAA",
                 None, 12]:
        assert rt.verify(secret, junk) is None
    # correctly signed but not a token's shape
    import hashlib, hmac
    payload = b"v2|a@b|c|1"
    mac = hmac.new(secret, payload, hashlib.sha256).digest()[:16]
    assert rt.verify(secret, f"{rt._b64(payload)}.{rt._b64(mac)}") is None


def _secret_of(home, q):
    q.put(rt.load_secret(home))


def test_the_key_is_made_once_private_and_shared_by_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_secret_of, args=(tmp_path, q)) for _ in range(4)]
    for p in procs:
        p.start()
    keys = {q.get(timeout=10) for _ in procs}
    for p in procs:
        p.join()
    assert len(keys) == 1 and len(next(iter(keys))) == 32
    assert keys == {rt.load_secret(tmp_path)}
    mode = stat.S_IMODE(os.stat(tmp_path / rt.KEY_FILE).st_mode)
    assert mode == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [rt.KEY_FILE]  # no temporary files left
