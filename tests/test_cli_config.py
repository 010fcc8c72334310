"""`mailengine config show|set|upgrade`: checked like the engine checks, comments kept, a running
engine told (and really changed), an upgrade from the earliest committed config format."""
from __future__ import annotations

import importlib.util
import smtplib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mailengine import config
from mailengine.testing.engine import RunningEngine

from test_cli_queue import run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "mailengine-e619baa.toml"
REPO = Path(__file__).resolve().parent.parent


def old_default_toml() -> str | None:
    """default_toml() of config.py at commit e619baa, or None without git history."""
    try:
        src = subprocess.run(["git", "-C", str(REPO), "show", "e619baa:mailengine/config.py"],
                             capture_output=True, check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader("mailengine_config_e619baa", loader=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    try:
        exec(compile(src, "config@e619baa", "exec"), mod.__dict__)
        return mod.default_toml()
    finally:
        del sys.modules[spec.name]


def new_home(tmp_path: Path, name: str = "home") -> Path:
    home = tmp_path / name
    config.load(home)  # writes this release's commented default file
    return home


# ---------------------------------------------------------------- show

def test_show_all_one_key_a_section_and_changed(tmp_path):
    home = new_home(tmp_path)
    code, out = run_cli(home, "config", "show")
    assert code == 0
    assert len(out.splitlines()) == len(config.SETTINGS)
    assert "network.smtp_port = 25" in out and 'policy.relay_ips = ["127.0.0.1"]' in out
    code, out = run_cli(home, "config", "show", "queue.pause_sending")
    assert out.splitlines()[0] == "queue.pause_sending = false"
    assert "Stop all outbound SMTP" in out and "applies to a running engine at once" in out
    assert "read by the SMTP intake processes and the engine process" in out  # its scope
    code, out = run_cli(home, "config", "show", "limits.max_send_rate")
    assert "read by the engine process (delivery)" in out
    code, out = run_cli(home, "config", "show", "network.smtp_port")
    assert "takes effect after restart" in out
    code, out = run_cli(home, "config", "show", "limits")
    assert all(line.startswith("limits.") for line in out.splitlines())
    code, out = run_cli(home, "config", "show", "--changed")
    assert out == ""
    code, out = run_cli(home, "config", "show", "nothing.here")
    assert code == 2 and "no such setting or section" in out


def test_show_and_set_mask_secrets(tmp_path):
    """The webhook signing secret and passwords in URLs never reach the terminal: `show` (all,
    a section, one key, --changed) and `set`'s echo give "********", and whether one is set."""
    home = new_home(tmp_path)
    code, out = run_cli(home, "config", "show", "webhooks.secret")
    assert out.splitlines()[0] == 'webhooks.secret = ""'  # not set: shown as not set
    for key, value in (("webhooks.secret", "whsec-cli-secret-1"),
                       ("shared.redis_url", "redis://:redis-pw-2@127.0.0.1:6379/0"),
                       ("webhooks.urls", "https://crm:hook-pw-3@crm.example/hook")):
        code, out = run_cli(home, "config", "set", key, value)
        assert code == 0, out
        assert "********" in out and "secret-1" not in out and "-pw-" not in out, out
    data = tomllib.loads((home / config.CONFIG_FILE).read_text())  # the file has them
    assert data["webhooks"]["secret"] == "whsec-cli-secret-1"
    assert data["shared"]["redis_url"] == "redis://:redis-pw-2@127.0.0.1:6379/0"
    for args in ((), ("--changed",), ("webhooks",), ("shared",), ("webhooks.secret",),
                 ("shared.redis_url",), ("webhooks.urls",)):
        code, out = run_cli(home, "config", "show", *args)
        assert code == 0
        assert "secret-1" not in out and "redis-pw-2" not in out and "hook-pw-3" not in out, out
    code, out = run_cli(home, "config", "show", "--changed")
    assert 'webhooks.secret = "********"' in out
    assert 'shared.redis_url = "redis://:********@127.0.0.1:6379/0"' in out
    assert 'webhooks.urls = ["https://crm:********@crm.example/hook"]' in out
    code, out = run_cli(home, "config", "set", "webhooks.urls", "ftp://u:bad-pw-4@h.example/x")
    assert code == 2 and "not an http://" in out and "bad-pw-4" not in out  # the refusal too


# ---------------------------------------------------------------- set

def test_set_checks_the_value_and_keeps_the_file_as_it_was(tmp_path):
    home = new_home(tmp_path)
    path = home / "mailengine.toml"
    before = path.read_text()
    for key, value, why in (("limits.max_recipients", "0", "must be at least 1"),
                            ("policy.relay_ips", "10.0.0.300", "is not an IP address"),
                            ("queue.pause_sending", "maybe", "must be true or false"),
                            ("network.smtp_port", "70000", "must be at most 65535")):
        code, out = run_cli(home, "config", "set", key, value)
        assert code == 2 and "Not changed" in out and why in out, out
    code, out = run_cli(home, "config", "set", "limits.max_recipent", "5")
    assert code == 2 and "no such setting" in out
    code, out = run_cli(home, "config", "set", "max_recipients", "5")
    assert code == 2 and "did you mean limits.max_recipients" in out
    assert path.read_text() == before


def test_set_changes_one_line_and_keeps_comments(tmp_path):
    home = new_home(tmp_path)
    path = home / "mailengine.toml"
    before = path.read_text().splitlines()
    code, out = run_cli(home, "config", "set", "policy.relay_ips", "127.0.0.1,10.0.0.0/8")
    assert code == 0 and "not running: it takes effect when the engine starts" in out
    code, out = run_cli(home, "config", "set", "queue.retry_intervals", "[1, 2.5, 10]")
    assert code == 0
    after = path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert changed == [('relay_ips = ["127.0.0.1"]', 'relay_ips = ["127.0.0.1", "10.0.0.0/8"]'),
                       ("retry_intervals = [30, 120, 240, 480, 960]",
                        "retry_intervals = [1, 2.5, 10]")]
    assert len(before) == len(after)
    cfg = config.load(home)
    assert cfg.policy.relay_ips == ["127.0.0.1", "10.0.0.0/8"]
    assert cfg.queue.retry_intervals == [1.0, 2.5, 10.0]
    # the cross-check of the whole file still speaks
    code, out = run_cli(home, "config", "set", "queue.queue_check_interval", "3600")
    assert code == 0 and "warning: queue.queue_check_interval = 3600s is longer" in out


def test_set_adds_a_missing_key_and_section(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    (home / "mailengine.toml").write_text("# my own short file\n[network]\nsmtp_port = 2525 "
                                          "# not the default\n")
    code, out = run_cli(home, "config", "set", "dkim.missing_key", "hold")
    assert code == 0
    code, out = run_cli(home, "config", "set", "network.smtp_port", "2626")
    text = (home / "mailengine.toml").read_text()
    assert text.startswith("# my own short file\n")
    assert "smtp_port = 2626 # not the default" in text
    data = tomllib.loads(text)
    assert data == {"network": {"smtp_port": 2626}, "dkim": {"missing_key": "hold"}}


def test_set_on_a_running_engine_applies_now_or_after_restart(tmp_path):
    with RunningEngine(tmp_path) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            assert s.sendmail("a@src.test", ["x@far.test"], b"Subject: 1\r\n\r\n1\r\n") == {}
        code, out = run_cli(tmp_path, "config", "set", "policy.relay_ips", "10.9.9.9")
        assert code == 0 and f"Applied to the running engine (pid {eng.proc.pid})" in out
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            s.ehlo()
            s.mail("a@src.test")
            code_, text = s.rcpt("x@far.test")
        assert code_ == 554 and b"relay not approved" in text
        code, out = run_cli(tmp_path, "config", "set", "network.smtp_port", "2799")
        assert code == 0 and "keeps the old value: this setting takes effect after restart" in out
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:  # still the old port
            assert s.noop()[0] == 250
    assert config.load(tmp_path).network.smtp_port == 2799
    assert "config: policy.relay_ips = ['10.9.9.9']" in eng.read_output()


# ---------------------------------------------------------------- upgrade

def test_fixture_is_what_the_earliest_release_wrote():
    text = old_default_toml()
    if text is None:
        pytest.skip("no git history of mailengine/config.py here")
    body = "".join(FIXTURE.read_text().splitlines(True)[2:])  # after the 2-line provenance note
    assert body == text


def test_upgrade_from_the_earliest_config_format(tmp_path):
    old_home = tmp_path / "old"
    old_home.mkdir()
    old = FIXTURE.read_text()
    for a, b in (("smtp_port = 25\n", "smtp_port = 2525\n"),
                 ('relay_ips = ["127.0.0.1"]', 'relay_ips = ["127.0.0.1", "192.168.1.0/24"]'),
                 ("retry_intervals = [30, 120, 240, 480, 960]", "retry_intervals = [5, 60]"),
                 ('helo_text = ""', 'helo_text = "mail.example.org"'),
                 ("save_done = false", "save_done = true"),
                 ("max_errors = 20", "max_errors = 20\n# an operator's own note\nold_knob = 3"),
                 ("max_threads = 500", "max_threads = 0")):  # obsolete today (issue 15.9)
        assert a in old
        old = old.replace(a, b)
    old += "\n[ancient]\nthing = 1\n"
    (old_home / "mailengine.toml").write_text(old)

    home = new_home(tmp_path, "new")
    path = home / "mailengine.toml"
    run_cli(home, "config", "set", "dkim.missing_key", "hold")  # a new key, set before
    before = path.read_text()

    code, out = run_cli(home, "config", "upgrade", str(old_home), "--dry-run")
    # 8: web_ip = "" too, the old default, now that the default is 127.0.0.1 (issue 16), and
    # messages_in_memory = 500000, now 20000 (issue 12)
    assert code == 0 and "would carry 8 values" in out and path.read_text() == before

    code, out = run_cli(home, "config", "upgrade", str(old_home))
    assert code == 0, out
    assert "carried 8 values" in out
    assert 'network.web_ip = ""  (default "127.0.0.1")' in out  # reported, to be checked
    assert "limits.messages_in_memory = 500000  (default 20000)" in out
    for line in ("network.smtp_port = 2525", 'network.helo_text = "mail.example.org"',
                 "queue.retry_intervals = [5, 60]", "queue.save_done = true",
                 "network.intake_workers = 1  (default 0)",
                 "limits.old_knob", "ancient.thing", "limits.max_threads"):
        assert line in out, line
    assert "warning: queue.queue_check_interval = 600s is longer than the shortest retry " \
        "interval (5 min)" in out  # the carried retry intervals meet the new file's check
    cfg = config.load(home)
    assert cfg.network.smtp_port == 2525
    assert cfg.policy.relay_ips == ["127.0.0.1", "192.168.1.0/24"]
    assert cfg.queue.retry_intervals == [5.0, 60.0] and cfg.queue.save_done is True
    assert cfg.network.helo_text == "mail.example.org"
    assert cfg.network.intake_workers == 1  # the old file said so
    assert "limits.max_threads" not in cfg.values  # obsolete: not carried
    code, out = run_cli(home, "config", "set", "limits.max_threads", "100")
    assert code == 2 and "limits.max_threads: obsolete, nothing reads it" in out
    assert cfg.dkim.missing_key == "hold"  # the new file's own value stays
    text = path.read_text()
    # this release's comments and keys stay; nothing but values changed
    for line in before.splitlines():
        if line.startswith("#") or line.startswith("["):
            assert line in text.splitlines(), line
    assert len(text.splitlines()) == len(before.splitlines())
    assert "old_knob" not in text and "ancient" not in text
    assert (home / "mailengine.toml.before-upgrade").read_text() == before
    # a second run finds nothing left to carry
    code, out = run_cli(home, "config", "upgrade", str(old_home / "mailengine.toml"))
    assert "carried 0 values" in out


def test_upgrade_into_a_home_without_a_file_and_refusals(tmp_path):
    old = tmp_path / "old.toml"
    old.write_text(FIXTURE.read_text().replace("smtp_port = 25\n", "smtp_port = 2500\n"))
    home = tmp_path / "fresh"
    home.mkdir()
    (home / "mailengine.toml").write_text(config.default_toml())
    code, out = run_cli(home, "config", "upgrade", str(old))
    assert code == 0 and "carried 4 values" in out  # smtp_port, intake_workers, web_ip,
    # messages_in_memory (the old default)
    assert "# SMTP port. 1 disables SMTP intake." in (home / "mailengine.toml").read_text()
    assert config.load(home).network.smtp_port == 2500
    code, out = run_cli(home, "config", "upgrade", str(home))
    assert code == 2 and "this home's own file" in out
    code, out = run_cli(home, "config", "upgrade", str(tmp_path / "nope.toml"))
    assert code == 2 and "no such file" in out
    (tmp_path / "bad.toml").write_text("[basic\n")
    code, out = run_cli(home, "config", "upgrade", str(tmp_path / "bad.toml"))
    assert code == 2 and "not valid TOML" in out


def test_upgrade_the_way_the_readme_says(tmp_path):
    """Move the old file aside; `config upgrade` writes this release's file and carries."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "mailengine.toml").write_text(
        FIXTURE.read_text().replace('admin_email = ""', 'admin_email = "ops@example.org"'))
    (home / "mailengine.toml").rename(home / "mailengine.toml.old")
    code, out = run_cli(home, "config", "upgrade", str(home / "mailengine.toml.old"))
    assert code == 0 and "carried 4 values" in out  # admin_email, intake_workers, web_ip,
    # messages_in_memory (the old default)
    text = (home / "mailengine.toml").read_text()
    assert text.startswith("# MailEngine configuration.") and "[dkim]" in text
    assert config.load(home).basic.admin_email == "ops@example.org"
    assert not (home / "mailengine.toml.before-upgrade").exists()  # it held only defaults
