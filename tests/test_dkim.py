"""DKIM signing (mailengine/dkim.py), checked by two independent verifiers over real DNS.

The public keys are published in a TestDNSServer (dnsmasq on loopback). dkimpy reads them with a
real dnspython query to that server. OpenDKIM's `opendkim-testmsg` (and dkimpy's `dkimverify`
script) use the C library / system resolver, which reads /etc/resolv.conf and only knows port 53:
so the server listens on 127.53.0.1:53 and each verifier runs under `unshare -m` with its own
resolv.conf bind-mounted over /etc/resolv.conf (private to that process). That needs root (CI runs
as root); without it those checks are skipped and say why.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dkim as dkimpy
import dns.message
import dns.query
import pytest
from cryptography.hazmat.primitives import serialization
from dkim.canonicalization import Relaxed, Simple
from hypothesis import HealthCheck, given, settings, strategies as st

from mailengine import config
from mailengine import dkim as D
from mailengine.testing.dnsserver import TestDNSServer

try:
    import nacl  # noqa: F401  (dkimpy verifies ed25519 through PyNaCl)
    HAVE_NACL = True
except ImportError:
    HAVE_NACL = False

NS_HOST = "127.53.0.1"  # a loopback address of its own: port 53 there is ours alone
DOMAIN = "example.test"

MESSAGE = (
    b"Received: from client.example.net (client.example.net [192.0.2.1])\r\n"
    b"\tby mx.example.test with ESMTP id 123; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice Example <alice@example.test>\r\n"
    b"To: bob@example.org,\r\n"
    b"  carol@example.org\r\n"
    b"Subject:  A   folded\r\n"
    b"\t subject  line \r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <m1@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"List-Unsubscribe: <https://example.test/u/1>, <mailto:u@example.test>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"\r\n"
    b"Hello  \t Bob,  \r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln.\r\n"
    b"\r\n\r\n"
)


# --- fixtures: keys, DNS, verifiers ---------------------------------------------------------------

def write_key(path: Path, key: D.PrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dkim")
    write_key(d / "rsa.key", D.generate_key("rsa", 2048))
    write_key(d / "ed.key", D.generate_key("ed25519"))
    write_key(d / "other.key", D.generate_key("rsa", 2048))  # never published
    return d


def key(keydir: Path, name: str) -> D.PrivateKey:
    return D.load_private_key(keydir / name)


def zones_for(keydir: Path) -> dict:
    return {
        f"rsa._domainkey.{DOMAIN}": {"TXT": [tuple(D.dns_txt_strings(key(keydir, "rsa.key")))]},
        f"ed._domainkey.{DOMAIN}": {"TXT": [tuple(D.dns_txt_strings(key(keydir, "ed.key")))]},
        # the "other" key is published under another selector: a wrong key, not a missing one
        f"wrong._domainkey.{DOMAIN}": {"TXT": [tuple(D.dns_txt_strings(key(keydir, "rsa.key")))]},
    }


@pytest.fixture(scope="module")
def dns_server(keydir: Path):
    """The test DNS server on NS_HOST:53 when allowed (root), else on a free port."""
    zones = zones_for(keydir)
    try:
        server = TestDNSServer(zones, host=NS_HOST, port=53).start()
        server.port53 = True
    except RuntimeError:
        server = TestDNSServer(zones, host="127.0.0.1").start()
        server.port53 = False
    resolv = keydir / "resolv.conf"
    resolv.write_text(f"nameserver {server.host}\noptions timeout:2 attempts:2\n")
    server.resolv_conf = resolv
    yield server
    server.stop()


def dkimpy_verify(dns_server: TestDNSServer, message: bytes, index: int = 0) -> bool:
    """dkimpy's verdict on signature `index`, its key fetched from the test server over UDP/TCP."""
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        q = dns.message.make_query(name.decode(), "TXT")
        r, _ = dns.query.udp_with_fallback(q, dns_server.host, port=dns_server.port,
                                           timeout=timeout)
        for rrset in r.answer:
            for rd in rrset:
                return b"".join(rd.strings)
        return None
    try:
        return dkimpy.DKIM(message).verify(index, dnsfunc=dnsfunc)
    except dkimpy.DKIMException:
        return False  # e.g. "body hash mismatch" is raised rather than returned


