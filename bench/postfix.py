"""A private, throwaway Postfix instance for the benchmarks (and the tests that check them).

    with PostfixInstance(mode="defer") as pf:            # accept, queue durably, never deliver
        run smtp-source against 127.0.0.1:pf.port
        pf.wait_queue(20000)                             # all of them are in its queue

    with PostfixInstance(mode="relay", relay_to="127.0.0.1:2526") as pf:   # deliver to a sink
        ...

Everything lives under one temporary directory (config_directory `etc/`, queue_directory
`spool/`, data_directory `data/`, log file `maillog`), so the instance shares nothing with the
Debian package's own Postfix, which is never started. The SMTP server listens on a free loopback
port only; there is no port 25 listener, no local delivery, no DNS, no client throttling, and no
chroot. `stop()` (also on leaving the `with` block, at interpreter exit, and on garbage
collection) stops Postfix, then kills whatever is left of the instance's process group and any
process still carrying `MAIL_CONFIG=<our etc/>` in its environment, then removes the directory.

Run `python bench/postfix.py [--mode relay --relay-to 127.0.0.1:PORT]` to start one by hand; it
prints its port and directory and stays up until Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/postconf"

# Queue directories that hold messages Postfix has accepted (and not yet delivered).
MESSAGE_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

# master.cf for the private instance: the smtpd listener is added at start with its port; no
# service is chrooted (no chroot jail to populate); no port 25, no pickup of anyone else's mail.
MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_greeting(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                if s.recv(100).startswith(b"220"):
                    return
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"no SMTP greeting on {host}:{port} after {timeout}s ({last})")


def _proc_pgid_env(pid: int) -> tuple[int, bytes] | None:
    try:
        pgid = os.getpgid(pid)
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except (OSError, ProcessLookupError):
        return None
    return pgid, env


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def instance_pids(config_dir: Path, pgid: int | None = None) -> list[int]:
    """Processes of one private instance: in the master's process group, or with its MAIL_CONFIG."""
    marker = b"MAIL_CONFIG=" + os.fsencode(str(config_dir)) + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        info = _proc_pgid_env(int(entry))
        if info is None or not _alive(int(entry)):
            continue
        p_pgid, env = info
        if (pgid is not None and p_pgid == pgid) or marker in env + b"\0":
            found.append(int(entry))
    return found


