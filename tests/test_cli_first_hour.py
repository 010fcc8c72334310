"""A newcomer's first hour (issue 16), each step as a new user takes it from the shell: typos in
the config file, `config set` with lists, `--help`, output piped into `head`, test mode kept
apart, `init`, overrides shown, the log of what was delivered, `sendmail` and `mailq`, and the
original product's `config/` directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mailengine import config
from mailengine.testing.engine import free_port

from test_cli_queue import run_cli

REPO = Path(__file__).resolve().parent.parent


def cli(home: Path | None, *args: str, stdin: str | None = None, timeout: float = 60,
        ) -> subprocess.CompletedProcess:
    """`python -m mailengine.cli [--home HOME] ARGS` as a user runs it: a separate process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MAILENGINE_HOME", None)
    return subprocess.run([sys.executable, "-m", "mailengine.cli",
                           *(["--home", str(home)] if home else []), *args],
                          capture_output=True, text=True, timeout=timeout, input=stdin, env=env,
                          cwd=str(home) if home and home.is_dir() else None)


# ---------------------------------------------------------------- 4. typos stop the start

def test_a_misspelt_key_or_section_stops_the_start_and_names_the_real_one(tmp_path):
    port = free_port()
    (tmp_path / "mailengine.toml").write_text(f"[network]\nsmtp_prot = {port}\n")
    out = cli(tmp_path, "start")
    assert out.returncode == 2
    assert "network.smtp_prot: no such setting (did you mean network.smtp_port?)" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "mailq").exists()
    (tmp_path / "mailengine.toml").write_text(f"[netwrok]\nsmtp_port = {port}\n")
    out = cli(tmp_path, "start")
    assert out.returncode == 2 and "[netwrok]: no such section (did you mean [network]?)" \
        in out.stderr
    assert not (tmp_path / "mailq").exists()
    out = cli(tmp_path, "config", "show")
    assert out.returncode == 2 and "did you mean [network]?" in out.stderr


def test_config_upgrade_still_reports_old_keys_in_the_home_and_the_old_file(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "mailengine.toml").write_text("[queue]\nold_knob = 1\n")
    old = tmp_path / "old.toml"
    old.write_text("[network]\nsmtp_port = 2600\nsmtp_prot = 3\n[ancient]\nthing = 1\n")
    code, out = run_cli(home, "config", "upgrade", str(old))
    assert code == 0, out
    assert "carried 1 value" in out and "network.smtp_prot" in out and "ancient.thing" in out
    assert "warning: queue.old_knob: no such setting" in out


# ---------------------------------------------------------------- 3. config set and lists

def test_config_set_takes_plain_lists_and_toml_arrays_and_says_so_when_wrong(tmp_path):
    config.load(tmp_path)
    for text in ("1,5,30", "1, 5, 30", "[1, 5, 30]"):
        code, out = run_cli(tmp_path, "config", "set", "queue.retry_intervals", text)
        assert code == 0, out
        assert config.load(tmp_path).queue.retry_intervals == [1.0, 5.0, 30.0]
    code, out = run_cli(tmp_path, "config", "set", "queue.retry_intervals", "1,soon")
    assert code == 2 and "must be a list of numbers" in out and "1,5,30 or [1, 5, 30]" in out
    code, out = run_cli(tmp_path, "config", "set", "queue.retry_intervals", "[1, 5")
    assert code == 2 and "not a TOML array" in out and out.count("1,5,30") == 1
    code, out = run_cli(tmp_path, "config", "set", "policy.relay_ips", "127.0.0.1,10.0.0.0/8")
    assert code == 0 and config.load(tmp_path).policy.relay_ips == ["127.0.0.1", "10.0.0.0/8"]
    # dns_servers entries hold commas: plain text is one entry, several a TOML array
    entry = "example.com,mx.example.com,MX,127.0.0.1:2525"
    code, out = run_cli(tmp_path, "config", "set", "basic.dns_servers", entry)
    assert code == 0, out
    assert config.load(tmp_path).basic.dns_servers == [entry]
    two = '["a.test,mx.a.test,MX,127.0.0.1:5353", "b.test,mx.b.test,MX,127.0.0.1:2526"]'
    code, out = run_cli(tmp_path, "config", "set", "basic.dns_servers", two)
    assert code == 0 and len(config.load(tmp_path).basic.dns_servers) == 2
    code, out = run_cli(tmp_path, "config", "set", "basic.dns_servers", "example.com,mx")
    assert code == 2 and "must be 'domain,hostname,MX|NS,ip'" in out and "TOML array" in out
    # the same rules for a one-run override on the command line
    code, out = run_cli(tmp_path, "--dns-servers", entry, "--retry-intervals", "2,4",
                        "config", "show", "basic.dns_servers")
    assert code == 0 and f'["{entry}"]' in out


# ---------------------------------------------------------------- 6. output piped into head