def with_system_resolver(dns_server: TestDNSServer, argv: list[str], message: bytes):
    if not dns_server.port53:
        pytest.skip("needs root: the system resolver only asks port 53 (CI runs as root)")
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) missing")
    cmd = ["unshare", "-m", "sh", "-c",
           'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(dns_server.resolv_conf), *argv]
    return subprocess.run(cmd, input=message, capture_output=True, timeout=30)


def opendkim_verify(dns_server: TestDNSServer, message: bytes) -> bool:
    """OpenDKIM's verdict (libopendkim through opendkim-testmsg), key from the test server."""
    if not shutil.which("opendkim-testmsg"):
        pytest.skip("opendkim-testmsg missing (Debian: apt-get install opendkim-tools)")
    p = with_system_resolver(dns_server, ["opendkim-testmsg"], message)
    assert p.returncode in (0, 69, 70, 75), p  # 0 good; 70 bad signature; 69/75 key trouble
    return p.returncode == 0


def dkimverify_script(dns_server: TestDNSServer, message: bytes, index: int = 0) -> bool:
    """dkimpy's own `dkimverify` command, resolving through the system resolver."""
    p = with_system_resolver(
        dns_server, [sys.executable, "-m", "dkim.dkimverify", "--index", str(index)], message)
    return p.returncode == 0 and b"signature ok" in p.stdout


def need_nacl(algorithm: str) -> None:
    if algorithm == "ed25519" and not HAVE_NACL:
        pytest.skip("dkimpy needs PyNaCl to verify ed25519 (pip install pynacl)")


def signer(keydir: Path, *entries: str, **kw) -> D.DKIMSigner:
    return D.DKIMSigner(list(entries) or [f"{DOMAIN},rsa,rsa.key,rsa"], home=keydir, **kw)


ENTRY = {"rsa": f"{DOMAIN},rsa,rsa.key,rsa", "ed25519": f"{DOMAIN},ed,ed.key,ed25519"}


def only_signature(signed: bytes, keep: int) -> bytes:
    """The message with only its `keep`-th DKIM-Signature field left."""
    fields, _ = D.split_message(signed)
    sigs = [f + b"\r\n" for f in fields if f.lower().startswith(b"dkim-signature:")]
    out = signed
    for i, s in enumerate(sigs):
        if i != keep:
            out = out.replace(s, b"", 1)
    return out


def tags(header: bytes) -> dict[str, str]:
    value = header.split(b":", 1)[1].replace(b"\r\n", b"").decode()
    return {k.strip(): "".join(v.split()) for k, _, v in
            (t.partition("=") for t in value.split(";") if t.strip())}


# --- both verifiers, both algorithms, every canonicalization -------------------------------------

@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple", "relaxed/simple",
                                   "simple/relaxed"])
def test_signature_verifies_with_dkimpy_and_opendkim(keydir, dns_server, algorithm, canon):
    need_nacl(algorithm)
    header = signer(keydir, ENTRY[algorithm], canonicalization=canon).sign(MESSAGE, DOMAIN)
    assert header.startswith(b"DKIM-Signature: ") and header.endswith(b"\r\n")
    t = tags(header)
    assert t["a"] == f"{algorithm}-sha256" and t["c"] == canon and t["d"] == DOMAIN
    signed = header + MESSAGE
    assert dkimpy_verify(dns_server, signed)
    assert opendkim_verify(dns_server, signed)
    # and the key really came over DNS from the test server
    assert dns_server.count(f"{t['s']}._domainkey.{DOMAIN}", "TXT") >= 2


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_dkimverify_script_agrees(keydir, dns_server, algorithm):
    need_nacl(algorithm)
    signed = signer(keydir, ENTRY[algorithm]).sign(MESSAGE, DOMAIN) + MESSAGE
    assert dkimverify_script(dns_server, signed)
    assert not dkimverify_script(dns_server, signed.replace(b"Bob", b"Rob"))


def test_rsa_and_ed25519_at_once(keydir, dns_server):
    need_nacl("ed25519")
    header = signer(keydir, ENTRY["rsa"], ENTRY["ed25519"]).sign(MESSAGE, DOMAIN)
    assert header.count(b"DKIM-Signature:") == 2
    signed = header + MESSAGE
    sigs = [f for f in D.split_message(signed)[0] if f.startswith(b"DKIM-Signature:")]
    assert [tags(s)["a"] for s in sigs] == ["rsa-sha256", "ed25519-sha256"]
    assert tags(sigs[0])["bh"] == tags(sigs[1])["bh"]  # one body hash for both
    assert dkimpy_verify(dns_server, signed, 0) and dkimpy_verify(dns_server, signed, 1)
    # OpenDKIM passes a message if any signature is good: check each one alone
    for i in (0, 1):
        alone = only_signature(signed, i)
        assert alone.count(b"DKIM-Signature:") == 1
        assert opendkim_verify(dns_server, alone)
    # a broken body breaks both
    tampered = signed.replace(b"K\xc3\xb6ln", b"Koeln")
    assert not dkimpy_verify(dns_server, tampered, 0)
    assert not dkimpy_verify(dns_server, tampered, 1)
    assert not opendkim_verify(dns_server, tampered)


