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


def test_config_show_marks_a_value_given_on_the_command_line(tmp_path):
    config.load(tmp_path)
    code, out = run_cli(tmp_path, "--smtp-port", "2600", "config", "show", "network")
    assert "network.smtp_port = 2600  # --smtp-port on the command line (mailengine.toml: 25)" \
        in out.splitlines()
    assert "network.web_port = 81" in out.splitlines()  # not overridden: not marked
    code, out = run_cli(tmp_path, "--smtp-port", "2600", "config", "show",
                        "network.smtp_port")
    assert out.splitlines()[0].endswith("# --smtp-port on the command line "
                                        "(mailengine.toml: 25)")
    code, out = run_cli(tmp_path, "--smtp-port", "25", "config", "show", "--changed")
    assert out.strip() == "network.smtp_port = 25  # --smtp-port on the command line " \
        "(mailengine.toml: 25)"


# ---------------------------------------------------------------- 1, 2. README, from a clone

def readme_block(title: str) -> list[str]:
    """The shell lines of the first code block after README's `title` heading, continuation
    lines joined, comments and comment-only lines dropped."""
    text = (REPO / "README.md").read_text()
    after = text[text.index(f"\n{title}\n"):]
    lines, joined, started = [], "", False
    for line in after.splitlines()[1:]:
        if line.startswith("    "):
            started = True
            code = line[4:]
            if code.lstrip().startswith("#"):
                continue
            code = code.split("  #", 1)[0].rstrip()
            if code.endswith("\\"):
                joined += code[:-1] + " "
                continue
            lines.append((joined + code).strip())
            joined = ""
        elif started and line.strip():
            break
    return lines


def test_readme_says_make_a_venv_and_points_to_nothing_a_clone_lacks():
    install = readme_block("## The two commands")
    venv = next(i for i, c in enumerate(install) if "python3 -m venv .venv" in c)
    pip = next(i for i, c in enumerate(install) if "pip install -e ." in c)
    assert venv < pip and ". .venv/bin/activate" in install[venv]
    import re
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "../shared" not in text, doc
        assert not re.search(r"\bSPEC( section)? \d", text), (doc, re.findall(r".*SPEC.*", text))


