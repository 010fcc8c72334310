"""Benchmark: DKIM signatures per second on one core, MailEngine's signer against dkimpy's.

    python3 bench/dkim_sign.py [--seconds 3] [--size 4096]

Signs a realistic message of --size bytes (headers + quoted-printable-ish text with folded
headers and some trailing blanks, relaxed/relaxed) over and over with RSA-2048 and Ed25519 keys,
both through mailengine.dkim (canonicalization here, signature by OpenSSL through `cryptography`)
and through dkimpy's `dkim.sign` for comparison. The process is pinned to one CPU. Issue 6 asks
for at least 1,000 RSA-2048 signatures per second per core at 4 KiB.
"""
from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from mailengine import dkim as D  # noqa: E402

TARGET_RSA = 1000


def make_message(size: int) -> bytes:
    head = (b"From: \"News Desk\" <news@example.com>\r\n"
            b"To: subscriber-000123@example.org\r\n"
            b"Subject: Your weekly digest: 12 new articles, 3 events and\r\n"
            b" a special offer for members\r\n"
            b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            b"Message-ID: <20240101000000.123456@mail.example.com>\r\n"
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n"
            b"List-Unsubscribe: <https://example.com/unsub/abc123>, <mailto:unsub@example.com>\r\n"
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
            b"\r\n")
    line = b"Lorem ipsum dolor sit amet,  consectetur adipiscing elit, sed do eiusmod \r\n"
    body = b""
    while len(head) + len(body) + len(line) <= size:
        body += line
    body += b"x" * (size - len(head) - len(body) - 2) + b"\r\n"
    msg = head + body
    assert len(msg) == size
    return msg


def rate(fn, seconds: float) -> float:
    fn()  # warm up
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(20):
            fn()
        n += 20
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes (default 4096)")
    p.add_argument("--no-dkimpy", action="store_true", help="skip the dkimpy comparison")
    args = p.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # single core
    msg = make_message(args.size)
    rsa_key, ed_key = D.generate_key("rsa", 2048), D.generate_key("ed25519")
    results: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, k in (("rsa.key", rsa_key), ("ed.key", ed_key)):
            Path(tmp, name).write_bytes(k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            os.chmod(Path(tmp, name), 0o600)
        rsa_s = D.DKIMSigner(["example.com,rsa,rsa.key"], home=tmp)
        ed_s = D.DKIMSigner(["example.com,ed,ed.key"], home=tmp)
        both = D.DKIMSigner(["example.com,rsa,rsa.key", "example.com,ed,ed.key"], home=tmp)
        assert not rsa_s.problems() and rsa_s.sign(msg, "example.com")
        results.append(("mailengine rsa-sha256 (2048)",
                        rate(lambda: rsa_s.sign(msg), args.seconds)))
        results.append(("mailengine ed25519-sha256", rate(lambda: ed_s.sign(msg), args.seconds)))
        results.append(("mailengine rsa + ed25519 (2 sigs)", rate(lambda: both.sign(msg),
                                                                   args.seconds)))
        results.append(("mailengine canonicalization only", rate(
            lambda: D.canon_body(D.split_message(msg)[1], True), args.seconds)))
    if not args.no_dkimpy:
        import dkim
        rsa_pem = rsa_key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption())
        results.append(("dkimpy rsa-sha256 (2048)", rate(lambda: dkim.sign(
            msg, b"rsa", b"example.com", rsa_pem), args.seconds)))
        try:
            import nacl  # noqa: F401
            seed = base64.b64encode(ed_key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption()))
            results.append(("dkimpy ed25519-sha256", rate(lambda: dkim.sign(
                msg, b"ed", b"example.com", seed, signature_algorithm=b"ed25519-sha256"),
                args.seconds)))
        except ImportError:
            print("(dkimpy ed25519 skipped: PyNaCl not installed)")
    print(f"DKIM signing, {args.size}-byte message, relaxed/relaxed, one core "
          f"({args.seconds:g} s each):")
    for label, r in results:
        print(f"  {label:36s} {r:10,.0f} /s   {1e6 / r:8.1f} us each")
    rsa_rate = results[0][1]
    verdict = "meets" if rsa_rate >= TARGET_RSA else "MISSES"
    print(f"RSA-2048: {rsa_rate:,.0f}/s {verdict} the target of {TARGET_RSA:,}/s per core")
    return 0 if rsa_rate >= TARGET_RSA else 1


if __name__ == "__main__":
    sys.exit(main())