# --- altered in transit ---------------------------------------------------------------------------

ALTERATIONS = {
    "body word": lambda m: m.replace(b"Hello", b"Hallo"),
    "body line added": lambda m: m.replace(b"\r\n\r\nGr", b"\r\n\r\nP.S. buy now\r\n\r\nGr"),
    "subject": lambda m: m.replace(b"folded", b"FOLDED"),
    "second From added": lambda m: m.replace(b"To: ", b"From: mallory@evil.test\r\nTo: ", 1),
    "List-Unsubscribe": lambda m: m.replace(b"https://example.test/u/1", b"https://evil.test/"),
    "To replaced": lambda m: m.replace(b"bob@example.org", b"eve@example.org"),
}


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
@pytest.mark.parametrize("change", sorted(ALTERATIONS))
def test_altered_message_fails_both_verifiers(keydir, dns_server, algorithm, change):
    need_nacl(algorithm)
    signed = signer(keydir, ENTRY[algorithm]).sign(MESSAGE, DOMAIN) + MESSAGE
    altered = ALTERATIONS[change](signed)
    assert altered != signed
    assert dkimpy_verify(dns_server, signed) and opendkim_verify(dns_server, signed)
    assert not dkimpy_verify(dns_server, altered)
    assert not opendkim_verify(dns_server, altered)


def test_wrong_key_in_dns_fails(keydir, dns_server):
    # signed with other.key, but selector "wrong" publishes rsa.key's public half
    header = signer(keydir, f"{DOMAIN},wrong,other.key,rsa").sign(MESSAGE, DOMAIN)
    assert not dkimpy_verify(dns_server, header + MESSAGE)
    assert not opendkim_verify(dns_server, header + MESSAGE)


def test_unpublished_selector_fails(keydir, dns_server):
    header = signer(keydir, f"{DOMAIN},nosuch,rsa.key,rsa").sign(MESSAGE, DOMAIN)
    assert not dkimpy_verify(dns_server, header + MESSAGE)
    assert not opendkim_verify(dns_server, header + MESSAGE)


def test_relaxed_survives_refolding_simple_does_not(keydir, dns_server):
    # a relay that unfolds / re-wraps headers and trims trailing blanks in the body
    def refold(m: bytes) -> bytes:
        return (m.replace(b"To: bob@example.org,\r\n  carol@example.org",
                          b"To: bob@example.org, carol@example.org")
                 .replace(b"Subject:  A   folded\r\n\t subject  line ",
                          b"Subject: A folded\r\n subject line")
                 .replace(b"Hello  \t Bob,  \r\n", b"Hello Bob,\r\n"))
    relaxed = signer(keydir, canonicalization="relaxed/relaxed").sign(MESSAGE, DOMAIN) + MESSAGE
    simple = signer(keydir, canonicalization="simple/simple").sign(MESSAGE, DOMAIN) + MESSAGE
    assert refold(relaxed) != relaxed
    assert dkimpy_verify(dns_server, refold(relaxed))
    assert opendkim_verify(dns_server, refold(relaxed))
    assert not dkimpy_verify(dns_server, refold(simple))
    assert not opendkim_verify(dns_server, refold(simple))


# --- message shapes -------------------------------------------------------------------------------

