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


class NameSecretFile:
    """A file of `name:secret` lines (comments and blank lines allowed and kept), read again
    whenever it changes, so edits need no restart. Shared by password.txt and api-tokens.txt."""

    header: tuple[str, ...] = ()  # comment lines a new file starts with

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._entries: dict[str, str] = {}

    def _load(self) -> dict[str, str]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._entries, self._stamp = {}, None
            return self._entries
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            entries = {}
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                line = line.strip()
                if not line or line.startswith("#") or ":" not in line:
                    continue
                name, _, secret = line.partition(":")
                if name.strip() and secret.strip():
                    entries[name.strip()] = secret.strip()
            self._entries, self._stamp = entries, stamp
        return self._entries

    def __bool__(self) -> bool:
        return bool(self._load())

    def _replace(self, name: str, new_line: str | None) -> None:
        """Put `new_line` where `name`'s line is (or at the end), or drop that line (None);
        every other line stays as it is. Written to a 0600 temporary file, then renamed."""
        lines = self.path.read_text().splitlines() if self.path.exists() else list(self.header)
        out, found = [], False
        for line in lines:
            if not line.lstrip().startswith("#") and line.partition(":")[0].strip() == name:
                if new_line is not None and not found:
                    out.append(new_line)
                found = True
            else:
                out.append(line)
        if new_line is not None and not found:
            out.append(new_line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(out) + "\n")
        tmp.replace(self.path)


class PasswordFile(NameSecretFile):
    """password.txt: `user:password` lines."""

    def users(self) -> list[str]:
        return sorted(self._load())

    def check(self, user: str, password: str) -> bool:
        stored = self._load().get(user)
        return stored is not None and verify_password(stored, password)

    def set_password(self, user: str, password: str) -> None:
        """Store (hashed) a new password for user, keeping the other lines as they are."""
        self._replace(user, f"{user}:{hash_password(password)}")
