"""The suppression store (suppression.py): entries, expiry, sender domains, CSV, the event line,
two processes on one file, and two homes sharing through a real Redis on loopback."""
from __future__ import annotations

import io
import json
import multiprocessing
import shutil
import time

import pytest

from mailengine import suppression
from mailengine.suppression import Entry, SuppressionStore


@pytest.fixture
def store(tmp_path):
    s = SuppressionStore(tmp_path)
    yield s
    s.close()


def test_add_lookup_remove(store, tmp_path):
    e = store.add("Alice@Example.COM", reason="550 5.1.1 user unknown", source="bounce")
    assert isinstance(e, Entry) and e.address == "alice@example.com" and e.sender_domain == ""
    assert e.expires is None and abs(e.created - time.time()) < 5
    assert store.lookup("alice@example.com") == e
    assert store.lookup("<ALICE@example.com>", "any.test") == e  # all senders
    assert store.lookup("bob@example.com") is None
    assert store.remove("ALICE@example.com") is True
    assert store.remove("alice@example.com") is False
    assert store.lookup("alice@example.com") is None
    line = json.loads((tmp_path / "log" / "events.jsonl").read_text().splitlines()[0])
    assert line["event"] == "suppressed" and line["address"] == "alice@example.com"
    assert line["reason"] == "550 5.1.1 user unknown" and line["source"] == "bounce"
    assert line["sender_domain"] == "" and line["expires"] is None and line["time"]


def test_sender_domain_and_expiry(store):
    store.add("a@x.test", reason="unsubscribed", source="unsubscribe", sender_domain="News.Test")
    assert store.lookup("a@x.test", "news.test").sender_domain == "news.test"
    assert store.lookup("a@x.test", "other.test") is None
    assert store.lookup("a@x.test") is None
    store.add("b@x.test", reason="for a while", expires=time.time() + 0.3)
    store.add("c@x.test", reason="long gone", expires=time.time() - 10)
    assert store.lookup("b@x.test") is not None
    assert store.lookup("c@x.test") is None  # expired entries do not count
    assert [e.address for e in store.entries()] == ["a@x.test", "b@x.test"]
    assert len(store.entries(include_expired=True)) == 3
    time.sleep(0.35)
    assert store.lookup("b@x.test") is None
    assert store.purge_expired() == 2 and store.count(include_expired=True) == 1


def test_bad_values_are_refused_clearly(store):
    for bad in ("", "no-at-sign", "a b@x.test", "@x.test"):
        with pytest.raises(ValueError, match="not an e-mail address"):
            store.add(bad, reason="x")
    with pytest.raises(ValueError, match="source must be one of"):
        store.add("a@x.test", reason="x", source="guess")
    with pytest.raises(ValueError, match="not a domain"):
        store.add("a@x.test", reason="x", sender_domain="a b")
    with pytest.raises(ValueError, match="expires"):
        store.add("a@x.test", reason="x", expires="tomorrow")
    assert store.lookup("not an address") is None
    assert store.count() == 0


def test_entries_search_and_paging(store):
    for i in range(25):
        store.add(f"user{i:02d}@x.test", reason="r", source="bounce" if i % 2 else "manual")
    store.add("user_x@y.test", reason="r", sender_domain="s.test")
    assert store.count() == 26
    page = store.entries(limit=10, offset=10)
    assert [e.address for e in page] == [f"user{i:02d}@x.test" for i in range(10, 20)]
    assert [e.address for e in store.entries("user_")] == ["user_x@y.test"]  # '_' is literal
    assert store.count(source="bounce") == 12
    assert [e.address for e in store.entries(sender_domain="s.test")] == ["user_x@y.test"]
    assert store.count(sender_domain="") == 25