HEAD = (b"From: alice@example.test\r\nTo: bob@example.org\r\nSubject: shapes\r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <s@example.test>\r\n")
SHAPES = {
    "empty body": HEAD + b"\r\n",
    "headers only, no blank line": HEAD,
    "only blank lines": HEAD + b"\r\n\r\n\r\n\r\n",
    "no final CRLF": HEAD + b"\r\nline one\r\nlast line without CRLF",
    "long lines": HEAD + b"\r\n" + (b"x" * 5000 + b" \r\n") * 3 + b"y" * 998 + b"\r\n",
    "8-bit latin-1 body": HEAD + b"\r\nCaf\xe9 cr\xe8me br\xfbl\xe9e\r\n\xff\xfe\x80\r\n",
    "8-bit utf-8 header": HEAD.replace(b"shapes", "Grüße aus Köln ✓".encode())
    + b"\r\nunicode \xe2\x9c\x93\r\n",
    "whitespace lines at end": HEAD + b"\r\ntext\r\n \t \r\n  \r\n\r\n",
    "tabs and runs": HEAD + b"\r\n\ta\t\tb  c \t\r\n  lead\r\n",
    "long folded header": HEAD.replace(b"To: bob@example.org", b"To: " + b",\r\n\t".join(
        b"user%d@example.org" % i for i in range(60))) + b"\r\nmany recipients\r\n",
    "dot lines": HEAD + b"\r\n.\r\n..leading dots\r\n.\r\n",
}


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_message_shapes_verify(keydir, dns_server, shape, canon):
    message = SHAPES[shape]
    signed = signer(keydir, canonicalization=canon).sign(message, DOMAIN) + message
    # what the receiver gets: SMTP ends the data with CRLF (the final "." line follows it)
    wire = signed if signed.endswith(b"\r\n") else signed + b"\r\n"
    assert dkimpy_verify(dns_server, wire)
    if shape == "headers only, no blank line" and canon == "simple/simple":
        # OpenDKIM quirk: with simple header canonicalization it hashes the last header field
        # differently when no blank line follows it (checked: fine when that field is not
        # signed, and under relaxed, the default). dkimpy agrees with us (RFC 6376 3.4.1).
        assert not opendkim_verify(dns_server, wire)
    else:
        assert opendkim_verify(dns_server, wire)
    if wire is not signed:  # the stored form, without its final CRLF, verifies too
        assert dkimpy_verify(dns_server, signed)


def test_body_hash_of_empty_body_matches_rfc(keydir):
    # RFC 6376 3.4.3/3.4.4: simple empty body = CRLF, relaxed empty body = nothing
    for canon, body in (("simple/simple", b"\r\n"), ("relaxed/relaxed", b"")):
        h = signer(keydir, canonicalization=canon).sign(HEAD + b"\r\n", DOMAIN)
        assert tags(h)["bh"] == base64.b64encode(hashlib.sha256(body).digest()).decode()


def test_bare_lf_message_is_signed_in_crlf_wire_form(keydir, dns_server):
    lf = MESSAGE.replace(b"\r\n", b"\n")
    header = signer(keydir).sign(lf, DOMAIN)
    assert tags(header)["bh"] == tags(signer(keydir).sign(MESSAGE, DOMAIN))["bh"]
    assert dkimpy_verify(dns_server, header + MESSAGE)
    assert opendkim_verify(dns_server, header + MESSAGE)


# --- what is signed -------------------------------------------------------------------------------

def test_signed_header_list(keydir):
    h = tags(signer(keydir).sign(MESSAGE, DOMAIN))["h"].split(":")
    # From over-signed; each present default field once; trace fields never
    assert h.count("from") == 2
    for name in ("to", "subject", "date", "message-id", "mime-version", "content-type",
                 "content-transfer-encoding", "list-unsubscribe", "list-unsubscribe-post"):
        assert h.count(name) == 1, name
    assert "received" not in h and "cc" not in h and "reply-to" not in h  # absent: not listed


def test_repeated_fields_listed_once_each(keydir, dns_server):
    # Keywords may appear many times (RFC 5322 3.6); OpenDKIM refuses a second To outright
    msg = MESSAGE.replace(b"Date:", b"Keywords: one\r\nKeywords: two\r\nDate:", 1)
    header = signer(keydir, headers=D.DEFAULT_HEADERS + ["Keywords"]).sign(msg, DOMAIN)
    assert tags(header)["h"].split(":").count("keywords") == 2
    assert dkimpy_verify(dns_server, header + msg) and opendkim_verify(dns_server, header + msg)
    for changed in (msg.replace(b"Keywords: one\r\n", b""),  # one removed
                    msg.replace(b"Keywords: one\r\nKeywords: two", b"Keywords: two\r\n"
                                b"Keywords: one")):  # order swapped
        assert not dkimpy_verify(dns_server, header + changed)
        assert not opendkim_verify(dns_server, header + changed)


def test_custom_headers_and_oversigning(keydir, dns_server):
    s = signer(keydir, headers=["From", "Subject"], oversign_headers=["From", "Subject", "Cc"])
    header = s.sign(MESSAGE, DOMAIN)
    assert tags(header)["h"] == "from:from:subject:subject"
    assert dkimpy_verify(dns_server, header + MESSAGE)
    added = (header + MESSAGE).replace(b"Date:", b"Subject: also\r\nDate:", 1)
    assert not dkimpy_verify(dns_server, added)
    with pytest.raises(ValueError):
        signer(keydir, headers=["Subject"])  # From must be signed


