"""8-bit MIME re-encoded for servers without 8BITMIME (RFC 6152 section 3), checked by parsing
the result back with Python's email package: every part decodes to the same content."""
from __future__ import annotations

import email
import email.policy

from mailengine.downgrade import seven_bit

MIXED = (b"From: a@src.test\r\nTo: b@x.test\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
         b"Content-Type: multipart/mixed; boundary=\"XX\"\r\n"
         b"Content-Transfer-Encoding: 8bit\r\n\r\n"
         b"preamble\r\n--XX\r\n"
         b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
         b"Gr\xc3\xbc\xc3\x9fe, trailing space \r\n.dot\r\n" + b"x" * 100 + b"\xc3\xa9\r\n"
         b"--XX\r\nContent-Type: application/octet-stream\r\n\r\n\x00\xff\xfe bytes\r\n"
         b"--XX\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
         b"Subject: inner\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=latin-1\r\n"
         b"\r\nd\xe9j\xe0\r\n"
         b"--XX\r\nContent-Type: text/plain\r\n\r\nplain ascii\r\n--XX--\r\n")


def leaves(data: bytes) -> list[tuple[str, bytes]]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    return [(p.get_content_type(), p.get_payload(decode=True)) for p in msg.walk()
            if not p.is_multipart()]


def test_every_8bit_part_is_re_encoded_and_decodes_to_the_same_content():
    out = seven_bit(MIXED)
    assert out is not None and out.isascii()
    assert leaves(out) == leaves(MIXED)  # the same content, part by part
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe, trailing " \
           b"space=20\r\n.dot\r\n" in out
    assert b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n" \
           b"\r\nAP/+IGJ5dGVz\r\n" in out
    assert b"\r\nd=E9j=E0\r\n" in out  # inside the attached message
    # composites that said 8bit say 7bit now; 7-bit parts and the headers are as they were
    assert out.count(b"Content-Transfer-Encoding: 8bit") == 0
    assert out.startswith(b"From: a@src.test\r\nTo: b@x.test\r\nSubject: parts\r\n")
    assert b"Content-Type: text/plain\r\n\r\nplain ascii\r\n--XX--" in out
    assert all(len(line) <= 78 for line in out.split(b"\r\n"))


def test_what_cannot_be_converted_is_none():
    body = b"Content-Type: text/plain\r\n\r\nd\xc3\xa9j\xc3\xa0\r\n"
    assert seven_bit(b"Subject: no MIME\r\n" + body) is None
    assert seven_bit("Subject: café\r\nMIME-Version: 1.0\r\n".encode() + body) is None
    assert seven_bit(b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: base64\r\n"
                     b"Content-Type: text/plain\r\n\r\n\xc3\xa9\r\n") is None
    assert seven_bit(b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
                     b"pr\xc3\xa9amble\r\n--B\r\nContent-Type: text/plain\r\n\r\nx\r\n--B--\r\n"
                     ) is None