def test_the_quick_tour_works_offline_as_written(tmp_path):
    """Every command of README's quick tour, in a new home, with free ports for 2525/2526: the
    message waits in the queue, is held, released and delivered to the local sink."""
    import signal
    import time
    from mailengine.testing.engine import wait_for_port
    smtp, sink = str(free_port()), str(free_port())
    steps = readme_block("## A quick tour")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    env.pop("MAILENGINE_HOME", None)
    tour = tmp_path / "mailtour"
    expect = {"ls mailq/retry/": ".inf", "cat mailq/retry/*.inf": "rcpttosend=someone@example.com",
              "mailengine queue list --messages": " held ",
              "mailengine shutdown": "stopped"}
    lists = iter(["example.com", "Mail queue is empty."])  # queue list: before, after release
    background: list[subprocess.Popen] = []
    ran = []
    try:
        for step in steps:
            cmd = step.replace("2525", smtp).replace("2526", sink)
            cmd = cmd.replace("python3 -m", f"{sys.executable} -m")
            if cmd.startswith("mailengine "):
                cmd = f"{sys.executable} -m mailengine.cli " + cmd[len("mailengine "):]
            if cmd == "kill %1":
                background[0].send_signal(signal.SIGTERM)
                background[0].wait(10)
                ran.append(step)
                continue
            if cmd.endswith("&"):
                proc = subprocess.Popen(cmd[:-1], shell=True, cwd=tour, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
                background.append(proc)
                wait_for_port("127.0.0.1", int(sink if "sink" in cmd else smtp), 20, proc)
                ran.append(step)
                continue
            want = expect.get(step) or (next(lists) if step == "mailengine queue list" else None)
            if step.startswith("grep "):
                want = "status=sent"
            deadline = time.monotonic() + 15
            while True:
                out = subprocess.run(cmd, shell=True, cwd=tour if tour.exists() else tmp_path,
                                     env=env, capture_output=True, text=True, timeout=60)
                ok = out.returncode == 0 and (want is None or want in out.stdout)
                if ok or time.monotonic() > deadline:
                    break
                time.sleep(0.3)  # delivery after `release` takes a moment
            assert ok, (step, want, out.stdout, out.stderr)
            if step.startswith("grep "):
                assert '"result":"sent"' in out.stdout and f'"port":{sink}' in out.stdout
            ran.append(step)
    finally:
        for proc in background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert any("queue release all" in s for s in ran) and ran[-1] == "kill %1"


# ---------------------------------------------------------------- 7. what was delivered, and why not

def test_the_log_says_what_was_delivered_and_a_deferral_survives_a_restart(tmp_path):
    import json
    import re
    from mailengine.envelope import parse_inf
    from mailengine.testing.engine import RunningEngine, wait_until
    from mailengine.testing.sink import SinkScript
    from test_cli_queue import Sink, send
    from test_web_api import TOKEN, Client, wait_web
    sink = Sink(SinkScript(rcpt={"later@slow.test": "451 4.3.0 Mailbox busy, try later"}))
    (tmp_path / "api-tokens.txt").write_text(f"tests:{TOKEN}\n")
    (tmp_path / "password.txt").write_text("admin:opensesame\n")
    web = free_port()
    settings = {"queue.pause_sending": False, "queue.retry_intervals": [60],
                "network.web_port": web, "network.web_ip": "127.0.0.1",
                "basic.dns_servers": [sink.pin("dst.test"), sink.pin("slow.test")]}
    try:
        with RunningEngine(tmp_path, settings) as eng:
            delivered = send(eng, ["ann@dst.test", "bob@dst.test"])
            deferred = send(eng, ["later@slow.test"])
            logs = lambda: "".join(p.read_text() for p in (tmp_path / "log").glob("*.log"))  # noqa
            wait_until(lambda: logs().count("status=sent") == 2 and "later@slow.test deferred"
                       in logs(), what="two delivered lines and a deferral")
        for rcpt in ("ann@dst.test", "bob@dst.test"):
            assert re.search(rf"{re.escape(delivered)}: to=<{rcpt}>, relay=mx\.dst\.test\["
                             rf"127\.0\.0\.1\]:{sink.sink.port}, delay=\d+\.\d\d, status=sent "
                             rf"\(250 2\.0\.0 Ok: queued as S\d+\)", logs()), logs()
        sent_lines = [ln for ln in logs().splitlines() if "status=sent" in ln]
        assert len(sent_lines) == 2 and all(  # each line stamped, as a record of its own
            re.match(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \S+: to=<", ln) for ln in sent_lines)
        inf = parse_inf((tmp_path / "mailq" / "retry" / f"{deferred}.inf").read_bytes())
        assert "451 4.3.0 Mailbox busy" in inf.extra["lastreply"]
        # After a restart the engine has no memory of it: the .inf does.
        with RunningEngine(tmp_path, settings):
            code, out = run_cli(tmp_path, "queue", "list")
            assert "later@slow.test: 451 4.3.0 Mailbox busy, try later" in out, out
            code, out = run_cli(tmp_path, "queue", "--json", "list")
            assert json.loads(out)["messages"][0]["replies"]["later@slow.test"][1] == \
                "451 4.3.0 Mailbox busy, try later"
            code, out = run_cli(tmp_path, "queue", "show", deferred)
            assert "last reply for later@slow.test" in out and "451 4.3.0" in out
            wait_web(type("E", (), {"web_port": web}))
            r = Client(web).api("GET", f"/api/v1/queue/{deferred}")
            assert r.status == 200, r.text
            assert r.json["last_replies"]["later@slow.test"]["reply"] == \
                "451 4.3.0 Mailbox busy, try later"
            client = Client(web)
            client.login()
            page = client.get(f"/gui/admin/queue/message/{deferred}")
            assert page.status == 200
            assert re.search(r'id="last-reply">later@slow.test \(\d{4}/\d\d/\d\d [\d:]+\): '
                             r'451 4.3.0 Mailbox busy, try later<', page.text), page.text
    finally:
        sink.close()


# ---------------------------------------------------------------- 12. the original product's config/

def test_config_upgrade_reads_the_original_products_config_directory(tmp_path):
    old = tmp_path / "old-mailengine"
    files = {"WebPort.txt": "# Web interface port. 0 disables it.\n8081\n",
             "WebTcpip.txt": "# the address allowed to use the web interface\n192.168.1.124\n",
             "SmtpPort.txt": "2525\n",
             "RelayIps.txt": "# one a line\n127.0.0.1\n192.168.1.0/24\n",
             "RetryIntervals.txt": "5\n60\n",
             "SaveDone.txt": "1\n",
             "HeloText.txt": "mail.example.org\n",
             "MaxThreads.txt": "0\n",  # limits.max_threads is obsolete (issue 15.9)
             "MysteryKnob.txt": "3\n",
             "password.txt": "admin:opensesame\n"}
    (old / "config").mkdir(parents=True)
    for name, text in files.items():
        (old / "config" / name).write_text(text)
    home = tmp_path / "home"
    config.load(home)
    before = (home / "mailengine.toml").read_text()
    code, out = run_cli(home, "config", "upgrade", str(old), "--dry-run")
    assert code == 0 and "would carry 7 values" in out, out
    assert (home / "mailengine.toml").read_text() == before
    assert not (home / "password.txt").exists()
    code, out = run_cli(home, "config", "upgrade", str(old))
    assert code == 0, out
    assert f"{old / 'config'} -> {home / 'mailengine.toml'}" in out
    assert "carried 7 values" in out
    assert "config/MysteryKnob.txt" in out and "config/MaxThreads.txt" in out  # not carried
    assert f"users: {old / 'config' / 'password.txt'} -> {home / 'password.txt'}" in out
    cfg = config.load(home)
    assert cfg.network.web_port == 8081 and cfg.network.web_ip == "192.168.1.124"
    assert cfg.network.smtp_port == 2525 and cfg.network.helo_text == "mail.example.org"
    assert cfg.policy.relay_ips == ["127.0.0.1", "192.168.1.0/24"]
    assert cfg.queue.retry_intervals == [5.0, 60.0] and cfg.queue.save_done is True
    assert "limits.max_threads" not in cfg.values  # obsolete: not carried
    assert (home / "password.txt").read_text() == "admin:opensesame\n"
    assert "# SMTP port. 1 disables SMTP intake." in (home / "mailengine.toml").read_text()
    # naming the config/ directory itself works too; this home's users are kept
    code, out = run_cli(home, "config", "upgrade", str(old / "config"))
    assert code == 0 and "carried 0 values" in out and "kept this home's" in out


# ---------------------------------------------------------------- 9. safer web defaults

def test_the_web_admin_is_for_this_machine_and_init_makes_its_first_user(tmp_path):
    import re
    from mailengine.testing.engine import RunningEngine
    from mailengine.users import PasswordFile
    from test_web_api import Client, wait_web
    web = free_port()
    out = cli(tmp_path, "--web-port", str(web), "init")
    assert out.returncode == 0, out.stderr
    m = re.search(r"Web admin user: admin, password: (\S+) ", out.stdout)
    assert m, out.stdout
    password = m.group(1)
    stored = (tmp_path / "password.txt").read_text()
    assert stored.startswith("admin:scrypt$") and password not in stored  # hashed
    assert PasswordFile(tmp_path / "password.txt").check("admin", password)
    assert f"http://127.0.0.1:{web}/" in out.stdout
    assert config.load(tmp_path).network.web_ip == "127.0.0.1"  # the default now
    with RunningEngine(tmp_path, {"network.web_port": web}) as eng:
        eng.web_port = web
        wait_web(eng)
        assert Client(web, source="127.0.0.2").get("/gui/login").status == 403
        c = Client(web)
        r = c.login(password=password)
        assert r.status in (302, 303) and "/gui/admin" in r.headers.get("Location", "")
    out = cli(tmp_path, "init")  # a home with users keeps them
    assert "Web admin user" not in out.stdout
    assert (tmp_path / "password.txt").read_text() == stored