def test_csv_round_trip_and_bad_lines(store, tmp_path):
    store.add("a@x.test", reason='550 "quoted", with comma', source="bounce")
    store.add("b@x.test", reason="complaint via ARF", source="complaint", sender_domain="n.test",
              expires=2_000_000_000)
    out = io.StringIO()
    assert store.export_csv(out) == 2
    text = out.getvalue()
    assert text.splitlines()[0] == "address,sender_domain,reason,source,created,expires"
    assert "2033-05-18T03:33:20Z" in text
    other = SuppressionStore(tmp_path / "other")
    try:
        assert other.import_csv(io.StringIO(text)) == 2
        got = {(e.address, e.sender_domain): e for e in other.entries()}
        mine = {(e.address, e.sender_domain): e for e in store.entries()}
        assert got.keys() == mine.keys()
        for k in got:
            assert got[k].reason == mine[k].reason and got[k].source == mine[k].source
            assert got[k].expires == mine[k].expires
            assert abs(got[k].created - mine[k].created) < 1
        # A bare list of addresses (no header); comments and blank lines are skipped.
        assert other.import_csv(io.StringIO("# from the old MTA\nC@x.test\n\nd@x.test,old\n")) == 2
        assert other.lookup("c@x.test").source == "import"
        # One bad line: nothing is added, the error names the line.
        with pytest.raises(ValueError, match="line 3: not an e-mail address"):
            other.import_csv(io.StringIO("address,reason\ne@x.test,r\nnot-an-address,r\n"))
        assert other.lookup("e@x.test") is None
        with pytest.raises(ValueError, match="unknown column"):
            other.import_csv(io.StringIO("address,colour\ne@x.test,red\n"))
    finally:
        other.close()


def _writer(home: str, name: str, n: int, q) -> None:
    s = SuppressionStore(home)
    seen_other = 0
    for i in range(n):
        s.add(f"{name}{i}@x.test", reason="load")
        if s.lookup(f"{'b' if name == 'a' else 'a'}{i // 2}@x.test"):
            seen_other += 1
    s.close()
    q.put(seen_other)


def test_two_processes_share_one_file(tmp_path):
    """Two processes add at once (no 'database is locked'); each sees the other's entries, and a
    long-lived store in a third sees them all without being told."""
    watcher = SuppressionStore(tmp_path)
    assert watcher.lookup("a1@x.test") is None  # loaded, empty
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), name, 150, q)) for name in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    seen = [q.get(timeout=5), q.get(timeout=5)]
    assert sum(seen) > 0  # they ran side by side and saw each other's adds
    assert watcher.count() == 300
    assert all(watcher.lookup(f"{c}{i}@x.test") for c in "ab" for i in range(150))
    assert watcher.remove("a7@x.test")
    other = SuppressionStore(tmp_path)
    assert other.lookup("a7@x.test") is None and other.lookup("a8@x.test")
    other.remove("a8@x.test")
    assert watcher.lookup("a8@x.test") is None  # a removal by another connection: at once
    other.add("new@x.test", reason="r")
    time.sleep(suppression.REFRESH_EVERY)
    assert watcher.lookup("new@x.test") is not None  # an addition: within REFRESH_EVERY
    other.close()
    watcher.close()


# --- Redis ---

needs_redis = pytest.mark.skipif(not shutil.which("redis-server"),
                                 reason="redis-server is installed by .ci/run")


@pytest.fixture
def redis_server():
    from tests.test_shared import RedisServer
    srv = RedisServer().start()
    yield srv
    srv.stop()


def _until(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.05)


@needs_redis
def test_two_homes_share_through_redis(tmp_path, redis_server, monkeypatch):
    monkeypatch.setattr(suppression, "SYNC_EVERY", 0.1)
    a = SuppressionStore(tmp_path / "a", redis_server.url, "t:")
    a.add("early@x.test", reason="before b existed")
    b = SuppressionStore(tmp_path / "b", redis_server.url, "t:")
    try:
        _until(lambda: b.lookup("early@x.test") is not None)
        a.add("x@y.test", reason="complaint via ARF", source="complaint", sender_domain="n.test")
        _until(lambda: b.lookup("x@y.test", "n.test") is not None)
        assert b.lookup("x@y.test", "n.test").source == "complaint"
        b.remove("early@x.test")
        _until(lambda: a.lookup("early@x.test") is None)
        assert a.import_csv(io.StringIO("".join(f"i{i}@x.test\n" for i in range(500)))) == 500
        _until(lambda: b.count() == 501)
        r = redis_server.client()
        assert r.hlen("t:suppression:entries") == 501
    finally:
        a.close()
        b.close()


