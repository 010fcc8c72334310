"""Who may use the web admin and the HTTP API: sessions, CSRF tokens, API tokens, login slowing.

- Users and passwords are those of HOME/password.txt (mailengine.users.PasswordFile), shared with
  SMTP AUTH: the manual's plain `admin:opensesame` lines work; a password changed here is stored
  as a scrypt hash.
- A logged-in browser holds a random session id in an HttpOnly, SameSite=Strict cookie. Sessions
  live in memory (a restart logs everyone out), expire after SESSION_IDLE seconds unused, and are
  capped at MAX_SESSIONS (the oldest goes first).
- Every form carries a CSRF token: the session's own once logged in; before login, the token of a
  short-lived cookie that the login form must repeat (double submit).
- API clients send `Authorization: Bearer TOKEN`. Tokens are lines `name:secret` in
  HOME/api-tokens.txt (re-read when it changes); the web admin writes them as
  `name:sha256$HEX`, so the file never holds a token made here in clear.
- Failed logins and wrong tokens slow down their client address: after the n-th failure in a row
  the address is refused (429) for 0.5 * 2^(n-1) seconds, at most MAX_DELAY, whatever it sends.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

from ..users import NameSecretFile

SESSION_COOKIE = "mailengine_session"
LOGIN_COOKIE = "mailengine_login"
SESSION_IDLE = 8 * 3600
MAX_SESSIONS = 1000
TOKENS_FILE = "api-tokens.txt"
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
FAILURE_MEMORY = 900  # s: failures older than this are forgotten
MAX_TRACKED = 10000  # client addresses remembered by a throttle


@dataclass
class Session:
    id: str
    user: str
    csrf: str
    last_seen: float = field(default_factory=time.monotonic)
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind, text) for the next page


class Sessions:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._by_id: dict[str, Session] = {}

    def create(self, user: str) -> Session:
        self._expire()
        while len(self._by_id) >= MAX_SESSIONS:
            del self._by_id[min(self._by_id.values(), key=lambda s: s.last_seen).id]
        s = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32), self.clock())
        self._by_id[s.id] = s
        return s

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        s = self._by_id.get(sid)
        if s is None:
            return None
        now = self.clock()
        if now - s.last_seen > SESSION_IDLE:
            del self._by_id[sid]
            return None
        s.last_seen = now
        return s

    def end(self, sid: str | None) -> None:
        self._by_id.pop(sid or "", None)

    def end_user(self, user: str, keep: str | None = None) -> None:
        """Log a user out everywhere (after a password change), except session `keep`."""
        for sid in [k for k, s in self._by_id.items() if s.user == user and k != keep]:
            del self._by_id[sid]

    def _expire(self) -> None:
        now = self.clock()
        for sid in [k for k, s in self._by_id.items() if now - s.last_seen > SESSION_IDLE]:
            del self._by_id[sid]

    def __len__(self) -> int:
        return len(self._by_id)


def same(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two tokens; None or empty never matches."""
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


class Throttle:
    """Refuses a client address for a growing time after each failure in a row."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._state: dict[str, tuple[int, float]] = {}  # ip -> (failures in a row, blocked until)

    @staticmethod
    def delay(failures: int) -> float:
        return min(FIRST_DELAY * 2 ** (failures - 1), MAX_DELAY) if failures > 0 else 0.0

    def wait_left(self, ip: str) -> float:
        """Seconds this address must still wait before it may try again (0 = may try)."""
        st = self._state.get(ip)
        if st is None:
            return 0.0
        now = self.clock()
        if now - st[1] > FAILURE_MEMORY:
            del self._state[ip]
            return 0.0
        return max(0.0, st[1] - now)

    def failed(self, ip: str) -> float:
        """Record a failure; returns the seconds the address is now refused."""
        now = self.clock()
        n = self._state.get(ip, (0, 0.0))[0]
        if n and now - self._state[ip][1] > FAILURE_MEMORY:
            n = 0
        n += 1
        d = self.delay(n)
        self._state.pop(ip, None)
        self._state[ip] = (n, now + d)
        while len(self._state) > MAX_TRACKED:
            del self._state[next(iter(self._state))]  # the longest untouched
        return d

    def succeeded(self, ip: str) -> None:
        self._state.pop(ip, None)

    def failures(self, ip: str) -> int:
        return self._state.get(ip, (0, 0.0))[0]


def hash_token(token: str) -> str:
    return "sha256$" + hashlib.sha256(token.encode()).hexdigest()


class ApiTokens(NameSecretFile):
    """The tokens of HOME/api-tokens.txt: `name:secret` or `name:sha256$HEX` lines."""

    header = ("# API tokens of the MailEngine HTTP API: one 'name:token' line each",
              "# ('name:sha256$HEX' when made by the web admin).",
              "# Clients send 'Authorization: Bearer TOKEN'.")

    def names(self) -> list[str]:
        return sorted(self._load())

    def check(self, token: str) -> str | None:
        """The name of the token, or None."""
        if not token:
            return None
        hashed = hash_token(token)
        found = None
        for name, stored in self._load().items():
            want = stored if stored.startswith("sha256$") else hash_token(stored)
            if hmac.compare_digest(want, hashed):
                found = name
        return found

    def create(self, name: str) -> str:
        """A new token stored hashed under `name` (replacing one of that name); returns it."""
        token = "me_" + secrets.token_urlsafe(32)
        self._replace(name, f"{name}:{hash_token(token)}")
        return token

    def revoke(self, name: str) -> None:
        self._replace(name, None)