def test_expiry(keydir, dns_server):
    now = time.time()
    header = signer(keydir, expire_seconds=3600, clock=lambda: now).sign(MESSAGE, DOMAIN)
    t = tags(header)
    assert int(t["x"]) == int(t["t"]) + 3600 == int(now) + 3600
    assert dkimpy_verify(dns_server, header + MESSAGE)
    assert opendkim_verify(dns_server, header + MESSAGE)
    old = signer(keydir, expire_seconds=60, clock=lambda: now - 86400).sign(MESSAGE, DOMAIN)
    assert not dkimpy_verify(dns_server, old + MESSAGE)  # expired a day ago (dkimpy allows 10 h)
    assert not opendkim_verify(dns_server, old + MESSAGE)
    assert "x" not in tags(signer(keydir).sign(MESSAGE, DOMAIN))  # default: no expiry


def test_signature_lines_are_short(keydir):
    msg = SHAPES["long folded header"]
    header = signer(keydir, ENTRY["rsa"], ENTRY["ed25519"]).sign(msg, DOMAIN)
    assert all(len(line) <= 80 for line in header.split(b"\r\n"))


# --- which domain signs ---------------------------------------------------------------------------

def test_domain_choice(keydir, tmp_path):
    s = D.DKIMSigner([f"{DOMAIN},rsa,rsa.key", "news.example.test,ed,ed.key",
                      "bounce.example.net,rsa,rsa.key"], home=keydir)
    def d_of(msg: bytes, sender: str | None) -> str | None:
        h = s.sign(msg, sender)
        return tags(h)["d"] if h else None
    msg = MESSAGE
    assert d_of(msg, "other.example") == DOMAIN  # the From domain wins over the envelope
    assert d_of(msg.replace(b"alice@example.test", b"a@mail.example.test"), None) == DOMAIN
    news = msg.replace(b"alice@example.test", b"a@NEWS.Example.Test")
    assert d_of(news, None) == "news.example.test"  # the closest entry
    assert tags(s.sign(news, None))["a"] == "ed25519-sha256"  # algorithm from the key
    foreign = msg.replace(b"alice@example.test", b"alice@customer.example")
    assert d_of(foreign, "bounce.example.net") == "bounce.example.net"  # envelope fallback
    assert d_of(foreign, "b-1@Bounce.Example.NET") == "bounce.example.net"  # or its address
    assert d_of(foreign, "unknown.example") is None
    assert s.sign(foreign, None) == b""
    two_from = msg.replace(b"To:", b"From: x@customer.example\r\nTo:", 1)
    assert d_of(two_from, "bounce.example.net") == "bounce.example.net"
    assert D.DKIMSigner([], home=keydir).sign(msg, DOMAIN) == b""


@pytest.mark.parametrize("value,domain", [
    (b" Alice <alice@Example.TEST>", "example.test"),
    (b" alice@example.test (Alice)", "example.test"),
    (b" \"A, B\" <a@x.example>", "x.example"),
    (b" =?utf-8?q?J=C3=B6rg?=\r\n <j@y.example>", "y.example"),
    (b" undisclosed-recipients:;", None),
    (b" no address", None),
])
def test_from_domain(value, domain):
    assert D.from_domain(value) == domain


# --- missing and unusable keys --------------------------------------------------------------------

def test_missing_key_sent_unsigned_with_warning(keydir, tmp_path, caplog):
    s = D.DKIMSigner([f"{DOMAIN},rsa,missing.key,rsa"], home=tmp_path)
    problems = s.problems()
    assert len(problems) == 1
    assert "missing.key not found" in problems[0] and "sent unsigned" in problems[0]
    with caplog.at_level(logging.WARNING, logger="mailengine.dkim"):
        assert s.sign(MESSAGE, DOMAIN) == b""
        assert s.sign(MESSAGE, DOMAIN) == b""
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # rate-limited, but never silent
    assert DOMAIN in warnings[0].getMessage() and "unsigned" in warnings[0].getMessage()
    assert s.unsigned == {DOMAIN: 2}
    assert s.dns_records()[0]["problem"] and s.dns_records()[0]["txt"] is None


def test_missing_key_hold(tmp_path):
    s = D.DKIMSigner([f"{DOMAIN},rsa,missing.key,rsa"], home=tmp_path, missing_key="hold")
    assert "will be held" in s.problems()[0]
    with pytest.raises(D.DKIMHold) as e:
        s.sign(MESSAGE, DOMAIN)
    assert e.value.domain == DOMAIN and "not found" in e.value.reason
    assert s.held == {DOMAIN: 1}
    # other domains are not affected
    assert s.sign(MESSAGE.replace(b"alice@example.test", b"a@else.example"), None) == b""


