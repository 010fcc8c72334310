"""DKIM signing of outgoing mail (RFC 6376; rsa-sha256 and ed25519-sha256 of RFC 8463).

What this module does:
- `DKIMSigner` signs one message once and returns the `DKIM-Signature:` header field(s) to put in
  front of it at send time; `ID.dat` is never changed. Canonicalization is done here on bytes and
  the signature through OpenSSL (`cryptography`) with every key loaded once, because signing sits
  on the delivery hot path (dkimpy, the reference verifier in the tests, signs RSA 20x slower).
- The signing table maps sender domains to (selector, key file, algorithm); two entries for one
  domain (say rsa and ed25519) give two signatures.
- Which domain: the From header's domain first (that is what DMARC aligns with), else the envelope
  sender's domain given by the caller. An entry for `example.com` also signs its subdomains
  (relaxed DMARC alignment); the longest matching entry wins.
- A missing or unreadable key is listed by `problems()` (start-up, admin) and each affected message
  is sent unsigned with a logged warning, or held (`DKIMHold` is raised), per `dkim.missing_key`.
- `genkey_main` is the `mailengine dkim genkey` command; `dns_txt_record` gives the TXT record to
  publish, for the command and the web admin.

The message is signed in its wire form: lines end in CRLF (a bare LF counts as CRLF, as delivery
sends it) and a body without a final CRLF is signed as if it had one, since SMTP adds it.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from .home import resolve_home
from .setting import DELIVERY, Setting

log = logging.getLogger("mailengine.dkim")

RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"
_ALGORITHM_NAMES = {"rsa": RSA, "rsa-sha256": RSA, "ed25519": ED25519, "ed25519-sha256": ED25519}

# Header fields signed when present. List-Unsubscribe(-Post) must be signed for RFC 8058 one-click
# unsubscribe to count with Gmail and Yahoo; trace fields (Received, Return-Path) are never signed.
DEFAULT_HEADERS = [
    "From", "Reply-To", "Sender", "Subject", "Date", "Message-ID", "To", "Cc",
    "In-Reply-To", "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    "Content-Disposition", "Content-ID", "Content-Description",
    "List-Id", "List-Help", "List-Unsubscribe", "List-Unsubscribe-Post", "List-Subscribe",
    "List-Post", "List-Owner", "List-Archive", "Feedback-ID",
]
# Listed once more than present, so nobody can add another one without breaking the signature.
DEFAULT_OVERSIGN = ["From"]
MISSING_KEY_CHOICES = ("unsigned", "hold")
_WARN_EVERY = 60.0  # seconds between repeated warnings about one domain's missing key
_RELOAD_EVERY = 30.0  # seconds between attempts to load a key that was missing


class DKIMHold(Exception):
    """The message's domain has no usable key and dkim.missing_key = "hold": do not send it now."""

    def __init__(self, domain: str, reason: str):
        super().__init__(f"DKIM key for {domain} unusable, message held: {reason}")
        self.domain = domain
        self.reason = reason


# --- settings (the lead appends DKIM_SETTINGS to config.SETTINGS) ---------------------------------

@dataclass(frozen=True)
class SigningEntry:
    """One signing table row: mail of `domain` (and its subdomains) is signed with this key."""
    domain: str
    selector: str
    keyfile: str
    algorithm: str = ""  # RSA or ED25519; "" = from the key file

    def __str__(self) -> str:
        return ",".join(x for x in (self.domain, self.selector, self.keyfile, self.algorithm) if x)


