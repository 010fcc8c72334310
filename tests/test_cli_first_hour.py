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