def test_key_put_in_place_later_is_picked_up(keydir, tmp_path, dns_server):
    now = [1000.0]
    s = D.DKIMSigner([f"{DOMAIN},rsa,late.key,rsa"], home=tmp_path, missing_key="hold",
                     clock=lambda: now[0])
    with pytest.raises(D.DKIMHold):
        s.sign(MESSAGE, DOMAIN)
    shutil.copy(keydir / "rsa.key", tmp_path / "late.key")
    (tmp_path / "late.key").chmod(0o600)
    now[0] += 60  # reloaded on its own after a while; reload() does it at once
    header = s.sign(MESSAGE, DOMAIN)
    assert header and s.problems() == []
    assert dkimpy_verify(dns_server, header + MESSAGE)


@pytest.mark.parametrize("content,why", [
    (b"not a key at all\n", "unusable"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "unusable"),
])
def test_unusable_key_file(tmp_path, content, why):
    (tmp_path / "bad.key").write_bytes(content)
    s = D.DKIMSigner([f"{DOMAIN},rsa,bad.key,rsa"], home=tmp_path)
    assert why in s.problems()[0]
    assert s.sign(MESSAGE, DOMAIN) == b""


def test_key_file_is_a_directory(tmp_path):
    (tmp_path / "dir.key").mkdir()
    s = D.DKIMSigner([f"{DOMAIN},rsa,dir.key"], home=tmp_path)
    assert "dir.key" in s.problems()[0]


def test_unreadable_key_file(keydir):
    """A key file this user may not read; as root, the check runs as 'nobody' (root reads all)."""
    d = Path(tempfile.mkdtemp(prefix="dkim-perm-"))
    try:
        d.chmod(0o755)
        shutil.copy(keydir / "rsa.key", d / "locked.key")
        (d / "locked.key").chmod(0o600)
        code = ("import sys; from mailengine.dkim import DKIMSigner; "
                f"print(DKIMSigner(['{DOMAIN},rsa,locked.key'], home=sys.argv[1]).problems()[0])")
        argv = [sys.executable, "-c", code, str(d)]
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("setpriv (util-linux) missing")
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
        root = Path(__file__).resolve().parent.parent
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=root,
                           env={**os.environ, "PYTHONPATH": str(root)})
        assert p.returncode == 0, p.stderr
        assert "locked.key not readable by this user" in p.stdout
        assert "sent unsigned" in p.stdout
    finally:
        shutil.rmtree(d)


def test_algorithm_mismatch_and_weak_and_exposed_keys(keydir, tmp_path):
    write_key(tmp_path / "small.key", D.generate_key("rsa", 1024)).chmod(0o644)
    shutil.copy(keydir / "rsa.key", tmp_path / "rsa.key")
    s = D.DKIMSigner([f"{DOMAIN},ed,rsa.key,ed25519", f"{DOMAIN},small,small.key,rsa"],
                     home=tmp_path)
    text = "\n".join(s.problems())
    assert "holds an rsa-sha256 key, the table says ed25519-sha256" in text
    assert "signed with the other key only" in text
    assert "RSA-1024 is weak" in text and "readable by other users" in text
    header = s.sign(MESSAGE, DOMAIN)  # the usable key still signs
    assert header.count(b"DKIM-Signature:") == 1 and tags(header)["s"] == "small"


# --- keys: genkey, DNS record, other formats ------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_genkey_main_end_to_end(tmp_path, capsys, dns_server, algorithm):
    need_nacl(algorithm)
    home = tmp_path / "home"
    rc = D.genkey_main(["gen.example.test", "s2026", "--algorithm", algorithm,
                        "--home", str(home)])
    assert rc == 0
    out = capsys.readouterr().out
    keyfile = home / "dkim" / f"gen.example.test.s2026.{algorithm}.key"
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert stat.S_IMODE(keyfile.parent.stat().st_mode) == 0o700
    record = next(line for line in out.splitlines() if " IN TXT " in line)
    assert record.startswith("s2026._domainkey.gen.example.test. IN TXT \"v=DKIM1; k=")
    assert (keyfile.with_suffix(".txt")).read_text().strip() == record
    strings = [s.strip('"') for s in record.split(" IN TXT ", 1)[1].split('" "')]
    assert all(len(s) <= 255 for s in strings)
    assert f"gen.example.test,s2026,dkim/gen.example.test.s2026.{algorithm}.key" in out
    # publish exactly what was printed, sign with the written key, verify over DNS
    dns_server.set_records("s2026._domainkey.gen.example.test", {"TXT": [tuple(strings)]})
    entry = f"gen.example.test,s2026,dkim/gen.example.test.s2026.{algorithm}.key"
    msg = MESSAGE.replace(b"alice@example.test", b"alice@gen.example.test")
    signed = D.DKIMSigner([entry], home=home).sign(msg, None) + msg
    assert dkimpy_verify(dns_server, signed)
    assert opendkim_verify(dns_server, signed)
    # never overwrites a key by accident
    assert D.genkey_main(["gen.example.test", "s2026", "--algorithm", algorithm,
                          "--home", str(home)]) == 1
    assert "exists" in capsys.readouterr().err