def parse_entry(text: str) -> SigningEntry:
    """'domain,selector,keyfile[,rsa|ed25519]' -> SigningEntry; raises ValueError."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (3, 4) or not all(parts[:3]):
        raise ValueError(f"{text!r} must be 'domain,selector,keyfile[,rsa|ed25519]'")
    domain, selector, keyfile = _domain_key(parts[0]), parts[1].lower(), parts[2]
    if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)+", domain):
        raise ValueError(f"{text!r}: {parts[0]!r} is not a domain name")
    if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", selector):
        raise ValueError(f"{text!r}: selector {parts[1]!r} is not a DNS label")
    algorithm = ""
    if len(parts) == 4 and parts[3]:
        if parts[3].lower() not in _ALGORITHM_NAMES:
            raise ValueError(f"{text!r}: algorithm must be rsa or ed25519")
        algorithm = _ALGORITHM_NAMES[parts[3].lower()]
    return SigningEntry(domain, selector, keyfile, algorithm)


def _check_signing_table(values: list[str]) -> str | None:
    for v in values:
        try:
            parse_entry(v)
        except ValueError as e:
            return str(e)
    return None


def _check_canonicalization(value: str) -> str | None:
    try:
        _parse_canon(value)
    except ValueError as e:
        return str(e)
    return None


def _check_headers(values: list[str]) -> str | None:
    if "from" not in (v.lower() for v in values):
        return "must include From (RFC 6376 requires it to be signed)"
    bad = [v for v in values if not re.fullmatch(r"[!-9;-~]+", v)]
    return f"not header field names: {bad}" if bad else None


DKIM_SECTION_TITLE = ("dkim", "DKIM signing")  # for config.SECTION_TITLES

DKIM_SETTINGS: list[Setting] = [
    Setting("dkim", "signing_table", [], "list[str]",
            "Who signs what: 'domain,selector,keyfile[,rsa|ed25519]' entries (key file relative "
            "to HOME). Mail whose From domain (else envelope sender domain) is the domain or one "
            "of its subdomains is signed; two entries for one domain give two signatures. Make "
            "keys with 'mailengine dkim genkey DOMAIN SELECTOR'. Empty: no signing.",
            check=_check_signing_table, restart=True, comma_entries=True, scope=DELIVERY),
    Setting("dkim", "headers", list(DEFAULT_HEADERS), "list[str]",
            "Header fields signed when present (From is required).", check=_check_headers, restart=True,
            scope=DELIVERY),
    Setting("dkim", "oversign_headers", list(DEFAULT_OVERSIGN), "list[str]",
            "Header fields signed once more than present, so none can be added in transit.",
            check=lambda v: None if all(re.fullmatch(r"[!-9;-~]+", x) for x in v)
            else "must be header field names", restart=True, scope=DELIVERY),
    Setting("dkim", "canonicalization", "relaxed/relaxed", "str",
            "Header/body canonicalization: relaxed or simple each (c= tag).",
            check=_check_canonicalization, restart=True, scope=DELIVERY),
    Setting("dkim", "expire_seconds", 0, "int",
            "Signatures expire (x= tag) this many seconds after signing. 0 = never.", minimum=0,
            restart=True, scope=DELIVERY),
    Setting("dkim", "missing_key", "unsigned", "str",
            "When a domain's key is missing or unreadable: 'unsigned' sends its mail unsigned "
            "(with a warning in the log), 'hold' keeps it in the queue until the key is fixed.",
            check=lambda v: None if v in MISSING_KEY_CHOICES
            else f"must be one of {', '.join(MISSING_KEY_CHOICES)}", restart=True, scope=DELIVERY),
]


# --- canonicalization (RFC 6376 section 3.4) -----------------------------------------------------

_FIELD_SPLIT = re.compile(rb"\r\n(?![ \t])")  # a header field ends at a CRLF not followed by WSP
_BARE_LF = re.compile(rb"(?<!\r)\n")


def _parse_canon(value: str) -> tuple[bool, bool]:
    """'relaxed/simple' -> (header_relaxed, body_relaxed); a single word means body simple."""
    parts = value.strip().lower().split("/")
    if len(parts) == 1:
        parts.append("simple")  # RFC 6376 3.5: c=relaxed means relaxed/simple
    if len(parts) != 2 or any(p not in ("simple", "relaxed") for p in parts):
        raise ValueError(f"{value!r} must be simple or relaxed, or two of them joined by /")
    return parts[0] == "relaxed", parts[1] == "relaxed"


def split_message(data: bytes) -> tuple[list[bytes], bytes]:
    """Wire-form message -> (header fields without their CRLF, body)."""
    if data.count(b"\n") != data.count(b"\r\n"):
        data = _BARE_LF.sub(b"\r\n", data)
    if data.startswith(b"\r\n"):
        return [], data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:  # headers only, no separator line
        head = data[:-2] if data.endswith(b"\r\n") else data
        return _FIELD_SPLIT.split(head), b""
    return _FIELD_SPLIT.split(data[:end]), data[end + 4:]


def _squeeze(data: bytes) -> bytes:
    """Every run of spaces and tabs made one space. bytes.replace beats re.sub here by 2x (the
    loop halves the longest run each pass, so it ends after log2(run length) passes)."""
    if b"\t" in data:
        data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


def canon_body(body: bytes, relaxed: bool) -> bytes:
    """Canonical body: trailing empty lines dropped, CRLF-terminated (relaxed: WSP reduced)."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"  # SMTP adds it before the final dot, so the receiver sees it
    if relaxed:
        body = _squeeze(body)
        if b" \r\n" in body:
            body = body.replace(b" \r\n", b"\r\n")
    end = len(body)
    while end >= 2 and body[end - 2:end] == b"\r\n":
        end -= 2
    if end == 0:
        return b"" if relaxed else b"\r\n"
    return body[:end + 2]  # the CRLF ending the last non-empty line is kept


