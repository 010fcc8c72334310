"""The pure SMTP helpers (mailengine/smtp/wire.py): replies, addresses, parameters, xtext, dots."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailengine.smtp import wire
from mailengine.smtp.wire import SyntaxProblem

PROPS = settings(max_examples=500, deadline=None)


# --- replies -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, out", [
    ((250, "2.0.0", "OK"), b"250 2.0.0 OK\r\n"),
    ((220, "", "mx ready"), b"220 mx ready\r\n"),
    ((334, "", ""), b"334 \r\n"),
    ((550, "5.7.1", "a\nb\nc"), b"550-5.7.1 a\r\n550-5.7.1 b\r\n550 5.7.1 c\r\n"),
    ((214, "", "a\nb"), b"214-a\r\n214 b\r\n"),
    ((250, "2.0.0", "caf\u00e9"), "250 2.0.0 caf\u00e9\r\n".encode()),
])
def test_reply(args, out):
    assert wire.reply(*args) == out


def test_ehlo_reply():
    assert wire.ehlo_reply(250, ["mx Hello c", "PIPELINING", "SIZE 10"]) == (
        b"250-mx Hello c\r\n250-PIPELINING\r\n250 SIZE 10\r\n")
    assert wire.ehlo_reply(250, ["mx"]) == b"250 mx\r\n"


# --- split_path ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arg, prefix, out", [
    ("FROM:<a@b>", "FROM:", ("<a@b>", "")),
    ("from:<a@b> SIZE=1", "FROM:", ("<a@b>", "SIZE=1")),
    ("From: <a@b>", "FROM:", ("<a@b>", "")),
    ("FROM:   <a@b>   X  Y ", "FROM:", ("<a@b>", "X  Y")),
    ("FROM:<>", "FROM:", ("<>", "")),
    ("TO:<a@b>NOTIFY=NEVER", "TO:", ("<a@b>", "NOTIFY=NEVER")),
    ('TO:<"a>b"@c> X', "TO:", ('<"a>b"@c>', "X")),
    ('TO:<"a\\">b"@c>', "TO:", ('<"a\\">b"@c>', "")),
    ('TO:<"a\\\\">b', "TO:", ('<"a\\\\">', "b")),
    ("TO:<@r:a@b> X", "TO:", ("<@r:a@b>", "X")),
])
def test_split_path(arg, prefix, out):
    assert wire.split_path(arg, prefix) == out


@pytest.mark.parametrize("arg, prefix", [
    ("", "FROM:"), ("FROM", "FROM:"), ("FROM<a@b>", "FROM:"), ("FROM:a@b", "FROM:"),
    ("FROM:<a@b", "FROM:"), ('TO:<"a@b>', "TO:"), ("TO:<a@b>", "FROM:"), ("FROM :<a@b>", "FROM:"),
    ('TO:<"a\\">', "TO:"),
])
def test_split_path_refuses(arg, prefix):
    with pytest.raises(SyntaxProblem):
        wire.split_path(arg, prefix)


# --- parse_mailbox -------------------------------------------------------------------------------

@pytest.mark.parametrize("path, out", [
    ("<a@b.example>", "a@b.example"),
    ("<A.B+tag-x@Sub.B.Example>", "A.B+tag-x@Sub.B.Example"),
    ("<!#$%&'*+/=?^_`{|}~-@b.example>", "!#$%&'*+/=?^_`{|}~-@b.example"),
    ("<@r.example:a@b.example>", "a@b.example"),
    ("<@r1.example,@r2.example:a@b.example>", "a@b.example"),
    ("<@r.example:\"x:y\"@b.example>", '"x:y"@b.example'),
    ('<"a b"@b.example>', '"a b"@b.example'),
    ('<"a>b@c"@d.example>', '"a>b@c"@d.example'),
    ('<"a\\"b"@d.example>', '"a\\"b"@d.example'),
    ('<"a\\\\"@d.example>', '"a\\\\"@d.example'),
    ('<""@d.example>', '""@d.example'),
    ("<a@[192.0.2.1]>", "a@[192.0.2.1]"),
    ("<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]"),
    ("<a@localhost>", "a@localhost"),
    ("<a@1.2.3.4>", "a@1.2.3.4"),
    ("<\u00fc@\u00e4.example>", "\u00fc@\u00e4.example"),  # the server asks for SMTPUTF8 itself
    ("<" + "l" * 64 + "@" + "d" * 63 + ".example>", "l" * 64 + "@" + "d" * 63 + ".example"),
])
def test_parse_mailbox(path, out):
    assert wire.parse_mailbox(path) == out


@pytest.mark.parametrize("path", [
    "<>", "<a>", "<@b.example>", "<a@>", "<a@b@c.example>", "<a b@c.example>", "<a..b@c.example>",
    "<.a@c.example>", "<a.@c.example>", '<"a"b"@c.example>', '<"a\\"@c.example>', "<a@-b.example>",
    "<a@b-.example>", "<a@b..example>", "<a@b.example.>", "<a@b_c.example>", "<a@[foo]>",
    "<a@[1.2.3.4>", "<@r.example a@b.example>", "<@r.example:>", "<a\x00@b.example>",
    "<a@b\x00.example>", "<a@b .example>", "<(comment)a@b.example>", "<a@" + "d" * 256 + ">",
    "<" + "l" * 257 + "@b.example>", '<"a\nb"@c.example>', '<"\x7f"@c.example>',
])
def test_parse_mailbox_refuses(path):
    with pytest.raises(SyntaxProblem):
        wire.parse_mailbox(path)


def test_parse_mailbox_empty_only_when_allowed():
    assert wire.parse_mailbox("<>", allow_empty=True) == ""
    with pytest.raises(SyntaxProblem):
        wire.parse_mailbox("<>")


@pytest.mark.parametrize("address, domain", [
    ("a@B.Example.", "b.example"), ('"x@y"@Z.example', "z.example"), ("a@[192.0.2.1]", "[192.0.2.1]"),
])
def test_domain_of(address, domain):
    assert wire.domain_of(address) == domain


ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~\\-"
DOT_STRING = st.from_regex(rf"[{ATEXT}]{{1,8}}(\.[{ATEXT}]{{1,8}}){{0,3}}", fullmatch=True)
QUOTED = st.lists(st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7e, blacklist_characters='"\\'),
    st.builds(lambda c: "\\" + c, st.characters(min_codepoint=0x20, max_codepoint=0x7e)),
), max_size=12).map(lambda parts: '"' + "".join(parts) + '"')
LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)
DOMAIN = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
ADDRESS = st.builds(lambda l, d: f"{l}@{d}", st.one_of(DOT_STRING, QUOTED), DOMAIN)
PARAM_KEY = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,10}", fullmatch=True)
PARAM_VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=12)


@PROPS
@given(ADDRESS, st.lists(st.tuples(PARAM_KEY, st.none() | PARAM_VALUE), max_size=4,
                         unique_by=lambda kv: kv[0].upper()),
       st.lists(DOMAIN, max_size=2), st.sampled_from(["", " ", "  "]))
def test_address_and_params_round_trip(address, params, route, space):
    path = f"<{''.join('@' + r + (',' if i < len(route) - 1 else ':') for i, r in enumerate(route))}" \
           f"{address}>"
    text = " ".join(k if v is None else f"{k}={v}" for k, v in params)
    got_path, rest = wire.split_path(f"TO:{space}{path} {text}", "TO:")
    assert got_path == path
    assert wire.parse_mailbox(got_path) == address
    assert wire.parse_params(rest) == {k.upper(): v for k, v in params}
    assert wire.domain_of(address) == address.rpartition("@")[2].lower()


# --- parse_params --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, out", [
    ("", {}),
    ("   ", {}),
    ("SIZE=100 BODY=8BITMIME SMTPUTF8", {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None}),
    ("size=1", {"SIZE": "1"}),
    ("  A=1   B  ", {"A": "1", "B": None}),
    ("ORCPT=rfc822;a+40b", {"ORCPT": "rfc822;a+40b"}),
    ("A=b=c", {"A": "b=c"}),
    ("X-Y=1", {"X-Y": "1"}),
])
def test_parse_params(text, out):
    assert wire.parse_params(text) == out


@pytest.mark.parametrize("text", ["SIZE=", "=1", "-X=1", "SIZE=1 size=2", "A B A", "K\u00e9=1",
                                  "<a@b>", "A_B=1"])
def test_parse_params_refuses(text):
    with pytest.raises(SyntaxProblem):
        wire.parse_params(text)


# --- xtext (RFC 3461) ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, out", [
    ("", ""), ("abc", "abc"), ("a+2Bb", "a+b"), ("+3D", "="), ("+20", " "), ("+C3+A9", "\u00e9"),
    ("rfc822;a@b", "rfc822;a@b"), ("~!", "~!"),
])
def test_xtext_decode(text, out):
    assert wire.xtext_decode(text) == out


@pytest.mark.parametrize("text", ["+", "+2", "+2b", "+zz", "a=b", "a b", "\u00e9", "a\x00", "\x7f"])
def test_xtext_decode_refuses(text):
    with pytest.raises(SyntaxProblem):
        wire.xtext_decode(text)


def test_xtext_encode():
    assert wire.xtext_encode("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"


@PROPS
@given(st.text())
def test_xtext_round_trip(text):
    encoded = wire.xtext_encode(text)
    assert re.fullmatch(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*", encoded)
    assert wire.xtext_decode(encoded) == text


@PROPS
@given(st.from_regex(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*", fullmatch=True))
def test_xtext_decode_then_encode_is_stable(xtext):
    decoded = wire.xtext_decode(xtext)
    assert wire.xtext_decode(wire.xtext_encode(decoded)) == decoded


# --- line endings and dot-stuffing ---------------------------------------------------------------

@pytest.mark.parametrize("data, bare", [
    (b"", False), (b"a\r\nb\r\n", False), (b"\r\n\r\n", False), (b"a\nb", True), (b"a\rb", True),
    (b"\r", True), (b"\n", True), (b"\r\r\n", True), (b"\r\n\n", True), (b"\n\r", True),
    (b"a\r\n.\n", True),
])
def test_has_bare_line_ending(data, bare):
    assert wire.has_bare_line_ending(data) is bare


@PROPS
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"x", b"."]), max_size=30).map(b"".join))
def test_has_bare_line_ending_matches_definition(data):
    assert wire.has_bare_line_ending(data) == bool(re.search(rb"\r(?!\n)|(?<!\r)\n", data))


@pytest.mark.parametrize("data, payload", [
    (b"", b".\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b".", b"..\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"a\r\n.b\r\n..c\r\n", b"a\r\n..b\r\n...c\r\n.\r\n"),
    (b"\r\n.\r\n", b"\r\n..\r\n.\r\n"),
    (b"a.b\r\n", b"a.b\r\n.\r\n"),
])
def test_dot_stuff(data, payload):
    assert wire.dot_stuff(data) == payload


@pytest.mark.parametrize("data, out", [
    (b"", b""), (b"..\r\n", b".\r\n"), (b".a\r\n", b"a\r\n"), (b"a\r\n...\r\n", b"a\r\n..\r\n"),
    (b"a.b\r\n", b"a.b\r\n"), (b"a\r\n..\r\n..x\r\n", b"a\r\n.\r\n.x\r\n"),
])
def test_dot_unstuff(data, out):
    assert wire.dot_unstuff(data) == out


CRLF_MESSAGE = st.lists(
    st.lists(st.sampled_from([b".", b"..", b"x", b" ", b"\x00", b"\xff", b"\t"]), max_size=6)
    .map(b"".join), max_size=12).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@PROPS
@given(CRLF_MESSAGE, st.booleans())
def test_dot_stuff_round_trip(message, drop_last_crlf):
    if drop_last_crlf and message:
        message = message[:-2]  # dot_stuff adds the CRLF back
    payload = wire.dot_stuff(message)
    assert payload.endswith(b".\r\n")
    # The terminator is found exactly at the end, seen as a server sees it (after a CRLF).
    seen = b"\r\n" + payload
    assert seen.find(b"\r\n.\r\n") == len(seen) - 5
    expected = message + b"\r\n" if message and not message.endswith(b"\r\n") else message
    assert wire.dot_unstuff(payload[:-3]) == expected


@PROPS
@given(CRLF_MESSAGE)
def test_dot_unstuff_inverts_stuffing_of_any_body(message):
    body = wire.dot_stuff(message)[:-3]
    assert wire.dot_unstuff(body) == message
    assert not wire.has_bare_line_ending(body)