def test_genkey_rsa_length_and_bad_input(tmp_path, capsys):
    assert D.genkey_main(["k.example", "a", "--bits", "3072", "--dir", str(tmp_path)]) == 0
    k = D.load_private_key(tmp_path / "k.example.a.rsa.key")
    assert k.key_size == 3072
    rec = D.dns_txt_strings(k)
    assert len(rec) == 3 and all(len(s) <= 255 for s in rec)
    assert rec[0].startswith("v=DKIM1; k=rsa; p=")
    assert D.genkey_main(["k.example", "b", "--bits", "512", "--dir", str(tmp_path)]) == 2
    assert D.genkey_main(["not a domain", "b", "--dir", str(tmp_path)]) == 2
    assert D.genkey_main(["k.example", "bad selector!", "--dir", str(tmp_path)]) == 2


def test_dns_records_for_admin(keydir):
    s = signer(keydir, ENTRY["rsa"], ENTRY["ed25519"])
    recs = s.dns_records()
    assert [r["name"] for r in recs] == [f"rsa._domainkey.{DOMAIN}", f"ed._domainkey.{DOMAIN}"]
    assert recs[0]["record"] == D.dns_txt_record(DOMAIN, "rsa", key(keydir, "rsa.key"))
    assert "".join(recs[1]["txt"]).startswith("v=DKIM1; k=ed25519; p=")
    assert all(r["problem"] is None for r in recs)


def test_opendkim_genkey_key_interoperates(tmp_path, dns_server):
    """A key made by OpenDKIM's own opendkim-genkey signs, and the record it wrote verifies."""
    if not shutil.which("opendkim-genkey"):
        pytest.skip("opendkim-genkey missing (Debian: opendkim-tools)")
    subprocess.run(["opendkim-genkey", "-b", "2048", "-d", "od.example.test", "-s", "od",
                    "-D", str(tmp_path)], check=True)
    assert b"PRIVATE KEY-----" in (tmp_path / "od.private").read_bytes()
    txt = (tmp_path / "od.txt").read_text()
    strings = [p.split('"')[0] for p in txt.split('"')[1::2]]
    dns_server.set_records("od._domainkey.od.example.test", {"TXT": [tuple(strings)]})
    msg = MESSAGE.replace(b"alice@example.test", b"alice@od.example.test")
    s = D.DKIMSigner(["od.example.test,od,od.private"], home=tmp_path)
    assert s.problems() == []
    signed = s.sign(msg, None) + msg
    assert dkimpy_verify(dns_server, signed) and opendkim_verify(dns_server, signed)
    # and our published record equals the one OpenDKIM wrote, modulo its extra tags
    ours = "".join(D.dns_txt_strings(D.load_private_key(tmp_path / "od.private")))
    assert ours.split("p=")[1] == "".join(strings).split("p=")[1]


def test_dkimpy_ed25519_seed_key_file(tmp_path, keydir, dns_server):
    need_nacl("ed25519")
    raw = key(keydir, "ed.key").private_bytes(serialization.Encoding.Raw,
                                             serialization.PrivateFormat.Raw,
                                             serialization.NoEncryption())
    (tmp_path / "seed.key").write_bytes(base64.b64encode(raw) + b"\n")  # dknewkey's format
    header = D.DKIMSigner([f"{DOMAIN},ed,seed.key"], home=tmp_path).sign(MESSAGE, DOMAIN)
    assert tags(header)["a"] == "ed25519-sha256"
    assert dkimpy_verify(dns_server, header + MESSAGE)


# --- settings -------------------------------------------------------------------------------------

def test_settings_validate_with_the_config_machinery():
    by_key = {s.key: s for s in D.DKIM_SETTINGS}
    assert set(by_key) == {"signing_table", "headers", "oversign_headers", "canonicalization",
                           "expire_seconds", "missing_key"}
    for s in D.DKIM_SETTINGS:
        assert s.section == "dkim" and config.coerce(s, s.default) == s.default
    assert config.coerce(by_key["signing_table"], ["a.example,s1,dkim/a.key,rsa",
                                                   "a.example,s2,dkim/b.key"])
    bad = {
        "signing_table": ["a.example,s1"], "canonicalization": "loose/relaxed",
        "missing_key": "drop", "headers": ["Subject"], "expire_seconds": -1,
    }
    for k, v in bad.items():
        with pytest.raises(config.ConfigError):
            config.coerce(by_key[k], v)
    with pytest.raises(config.ConfigError):
        config.coerce(by_key["signing_table"], ["a.example,s1,k.key,dsa"])