def canon_header(field: bytes, relaxed: bool) -> bytes:
    """One header field (no CRLF) in canonical form, CRLF-terminated."""
    if not relaxed:
        return field + b"\r\n"
    name, _, value = field.partition(b":")
    value = _squeeze(value.replace(b"\r\n", b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


# --- keys -----------------------------------------------------------------------------------------

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def load_private_key(path: Path) -> PrivateKey:
    """A PEM (PKCS#1 or PKCS#8) key, or dkimpy's base64 ed25519 seed; raises ValueError/OSError."""
    raw = path.read_bytes()
    if b"-----BEGIN" in raw:
        key = serialization.load_pem_private_key(raw, password=None)
    else:
        try:
            seed = base64.b64decode(raw.strip(), validate=True)
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise ValueError("neither a PEM private key nor a base64 ed25519 seed")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    if not isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise ValueError(f"a {type(key).__name__}: only RSA and Ed25519 keys can sign DKIM")
    return key


def key_algorithm(key: PrivateKey) -> str:
    return RSA if isinstance(key, rsa.RSAPrivateKey) else ED25519


def public_key_b64(key: PrivateKey) -> str:
    """The p= value: SubjectPublicKeyInfo for RSA, the raw 32 bytes for Ed25519 (RFC 8463)."""
    pub = key.public_key()
    if isinstance(pub, ed25519.Ed25519PublicKey):
        der = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        der = pub.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def dns_txt_strings(key: PrivateKey) -> list[str]:
    """The TXT record's text as character-strings of at most 255 characters each."""
    k = "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ed25519"
    text = f"v=DKIM1; k={k}; p={public_key_b64(key)}"
    return [text[i:i + 255] for i in range(0, len(text), 255)]


def dns_txt_record(domain: str, selector: str, key: PrivateKey) -> str:
    """The zone-file line to publish: `sel._domainkey.example.com. IN TXT "v=DKIM1; ..." "..."`."""
    strings = " ".join(f'"{s}"' for s in dns_txt_strings(key))
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"


def generate_key(algorithm: str = "rsa", bits: int = 2048) -> PrivateKey:
    algorithm = _ALGORITHM_NAMES[algorithm.lower()]
    if algorithm == ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    if not 1024 <= bits <= 8192:
        raise ValueError("RSA keys must have 1024 to 8192 bits (2048 recommended)")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _domain_key(domain: str) -> str:
    """Normalised domain for matching: lower case, no trailing dot, A-labels for IDNs."""
    domain = domain.strip().rstrip(".").lower()
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode()
        except UnicodeError:
            pass
    return domain


_ADDR_DOMAIN = re.compile(rb"@([^\s<>@,;\"()\[\]]+)\s*>?\s*(?:\([^()]*\)\s*)?$")


def from_domain(value: bytes) -> str | None:
    """The domain of the (last) address in a From field value, or None."""
    value = value.replace(b"\r\n", b"").strip()
    m = _ADDR_DOMAIN.search(value)
    if not m:
        return None
    try:
        return _domain_key(m.group(1).decode("utf-8"))
    except UnicodeDecodeError:
        return None


# --- the signer -----------------------------------------------------------------------------------

@dataclass
class _Slot:
    """A signing entry with its loaded key (or the reason it could not be loaded)."""
    entry: SigningEntry
    path: Path
    key: PrivateKey | None = None
    algorithm: str = ""
    problem: str = ""
    notes: list[str] = field(default_factory=list)  # non-fatal: weak key, readable by others
    loaded_at: float = 0.0


class DKIMSigner:
    """Signs messages per sender domain; construct once, keys are loaded here and kept.

    `entries`: SigningEntry objects or 'domain,selector,keyfile[,algorithm]' strings; relative key
    files are found under `home`. Everything else mirrors the dkim.* settings.
    """

    def __init__(self, entries: Iterable[SigningEntry | str], *,
                 headers: Iterable[str] = DEFAULT_HEADERS,
                 oversign_headers: Iterable[str] = DEFAULT_OVERSIGN,
                 canonicalization: str = "relaxed/relaxed", expire_seconds: int = 0,
                 missing_key: str = "unsigned", home: Path | str | None = None,
                 clock: Callable[[], float] = time.time):
        if missing_key not in MISSING_KEY_CHOICES:
            raise ValueError(f"missing_key must be one of {MISSING_KEY_CHOICES}")
        self.home = Path(home) if home is not None else Path.cwd()
        self.canonicalization = canonicalization.strip().lower()
        self._header_relaxed, self._body_relaxed = _parse_canon(canonicalization)
        if "/" not in self.canonicalization:
            self.canonicalization += "/simple"
        self.headers = [h.lower() for h in dict.fromkeys(h.strip() for h in headers)]
        if "from" not in self.headers:
            raise ValueError("the signed headers must include From")
        self.oversign = {h.lower() for h in oversign_headers}
        self._wanted = {h.encode() for h in self.headers}
        # (name, name as bytes, over-signed?) in signing order: computed once, used per message
        self._plan = [(h, h.encode(), h in self.oversign) for h in self.headers]
        self.expire_seconds = int(expire_seconds)
        self.missing_key = missing_key
        self.clock = clock
        self._slots: dict[str, list[_Slot]] = {}
        for e in entries:
            e = parse_entry(e) if isinstance(e, str) else e
            path = Path(e.keyfile).expanduser()
            slot = _Slot(e, path if path.is_absolute() else self.home / path)
            self._slots.setdefault(e.domain, []).append(slot)
            self._load(slot)
        self._warned: dict[str, tuple[float, int]] = {}  # domain -> (last warning, messages since)
        self.unsigned: dict[str, int] = {}  # domain -> messages sent unsigned for a missing key
        self.held: dict[str, int] = {}  # domain -> messages held for a missing key

    @classmethod
    def from_config(cls, cfg: Any) -> DKIMSigner:
        """From a mailengine.config.Config whose SETTINGS include DKIM_SETTINGS."""
        v = cfg.values
        return cls(v.get("dkim.signing_table", []),
                   headers=v.get("dkim.headers", DEFAULT_HEADERS),
                   oversign_headers=v.get("dkim.oversign_headers", DEFAULT_OVERSIGN),
                   canonicalization=v.get("dkim.canonicalization", "relaxed/relaxed"),
                   expire_seconds=v.get("dkim.expire_seconds", 0),
                   missing_key=v.get("dkim.missing_key", "unsigned"), home=cfg.home)

    # -- keys --

    def _load(self, slot: _Slot) -> None:
        slot.loaded_at = self.clock()
        slot.key, slot.problem, slot.notes = None, "", []
        e = slot.entry
        try:
            key = load_private_key(slot.path)
        except FileNotFoundError:
            slot.problem = f"key file {slot.path} not found"
        except PermissionError:
            slot.problem = f"key file {slot.path} not readable by this user"
        except (OSError, ValueError, TypeError) as err:
            slot.problem = f"key file {slot.path} unusable: {err}"
        else:
            alg = key_algorithm(key)
            if e.algorithm and e.algorithm != alg:
                slot.problem = (f"key file {slot.path} holds an {alg} key, "
                                f"the table says {e.algorithm}")
            elif isinstance(key, rsa.RSAPrivateKey) and key.key_size < 1024:
                slot.problem = (f"key file {slot.path} is RSA-{key.key_size}: verifiers reject "
                                "keys under 1024 bits (RFC 8301)")
            else:
                slot.key, slot.algorithm = key, alg
                if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
                    slot.notes.append(f"RSA-{key.key_size} is weak; 2048 bits recommended")
                try:
                    if slot.path.stat().st_mode & 0o077:
                        slot.notes.append(f"key file {slot.path} is readable by other users "
                                          "(chmod 600 it)")
                except OSError:
                    pass

    def reload(self) -> None:
        """Read every key file again (after the operator added or replaced keys)."""
        for slots in self._slots.values():
            for slot in slots:
                self._load(slot)

    def problems(self) -> list[str]:
        """One sentence per key that cannot be used, or should be fixed; for start-up and admin."""
        out = []
        what = "held" if self.missing_key == "hold" else "sent unsigned"
        for domain, slots in self._slots.items():
            usable = any(s.key for s in slots)
            for s in slots:
                name = f"DKIM {domain} selector {s.entry.selector}"
                if s.problem:
                    then = ("signed with the other key only" if usable
                            else f"mail from {domain} will be {what}")
                    out.append(f"{name}: {s.problem}; {then}")
                out += [f"{name}: {n}" for n in s.notes]
        return out

    def dns_records(self) -> list[dict[str, Any]]:
        """For the web admin: each entry's TXT record to publish (None when the key is unusable)."""
        out = []
        for domain, slots in self._slots.items():
            for s in slots:
                out.append({
                    "domain": domain, "selector": s.entry.selector, "keyfile": str(s.path),
                    "algorithm": s.algorithm or s.entry.algorithm,
                    "name": f"{s.entry.selector}._domainkey.{domain}",
                    "txt": dns_txt_strings(s.key) if s.key else None,
                    "record": dns_txt_record(domain, s.entry.selector, s.key) if s.key else None,
                    "problem": s.problem or None})
        return out

    # -- signing --

    def slots_for(self, domain: str | None) -> tuple[str, list[_Slot]] | None:
        """The signing table entries for a domain: its own, else its closest parent's."""
        if not domain:
            return None
        d = _domain_key(domain.rpartition("@")[2])  # a whole address is taken too
        while True:
            if d in self._slots:
                return d, self._slots[d]
            if "." not in d:
                return None
            d = d.split(".", 1)[1]

    def sign(self, data: bytes, sender_domain: str | None = None,
             also: Iterable[str] = ()) -> bytes:
        """The DKIM-Signature field(s) to prepend to `data` (b"" when its domain is not signed).

        The signing domain comes from the From header, else from `sender_domain` (the envelope
        sender's domain). `also`: header fields signed when present even if `dkim.headers`
        leaves them out (the engine's own List-Unsubscribe fields, which RFC 8058 requires
        signed). Raises DKIMHold when the domain's keys are unusable and missing_key is
        "hold"; logs a warning and returns b"" when it is "unsigned".
        """
        if not self._slots:
            return b""
        plan, wanted = self._plan, self._wanted
        extra = [h.lower() for h in also if h.lower() not in self.headers]
        if extra:
            plan = plan + [(h, h.encode(), False) for h in dict.fromkeys(extra)]
            wanted = wanted | {h.encode() for h in extra}
        fields, body = split_message(data)
        by_name: dict[bytes, list[bytes]] = {}
        for f in fields:
            name = f.split(b":", 1)[0].strip().lower()
            if name in wanted:
                by_name.setdefault(name, []).append(f)
        found = None
        if len(by_name.get(b"from", ())) == 1:
            found = self.slots_for(from_domain(by_name[b"from"][0].split(b":", 1)[1]))
        if found is None:
            found = self.slots_for(sender_domain)
        if found is None:
            return b""
        domain, slots = found
        now = self.clock()
        for s in slots:  # a key that was missing may have been put in place since
            if s.key is None and now - s.loaded_at >= _RELOAD_EVERY:
                self._load(s)
        usable = [s for s in slots if s.key is not None]
        if len(usable) < len(slots):
            self._missing(domain, [s for s in slots if s.key is None], signed=bool(usable))
        if not usable:
            if self.missing_key == "hold":
                self.held[domain] = self.held.get(domain, 0) + 1
                raise DKIMHold(domain, "; ".join(s.problem for s in slots))
            self.unsigned[domain] = self.unsigned.get(domain, 0) + 1
            return b""
        bh = base64.b64encode(hashlib.sha256(canon_body(body, self._body_relaxed)).digest())
        # h= lists each present field once per occurrence (signed bottom-up, RFC 6376 5.4.2)
        h_names: list[str] = []
        signed = []
        relaxed = self._header_relaxed
        for name, key, over in plan:
            present = by_name.get(key)
            if present:
                signed += [canon_header(f, relaxed) for f in reversed(present)]
                h_names += [name] * len(present)
            if over:
                h_names.append(name)
        header_data = b"".join(signed)
        return b"".join(self._signature(s, domain, h_names, header_data, bh, now) for s in usable)

    def _signature(self, slot: _Slot, domain: str, h_names: list[str], header_data: bytes,
                   bh: bytes, now: float) -> bytes:
        ts = int(now)
        tags = [f"v=1; a={slot.algorithm}; c={self.canonicalization}; d={domain};",
                f" s={slot.entry.selector}; t={ts};"
                + (f" x={ts + self.expire_seconds};" if self.expire_seconds else "")]
        line = " h="
        for i, name in enumerate(h_names):  # fold h= at colons to keep lines short
            piece = name + (":" if i < len(h_names) - 1 else ";")
            if len(line) + len(piece) > 76:
                tags.append(line)
                line = " "
            line += piece
        tags += [line, f" bh={bh.decode()};", " b="]
        head = "DKIM-Signature: " + "\r\n\t".join(t.strip() for t in tags)
        head_b = head.encode()
        signed = header_data + canon_header(head_b, self._header_relaxed)[:-2]
        if slot.algorithm == RSA:
            sig = slot.key.sign(signed, padding.PKCS1v15(), hashes.SHA256())
        else:  # RFC 8463: Ed25519 over the SHA-256 digest of the header data
            sig = slot.key.sign(hashlib.sha256(signed).digest())
        b = base64.b64encode(sig)
        folded = b"\r\n\t".join(b[i:i + 72] for i in range(0, len(b), 72))
        return head_b + folded + b"\r\n"

    def _missing(self, domain: str, slots: list[_Slot], signed: bool) -> None:
        """Warn about a domain whose key is unusable: at once, then once a minute with a count."""
        last, count = self._warned.get(domain, (None, 0))
        now = self.clock()
        if last is not None and now - last < _WARN_EVERY:
            self._warned[domain] = (last, count + 1)
            return
        action = ("signed with its other key only" if signed else
                  "held" if self.missing_key == "hold" else "sent unsigned")
        since = f" ({count} more since the last warning)" if count else ""
        log.warning("DKIM: mail from %s %s: %s%s", domain, action,
                    "; ".join(s.problem for s in slots), since)
        self._warned[domain] = (now, 0)


# --- the signature kept beside ID.dat -------------------------------------------------------------

_TAG = re.compile(rb"[;\s]([dsx])=\s*([^;\s]*)")


def load_or_sign(signer: DKIMSigner, dat_path: Path, data: bytes,
                 sender_domain: str | None = None, margin: float = 3600) -> bytes:
    """The message's signature, signed once and kept in ID.dkim beside ID.dat for later attempts.

    A kept signature is used again unless it expires within `margin` seconds or its domain and
    selector are no longer in the signing table (key rotation); then the message is signed anew.
    """
    path = dat_path.with_suffix(".dkim")
    try:
        kept = path.read_bytes()
    except OSError:
        kept = None
    if kept is not None and _still_good(signer, kept, margin):
        return kept
    header = signer.sign(data, sender_domain)
    tmp = path.with_suffix(".dkim.tmp")
    tmp.write_bytes(header)
    os.replace(tmp, path)  # no fsync: a lost file only means signing again
    return header


def _still_good(signer: DKIMSigner, kept: bytes, margin: float) -> bool:
    if not kept:
        return False  # unsigned last time (no entry, or missing key): try again
    for sig in kept.split(b"\r\nDKIM-Signature:"):
        tags = {m.group(1): m.group(2).decode("ascii", "replace") for m in _TAG.finditer(sig)}
        found = signer.slots_for(tags.get(b"d"))
        if not found or not any(s.key and s.entry.selector == tags.get(b"s") for s in found[1]):
            return False
        if b"x" in tags and int(tags[b"x"] or 0) - signer.clock() < margin:
            return False
    return True


# --- mailengine dkim genkey -----------------------------------------------------------------------

def genkey_main(argv: list[str]) -> int:
    """`mailengine dkim genkey DOMAIN SELECTOR [--algorithm rsa|ed25519] [--bits N] [--dir DIR]`"""
    p = argparse.ArgumentParser(
        prog="mailengine dkim genkey",
        description="Write a DKIM key pair and print the DNS TXT record to publish.")
    p.add_argument("domain")
    p.add_argument("selector")
    p.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa")
    p.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    p.add_argument("--dir", help="where to write the key (default HOME/dkim)")
    p.add_argument("--home", help="the MailEngine home directory")
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    args = p.parse_args(argv)
    try:
        entry = parse_entry(f"{args.domain},{args.selector},x,{args.algorithm}")
        key = generate_key(args.algorithm, args.bits)
    except ValueError as e:
        print(f"mailengine dkim genkey: {e}", file=sys.stderr)
        return 2
    home = resolve_home(args.home)
    directory = Path(args.dir).absolute() if args.dir else home / "dkim"
    name = f"{entry.domain}.{entry.selector}.{args.algorithm}"
    keyfile, txtfile = directory / f"{name}.key", directory / f"{name}.txt"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    record = dns_txt_record(entry.domain, entry.selector, key)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if args.force:
            keyfile.unlink(missing_ok=True)
        # O_EXCL with mode 0600: the private key is never readable by others, not even briefly
        fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        txtfile.write_text(record + "\n")
    except FileExistsError:
        print(f"mailengine dkim genkey: {keyfile} exists; use another selector or --force",
              file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mailengine dkim genkey: {e}", file=sys.stderr)
        return 1
    try:
        shown = keyfile.relative_to(home)
    except ValueError:
        shown = keyfile
    print(f"Private key written to {keyfile} (mode 600).")
    print(f"Publish this DNS record (also in {txtfile}):\n")
    print(record)
    print(f"\nThen add to [dkim] signing_table in mailengine.toml:\n"
          f'  "{entry.domain},{entry.selector},{shown},{args.algorithm}"')
    return 0
