"""Run a real MailEngine process for tests and benchmarks, on free loopback ports.

    with RunningEngine(tmp_path, {"basic.local_domains": ["."]}) as eng:
        smtplib.SMTP("127.0.0.1", eng.smtp_port)

The engine runs as `python -m mailengine.cli --home HOME start`, exactly as an operator runs it;
leaving the block stops it with SIGTERM (SIGKILL if it hangs), so no test leaves a server behind.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..config import toml_value


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_config(home: Path, settings: dict) -> None:
    """HOME/mailengine.toml holding just these "section.key": value settings."""
    sections: dict[str, list[str]] = {}
    for name, value in settings.items():
        sec, key = name.split(".", 1)
        sections.setdefault(sec, []).append(f"{key} = {toml_value(value)}")
    home.mkdir(parents=True, exist_ok=True)
    text = "".join(f"[{sec}]\n" + "\n".join(lines) + "\n\n" for sec, lines in sections.items())
    (home / "mailengine.toml").write_text(text)


def wait_until(pred, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll pred() until it is true; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"engine exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5) as s:
                s.recv(100)  # the greeting: the engine is really serving
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class RunningEngine:
    def __init__(self, home: Path, settings: dict | None = None, command: str = "start",
                 env: dict | None = None, ready_timeout: float = 20.0,
                 ready_host: str = "127.0.0.1", wrapper: list[str] | None = None):
        self.home = Path(home)
        self.smtp_port = free_port()
        self.settings = {"network.smtp_port": self.smtp_port,
                         "network.smtp_listen_ips": ["127.0.0.1"],
                         "network.web_port": 0,
                         "logging.stats_interval": 0,
                         # No delivery unless a test asks for it (and points DNS at a test
                         # server): nothing may query the system's resolvers or leave loopback.
                         "queue.pause_sending": True,
                         "network.intake_workers": 1,  # tests of several processes say so
                         # the engine sends itself unless a test says otherwise; the whole
                         # suite runs with delivery processes given this variable
                         "network.delivery_processes": int(os.environ.get(
                             "MAILENGINE_TEST_DELIVERY_PROCESSES", "1")),
                         **(settings or {})}
        self.smtp_port = self.settings["network.smtp_port"]
        self.command = command
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self.ready_host = ready_host  # an address the engine listens on, to know it is up
        self.wrapper = wrapper or []  # runs the engine, e.g. unshare (it must exec, not fork)
        self.proc: subprocess.Popen | None = None
        self.output = b""

    @property
    def mailq(self) -> Path:
        return self.home / ("mailq-test" if self.command == "test" else "mailq")

    def start(self) -> "RunningEngine":
        write_config(self.home, self.settings)
        self.log = open(self.home / "engine-output.txt", "ab")
        self.proc = subprocess.Popen(
            self.wrapper + [sys.executable, "-m", "mailengine.cli", "--home", str(self.home),
                            self.command],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        if self.settings["network.smtp_port"] != 1:
            try:
                wait_for_port(self.ready_host, self.smtp_port, self.ready_timeout, self.proc)
            except BaseException:
                self.stop(signal.SIGKILL)  # a failed start must not leave an engine behind
                raise
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.output = (self.home / "engine-output.txt").read_bytes()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the crash test's power cut, as far as a process can have one."""
        self.stop(signal.SIGKILL)

    def read_output(self) -> str:
        return (self.home / "engine-output.txt").read_text(errors="replace")

    def __enter__(self) -> "RunningEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