def test_from_config(keydir):
    class Cfg:  # what config.Config offers: home and values by "section.key"
        home = keydir
        values = {"dkim.signing_table": [ENTRY["rsa"]], "dkim.canonicalization": "simple/relaxed",
                  "dkim.expire_seconds": 600, "dkim.missing_key": "hold"}
    s = D.DKIMSigner.from_config(Cfg())
    assert s.missing_key == "hold" and s.expire_seconds == 600
    t = tags(s.sign(MESSAGE, DOMAIN))
    assert t["c"] == "simple/relaxed" and int(t["x"]) - int(t["t"]) == 600


def test_parse_entry():
    e = D.parse_entry(" Example.TEST , Sel1 , dkim/k.pem , ed25519 ")
    assert (e.domain, e.selector, e.keyfile, e.algorithm) == (
        "example.test", "sel1", "dkim/k.pem", "ed25519-sha256")
    assert D.parse_entry("b\u00fccher.example,s,k").domain == "xn--bcher-kva.example"
    for bad in ("example.test,s", "example.test,,k", "localhost,s,k", "a.example,s,k,rsa,x"):
        with pytest.raises(ValueError):
            D.parse_entry(bad)


# --- the signature kept beside ID.dat -------------------------------------------------------------

def test_load_or_sign_signs_once(keydir, tmp_path, dns_server):
    now = [time.time()]
    s = signer(keydir, expire_seconds=86400 * 3, clock=lambda: now[0])
    dat = tmp_path / "P1T1C1@host.example.dat"
    dat.write_bytes(MESSAGE)
    first = D.load_or_sign(s, dat, MESSAGE, DOMAIN)
    assert dat.read_bytes() == MESSAGE  # ID.dat stays as received
    assert (tmp_path / "P1T1C1@host.example.dkim").read_bytes() == first
    now[0] += 3600
    assert D.load_or_sign(s, dat, MESSAGE, DOMAIN) == first  # a retry reuses it
    now[0] += 86400 * 3 - 1800  # within the margin of x=: signed anew
    again = D.load_or_sign(s, dat, MESSAGE, DOMAIN)
    assert again != first and int(tags(again)["x"]) == int(now[0]) + 86400 * 3
    # key rotated away from the kept selector: signed anew with the new one
    s2 = signer(keydir, ENTRY["ed25519"], clock=lambda: now[0])
    rotated = D.load_or_sign(s2, dat, MESSAGE, DOMAIN)
    assert tags(rotated)["s"] == "ed"


# --- canonicalization against dkimpy's, on random input -------------------------------------------

_pieces = st.sampled_from([b"a", b"Z", b" ", b"  ", b"\t", b"\r\n", b"\r\n\r\n", b"\xc3\xa9",
                           b"\xff", b".", b":"])
_body = st.lists(_pieces, max_size=60).map(b"".join)


@given(_body)
@settings(max_examples=400, deadline=None)
def test_body_canonicalization_matches_dkimpy(body):
    wire = body if not body or body.endswith(b"\r\n") else body + b"\r\n"
    assert D.canon_body(body, relaxed=True) == Relaxed.canonicalize_body(wire)
    assert D.canon_body(body, relaxed=False) == Simple.canonicalize_body(wire)


_value = st.lists(st.sampled_from([b"x", b"Y", b" ", b"\t", b"\r\n ", b"\r\n\t", b"\xc3\xa9",
                                   b":", b";"]), max_size=30).map(b"".join)


@given(st.sampled_from([b"Subject", b"FROM", b"x-Thing "]), _value)
@settings(max_examples=300, deadline=None)
def test_header_canonicalization_matches_dkimpy(name, value):
    field = name + b":" + value
    [(n, v)] = Relaxed.canonicalize_headers([(name, value)])
    assert D.canon_header(field, relaxed=True) == n + b":" + v
    assert D.canon_header(field, relaxed=False) == field + b"\r\n"


@given(st.lists(st.sampled_from([b"word", b" ", b"  ", b"\t", b"\r\n", b"\xe2\x9c\x93"]),
                max_size=40).map(b"".join),
       st.sampled_from(["relaxed/relaxed", "simple/simple"]))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_bodies_verify(keydir, dns_server, body, canon):
    message = HEAD + b"\r\n" + body
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    header = signer(keydir, canonicalization=canon).sign(message, DOMAIN)
    assert dkimpy_verify(dns_server, header + message)
