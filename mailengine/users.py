"""Users and passwords of HOME/password.txt, shared by SMTP AUTH and the web admin.

One `user:password` line each. The manual's plain `admin:opensesame` lines are accepted as they
are; a password set by MailEngine is stored as `user:scrypt$salt$hash` (hex), never in clear.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

_PREFIX = "scrypt$"


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2 ** 14, r=8, p=1, dklen=32)
    return f"{_PREFIX}{salt.hex()}${digest.hex()}"


def verify_password(stored: str, password: str) -> bool:
    if stored.startswith(_PREFIX):
        try:
            salt_hex, digest_hex = stored[len(_PREFIX):].split("$")
            expected = hash_password(password, bytes.fromhex(salt_hex))
        except ValueError:
            return False
        return hmac.compare_digest(expected.rpartition("$")[2], digest_hex)
    return hmac.compare_digest(stored.encode(), password.encode())


class PasswordFile:
    """Reads password.txt again whenever it changes, so edits need no restart."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple[float, int] | None = None
        self._users: dict[str, str] = {}

    def _load(self) -> dict[str, str]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._users, self._stamp = {}, None
            return self._users
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._stamp:
            users = {}
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                line = line.strip()
                if not line or line.startswith("#") or ":" not in line:
                    continue
                user, _, secret = line.partition(":")
                users[user.strip()] = secret.strip()
            self._users, self._stamp = users, stamp
        return self._users

    def __bool__(self) -> bool:
        return bool(self._load())

    def users(self) -> list[str]:
        return sorted(self._load())

    def check(self, user: str, password: str) -> bool:
        stored = self._load().get(user)
        return stored is not None and verify_password(stored, password)

    def set_password(self, user: str, password: str) -> None:
        """Store (hashed) a new password for user, keeping the other lines as they are."""
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        out, found = [], False
        for line in lines:
            if line.partition(":")[0].strip() == user and not line.lstrip().startswith("#"):
                out.append(f"{user}:{hash_password(password)}")
                found = True
            else:
                out.append(line)
        if not found:
            out.append(f"{user}:{hash_password(password)}")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(out) + "\n")
        os.chmod(tmp, 0o600)
        tmp.replace(self.path)