def test_output_piped_into_a_reader_that_stops_is_no_traceback(tmp_path):
    from mailengine.client import enqueue
    config.load(tmp_path)
    msg_id = enqueue(tmp_path / "mailq", "a@src.test", ["b@dst.test"], ["Subject: x"], "x\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    commands = (["config", "show"], ["queue", "list"], ["queue", "list", "--messages"],
                ["queue", "show", msg_id], ["install-service", "--unit-dir", str(tmp_path)])
    for args in commands:
        # the reader is gone before the command writes: every write meets a closed pipe
        proc = subprocess.Popen([sys.executable, "-m", "mailengine.cli", "--home",
                                 str(tmp_path), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        proc.wait(60)
        assert "Traceback" not in err and "BrokenPipe" not in err, (args, err)
        (tmp_path / "mailengine.service").unlink(missing_ok=True)
    # and the way a user writes it
    out = subprocess.run(f"{sys.executable} -m mailengine.cli --home {tmp_path} config show "
                         "| head -1", shell=True, capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.stdout.startswith("basic.nameservers = ") and len(out.stdout.splitlines()) == 1
    assert out.stderr == ""


# ---------------------------------------------------------------- 5. --help, and test mode

def test_every_help_prints_help_and_does_nothing_else(tmp_path):
    home = tmp_path / "empty"
    home.mkdir()
    for command in ("start", "test", "-bd", "shutdown", "version", "gettcpip", "dkim", "queue",
                    "config", "status", "send", "install-service", "remove-service", "init"):
        for flag in ("--help", "-h"):
            out = cli(home, command, flag, timeout=30)
            assert out.returncode == 0, (command, out.stdout, out.stderr)
            assert "usage: mailengine" in out.stdout, (command, out.stdout)
            assert list(home.iterdir()) == [], (command, list(home.iterdir()))
    out = cli(home, "test", "--help", timeout=30)
    assert "test mode" in out.stdout


def test_test_mode_is_seen_by_status_and_shutdown_and_its_results_kept_apart(tmp_path):
    from mailengine.testing.engine import RunningEngine, wait_until
    from test_cli_queue import Sink, send
    sink = Sink()
    (tmp_path / "mailq" / "retry").mkdir(parents=True)  # a normal queue from an earlier run
    try:
        eng = RunningEngine(tmp_path, {"queue.pause_sending": False,
                                       "basic.dns_servers": [sink.pin("dst.test")]},
                            command="test").start()
        try:
            send(eng, ["ann@dst.test"])
            events = tmp_path / "log" / "events-test.jsonl"
            wait_until(lambda: events.exists() and "ann@dst.test" in events.read_text(),
                       what="the test-mode event line")
            code, out = run_cli(tmp_path, "status")
            assert code == 0 and "in TEST MODE" in out, out
            out = cli(tmp_path, "shutdown")
            assert out.returncode == 0, out.stdout + out.stderr
            assert "test mode" in out.stdout and "stopped" in out.stdout
            assert eng.proc.wait(10) == 0
        finally:
            eng.stop()
        assert sink.sink.messages == []  # RSET + QUIT: nothing delivered
    finally:
        sink.close()
    import json
    rec = json.loads(events.read_text().splitlines()[0])
    assert rec["test"] is True and rec["result"] == "tested" and rec["rcpt"] == "ann@dst.test"
    assert not (tmp_path / "log" / "events.jsonl").exists()
    assert not (tmp_path / "mailq" / "retry" / "shutdown.txt").exists()  # nothing stale
    out = cli(tmp_path, "shutdown")
    assert out.returncode == 1 and "not running" in out.stderr
    assert not (tmp_path / "mailq" / "retry" / "shutdown.txt").exists()


# ---------------------------------------------------------------- 8. init, and overrides shown

def test_init_writes_the_home_and_starts_nothing(tmp_path):
    home = tmp_path / "home"
    out = cli(home, "--relay-ips", "10.0.0.300", "init")
    assert out.returncode == 2 and "is not an IP address" in out.stderr
    assert not (home / "mailengine.toml").exists()
    port = free_port()
    out = cli(home, "--smtp-port", str(port), "--web-port", "0", "init")
    assert out.returncode == 0, out.stderr
    assert f"network.smtp_port = {port}" in out.stdout
    text = (home / "mailengine.toml").read_text()
    assert text.startswith("# MailEngine configuration.") and "# SMTP port." in text
    cfg = config.load(home)
    assert cfg.network.smtp_port == port and cfg.network.web_port == 0
    assert (home / "mailq" / "retry").is_dir() and (home / "log").is_dir()
    import socket
    with socket.socket() as s:  # nothing was started on the port
        assert s.connect_ex(("127.0.0.1", port)) != 0
    out = cli(home, "--smtp-port", "2600", "init")
    assert out.returncode == 2 and "config set" in out.stderr
    assert config.load(home).network.smtp_port == port
    out = cli(home, "init")
    assert out.returncode == 0 and "left as it is" in out.stdout