@needs_redis
def test_redis_down_then_back_loses_nothing(tmp_path, redis_server, monkeypatch):
    """Changes made while Redis is down wait in the file; a Redis that lost its data gets the
    entries back from the engines' files."""
    monkeypatch.setattr(suppression, "SYNC_EVERY", 0.1)
    monkeypatch.setattr("mailengine.shared.OFFLINE_RETRY", 0.1)
    a = SuppressionStore(tmp_path / "a", redis_server.url, "t:")
    try:
        a.add("one@x.test", reason="r")
        _until(lambda: redis_server.client().hlen("t:suppression:entries") == 1)
        redis_server.stop()
        t0 = time.monotonic()
        a.add("two@x.test", reason="while down")  # never waits for Redis
        assert a.lookup("two@x.test") and time.monotonic() - t0 < 0.5
        assert a.sync() is False
        redis_server.start()  # same port, empty
        _until(lambda: redis_server.client().hlen("t:suppression:entries") == 2, 10)
        b = SuppressionStore(tmp_path / "b", redis_server.url, "t:")
        _until(lambda: b.lookup("one@x.test") and b.lookup("two@x.test"))
        b.close()
    finally:
        a.close()


@needs_redis
def test_a_change_not_sent_yet_is_not_undone_by_redis(tmp_path, redis_server):
    """Two processes of one home: one takes in another engine's older change while the other's
    newer change waits in the outbox; the newer one stays and reaches Redis."""
    x = SuppressionStore(tmp_path / "a", redis_server.url, "t:", sync=False)
    y = SuppressionStore(tmp_path / "a", redis_server.url, "t:", sync=False)
    other = SuppressionStore(tmp_path / "b", redis_server.url, "t:", sync=False)
    try:
        x.add("k@x.test", reason="first")
        assert x.sync() and other.sync()
        other.remove("k@x.test")
        assert other.sync()  # the removal is in Redis
        y.add("k@x.test", reason="again")  # newer, not sent yet
        with x.redis._lock:
            x.redis._pull()  # x takes in the removal only, without sending y's change
        assert x.lookup("k@x.test").reason == "again"
        assert y.sync() and other.sync()
        assert other.lookup("k@x.test").reason == "again"
    finally:
        for s in (x, y, other):
            s.close()


def test_times_beyond_year_9999_are_refused(tmp_path):
    """An expiry that cannot be written as a date broke the CSV export and the admin list."""
    store = SuppressionStore(tmp_path)
    for bad in (1e18, -5, float("inf")):
        with pytest.raises(ValueError, match="between 1970 and 9999"):
            store.add("a@b.test", reason="r", expires=bad)
    store.close()


def test_a_lookup_does_not_wait_behind_a_writer(tmp_path):
    """Intake's RCPT check runs on the event loop: while another process holds the file's write
    lock and a thread here waits to add (holding the store's write lock), a lookup still
    answers at once from its own connection (it waited up to the 10 s busy timeout)."""
    import sqlite3
    import threading
    import time as _time
    store = SuppressionStore(tmp_path)
    store.add("old@b.test", reason="r")
    other = sqlite3.connect(tmp_path / "suppression.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing
    adder = threading.Thread(target=lambda: store.add("new@b.test", reason="r"), daemon=True)
    adder.start()
    _time.sleep(0.3)  # the adder now holds the store's write lock, waiting for the file's
    store._next_check = 0.0  # make this lookup ask SQLite too
    t0 = _time.monotonic()
    assert store.lookup("old@b.test") is not None and store.lookup("x@b.test") is None
    assert _time.monotonic() - t0 < 1.0
    other.execute("COMMIT")
    adder.join(15)
    assert store.lookup("new@b.test") is not None
    other.close()
    store.close()


def test_purge_keeps_an_entry_added_again_since_it_looked(tmp_path):
    """purge_expired selects the expired entries, then removes them one by one: one suppressed
    again in between (a new bounce, another process) must stay."""
    import time as _time
    store = SuppressionStore(tmp_path)
    store.add("a@b.test", reason="old", expires=_time.time() - 10)
    assert store.remove("a@b.test", expired_by=_time.time()) is True
    store.add("a@b.test", reason="again", expires=None)  # re-added: never expires
    assert store.remove("a@b.test", expired_by=_time.time()) is False
    assert store.lookup("a@b.test").reason == "again"
    store.add("c@b.test", reason="old", expires=_time.time() - 10)
    assert store.purge_expired() == 1 and store.lookup("a@b.test") is not None
    store.close()