def _cleanup(base: Path, config_dir: Path, state: dict, keep: bool) -> None:
    """Kill every process of the instance and remove its directory (run once, by finalize)."""
    master_pid = state.get("master_pid")
    pid_file = base / "spool" / "pid" / "master.pid"
    if master_pid is None and pid_file.exists():
        try:
            master_pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            master_pid = None
    if master_pid is not None and _alive(master_pid):
        # What `postfix stop` does, minus its one-second polling: SIGTERM to the master, which
        # stops its children and exits.
        try:
            os.kill(master_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while _alive(master_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    elif config_dir.exists():
        try:
            subprocess.run([POSTFIX, "-c", str(config_dir), "stop"], capture_output=True,
                           timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            pass
    deadline = time.monotonic() + 10
    while True:
        pids = instance_pids(config_dir, master_pid)
        if not pids:
            break
        if master_pid is not None:
            try:
                os.killpg(master_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Postfix processes {pids} of {config_dir} would not die")
        time.sleep(0.05)
    if not keep:
        shutil.rmtree(base, ignore_errors=True)


def check_reachable(directory: Path, user: str = "postfix") -> None:
    """Postfix's daemons run as `user`: every directory above the instance must let them in."""
    import pwd
    uid = pwd.getpwnam(user).pw_uid
    for d in [directory, *directory.parents]:
        st = d.stat()
        if st.st_uid != uid and not st.st_mode & 0o001:
            raise PermissionError(f"Postfix's daemons (user {user}) cannot enter {d} "
                                  f"(mode {st.st_mode & 0o777:o}): put the instance elsewhere")


class PostfixInstance:
    """A private Postfix: `mode="defer"` queues everything; `mode="relay"` delivers to relay_to."""

    def __init__(self, mode: str = "defer", relay_to: str | None = None, port: int | None = None,
                 base_dir: str | os.PathLike | None = None, process_limit: int = 250,
                 concurrency: int = 100, in_flow_delay: str = "1s",
                 extra_main: dict[str, str] | None = None, keep: bool = False,
                 start_timeout: float = 20.0):
        if mode not in ("defer", "relay"):
            raise ValueError(f"mode must be 'defer' or 'relay', not {mode!r}")
        if mode == "relay" and not relay_to:
            raise ValueError("mode='relay' needs relay_to='HOST:PORT'")
        self.mode = mode
        self.relay_to = relay_to
        self.port = port or free_port()
        self._base_parent = base_dir
        self.process_limit = process_limit
        self.concurrency = concurrency
        self.in_flow_delay = in_flow_delay
        self.extra_main = dict(extra_main or {})
        self.keep = keep
        self.start_timeout = start_timeout
        self.base: Path | None = None
        self.master_pid: int | None = None
        self._finalizer: weakref.finalize | None = None

    # -- paths ------------------------------------------------------------------------------
    @property
    def config_dir(self) -> Path:
        return self.base / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.base / "spool"

    @property
    def maillog(self) -> Path:
        return self.base / "maillog"

    # -- configuration ----------------------------------------------------------------------
    def main_cf(self) -> dict[str, str]:
        base = str(self.base)
        cf = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.base / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": base,
            "myhostname": "postfix-bench.localdomain",
            "mydomain": "localdomain",
            "myorigin": "$myhostname",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "mynetworks_style": "host",
            # Nothing is local, nothing is a relay domain: every recipient goes to the
            # default transport (smtp), which is deferred or relayed to the sink.
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "local_transport": "error:5.1.1 no local delivery in the benchmark instance",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
            "notify_classes": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            # No DNS, no reverse lookups.
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "smtp_host_lookup": "native",
            # No throttling of the client.
            "default_process_limit": str(self.process_limit),
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_message_rate_limit": "0",
            "smtpd_client_recipient_rate_limit": "0",
            "smtpd_client_new_tls_session_rate_limit": "0",
            "smtpd_client_auth_rate_limit": "0",
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "1000",
            "smtpd_hard_error_limit": "1000",
            "in_flow_delay": self.in_flow_delay,
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            "smtputf8_enable": "no",
        }
        if self.mode == "defer":
            # Accepted and queued durably (cleanup fsyncs before smtpd says 250); the smtp
            # transport is deferred, so qmgr moves every message to deferred/ untouched.
            cf["defer_transports"] = "smtp"
            cf["relayhost"] = "[127.0.0.1]:9"
        else:
            host, _, port = self.relay_to.rpartition(":")
            cf["relayhost"] = f"[{host.strip('[]')}]:{port}"
            cf["default_destination_concurrency_limit"] = str(self.concurrency)
            cf["smtp_destination_concurrency_limit"] = str(self.concurrency)
            cf["initial_destination_concurrency"] = "5"
            cf["smtp_connection_cache_on_demand"] = "yes"
            cf["smtp_connection_cache_time_limit"] = "10s"
            cf["smtp_connection_reuse_count_limit"] = "0"
        cf.update(self.extra_main)
        return cf

    def _write_config(self) -> None:
        etc = self.config_dir
        etc.mkdir(parents=True)
        lines = [f"{k} = {v}\n" for k, v in self.main_cf().items()]
        (etc / "main.cf").write_text("# private benchmark instance, see bench/postfix.py\n"
                                     + "".join(lines))
        (etc / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        self.queue_dir.mkdir()      # postfix chdirs here first; post-install fills it in
        for path in (self.base, etc, self.queue_dir, etc / "main.cf", etc / "master.cf"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)

    def _postfix(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        proc = subprocess.run([POSTFIX, "-c", str(self.config_dir), *args],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}{self.log_tail()}")
        return proc

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> "PostfixInstance":
        if os.geteuid() != 0:
            raise PermissionError("a private Postfix instance needs root (postfix start)")
        parent = Path(self._base_parent or tempfile.gettempdir()).resolve()
        check_reachable(parent)
        self.base = Path(tempfile.mkdtemp(prefix="pfbench-", dir=parent))
        # Runs on stop(), on garbage collection, or at interpreter exit, whichever comes first.
        self._state: dict = {}
        self._finalizer = weakref.finalize(self, _cleanup, self.base, self.config_dir,
                                           self._state, self.keep)
        try:
            self._write_config()
            # Creates spool/ and data/ with Postfix's owners and modes, then starts master.
            self._postfix("start", timeout=self.start_timeout)
            self.master_pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
            self._state["master_pid"] = self.master_pid
            wait_for_greeting("127.0.0.1", self.port, self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop Postfix; nothing of the instance survives (processes, and files unless keep)."""
        if self._finalizer is not None:
            self._finalizer()   # runs _cleanup once; later calls do nothing

    def running_pids(self) -> list[int]:
        if self.base is None:
            return []
        return instance_pids(self.config_dir, self.master_pid)

    def __enter__(self) -> "PostfixInstance":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- observation ------------------------------------------------------------------------
    def queue_count(self, queues: tuple[str, ...] = MESSAGE_QUEUES) -> int:
        """Queue files Postfix holds (accepted, not yet delivered), counted on disk."""
        n = 0
        for q in queues:
            for _root, _dirs, files in os.walk(self.queue_dir / q):
                n += len(files)
        return n

    def wait_queue(self, expected: int, timeout: float = 60.0, queues=MESSAGE_QUEUES) -> int:
        """Wait until queue_count() reaches expected (or time out); return the last count."""
        deadline = time.monotonic() + timeout
        n = self.queue_count(queues)
        while n < expected and time.monotonic() < deadline:
            time.sleep(0.1)
            n = self.queue_count(queues)
        return n

    def wait_settled(self, timeout: float = 60.0) -> int:
        """Wait until nothing is in maildrop/incoming/active (defer mode: all in deferred/)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queue_count(("maildrop", "incoming", "active")) == 0:
                break
            time.sleep(0.1)
        return self.queue_count()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.maillog.read_text(errors="replace").splitlines()
        except (OSError, AttributeError, TypeError):
            return ""
        return "\n".join(text[-lines:]) + ("\n" if text else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run a private Postfix instance until Ctrl-C.")
    ap.add_argument("--mode", choices=["defer", "relay"], default="defer")
    ap.add_argument("--relay-to", help="HOST:PORT of the sink (relay mode)")
    ap.add_argument("--port", type=int)
    ap.add_argument("--keep", action="store_true", help="keep the directory after stopping")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with PostfixInstance(args.mode, args.relay_to, args.port, keep=args.keep) as pf:
        print(f"Postfix ({args.mode}) on 127.0.0.1:{pf.port}, directory {pf.base}", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
