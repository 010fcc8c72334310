"""`mailengine suppress add|remove|list|check|import|export` (suppression_cli.py)."""
from __future__ import annotations

import json
import shutil

import pytest

from mailengine import config
from mailengine.suppression import SuppressionStore

from test_cli_queue import run_cli


@pytest.fixture
def home(tmp_path):
    config.load(tmp_path)
    return tmp_path


def test_add_list_check_remove(home):
    code, out = run_cli(home, "suppress", "add", "A@x.test", "b@x.test", "--reason", "asked us")
    assert code == 0 and "suppressed a@x.test" in out
    code, out = run_cli(home, "suppress", "add", "c@x.test", "--sender-domain", "news.test",
                        "--source", "unsubscribe", "--days", "30")
    assert code == 0 and "for mail from news.test until 20" in out
    code, out = run_cli(home, "suppress", "list")
    assert code == 0 and "3 of 3 entries" in out
    assert "a@x.test\t*\tmanual\t" in out and "c@x.test\tnews.test\tunsubscribe" in out
    code, out = run_cli(home, "suppress", "list", "--json", "--source", "unsubscribe")
    [line] = [x for x in out.splitlines() if x.startswith("{")]
    assert json.loads(line)["sender_domain"] == "news.test"
    assert run_cli(home, "suppress", "check", "c@x.test", "--from", "x@news.test")[0] == 0
    code, out = run_cli(home, "suppress", "check", "c@x.test", "--from", "x@other.test")
    assert code == 1 and "not suppressed" in out
    assert run_cli(home, "suppress", "remove", "a@x.test")[0] == 0
    code, out = run_cli(home, "suppress", "remove", "a@x.test")
    assert code == 1 and "no entry for all senders" in out
    s = SuppressionStore(home)
    assert s.lookup("a@x.test") is None and s.lookup("b@x.test").reason == "asked us"
    s.close()


def test_bad_input_is_a_clear_error_and_adds_nothing(home):
    code, out = run_cli(home, "suppress", "add", "ok@x.test", "not-an-address")
    assert code == 2 and "not an e-mail address: 'not-an-address'" in out
    assert "Traceback" not in out
    bad = home / "bad.csv"
    bad.write_text("address,reason\nz@x.test,fine\n@x,broken\n")
    code, out = run_cli(home, "suppress", "import", str(bad))
    assert code == 2 and "line 3" in out
    code, out = run_cli(home, "suppress", "list")
    assert "0 of 0 entries" in out
    code, out = run_cli(home, "suppress", "import", str(home / "missing.csv"))
    assert code == 1 and "No such file" in out


def test_export_then_import_elsewhere(home, tmp_path):
    run_cli(home, "suppress", "add", "a@x.test", "--until", "2031-01-01T00:00:00Z")
    run_cli(home, "suppress", "add", "b@x.test", "--sender-domain", "s.test")
    out_file = tmp_path / "list.csv"
    code, out = run_cli(home, "suppress", "export", str(out_file))
    assert code == 0 and "exported 2 entries" in out
    assert "a@x.test,,added by hand,manual," in out_file.read_text()
    assert "2031-01-01T00:00:00Z" in out_file.read_text()
    other = tmp_path / "other"
    other.mkdir()
    config.load(other)
    code, out = run_cli(other, "suppress", "import", str(out_file))
    assert code == 0 and "imported 2 entries" in out
    code, out = run_cli(other, "suppress", "check", "b@x.test", "--from", "me@s.test")
    assert code == 0 and "suppressed for mail from s.test" in out


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is installed by .ci/run")
def test_with_redis_the_change_reaches_redis_before_the_command_ends(home):
    from test_shared import RedisServer
    srv = RedisServer().start()
    try:
        (home / "mailengine.toml").write_text(
            (home / "mailengine.toml").read_text().replace(
                'redis_url = ""', f'redis_url = "{srv.url}"'))
        code, out = run_cli(home, "suppress", "add", "r@x.test")
        assert code == 0, out
        assert srv.client().hget("mailengine:suppression:entries", "r@x.test\t")
    finally:
        srv.stop()
