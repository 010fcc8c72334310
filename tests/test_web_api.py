"""The web admin, the HTTP API and /metrics over real HTTP, against a real engine process.

The client is http.client (no redirects followed, cookies kept by hand), so every status code
and header is what the engine sent. Injected mail is checked in mailq/ and, with delivery on,
at an SMTP sink.
"""
from __future__ import annotations

import http.client
import json
import re
import smtplib
import time
import urllib.parse
from pathlib import Path

import pytest
import tomllib

from mailengine.envelope import parse_inf
from mailengine.testing.engine import RunningEngine, free_port
from mailengine.testing.sink import ThreadedSink
from mailengine.web.openapi import openapi

TOKEN = "s3cret-token-for-tests"
DOCS = Path(__file__).resolve().parent.parent / "docs"


class Client:
    """A tiny HTTP client that keeps cookies and never follows redirects."""

    def __init__(self, port: int, host: str = "127.0.0.1", source: str | None = None):
        self.port, self.host, self.source = port, host, source
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, body=None, headers=None, form=None, js=None):
        headers = dict(headers or {})
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if js is not None:
            body = json.dumps(js)
            headers["Content-Type"] = "application/json"
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn = http.client.HTTPConnection(self.host, self.port, timeout=15,
                                          source_address=(self.source, 0) if self.source else None)
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        for h in r.headers.get_all("Set-Cookie") or []:
            name, _, rest = h.partition("=")
            value = rest.split(";", 1)[0]
            if value in ("", '""') or "Max-Age=0" in h or "expires=Thu, 01 Jan 1970" in h:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        r.body = data
        r.text = data.decode("utf-8", "replace")
        return r

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, **kw):
        return self.request("POST", path, **kw)

    def api(self, method, path, token=TOKEN, js=None):
        h = {"Authorization": f"Bearer {token}"} if token is not None else {}
        r = self.request(method, path, headers=h, js=js)
        r.json = json.loads(r.body) if r.body else None
        return r

    def csrf(self, path: str) -> str:
        r = self.get(path)
        m = re.search(r'name="csrf" value="([^"]+)"', r.text)
        assert m, r.text[:500]
        return m.group(1)

    def login(self, user="admin", password="opensesame"):
        token = self.csrf("/gui/login")
        return self.post("/gui/login", form={"csrf": token, "user": user, "password": password,
                                             "next": "/gui/admin"})


def make_home(tmp_path: Path, password: bool = True, tokens: bool = True) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    if password:
        (home / "password.txt").write_text("# users of the web admin\nadmin:opensesame\n")
    if tokens:
        (home / "api-tokens.txt").write_text(f"tests:{TOKEN}\n")
    return home


def engine(home: Path, settings: dict | None = None) -> RunningEngine:
    port = free_port()
    eng = RunningEngine(home, {"network.web_port": port, "network.web_ip": "127.0.0.1",
                               **(settings or {})})
    eng.web_port = port
    return eng


def wait_web(eng, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            Client(eng.web_port).get("/api/v1/openapi.json")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def running(tmp_path):
    with engine(make_home(tmp_path)) as eng:
        wait_web(eng)
        yield eng


# --- the admin: login, sessions, CSRF -------------------------------------------------------------

def test_web_tls_serves_the_admin_over_https_with_secure_cookies(tmp_path):
    import ssl
    with engine(tmp_path, {"network.web_tls": True}) as eng:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the self-signed pair
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", eng.web_port, timeout=10,
                                                   context=ctx)
                conn.request("GET", "/gui/login")
                r = conn.getresponse()
                body = r.read()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        cert = conn.sock.getpeercert(binary_form=True)
        conn.close()
        with pytest.raises((OSError, http.client.HTTPException)):
            Client(eng.web_port).get("/gui/login")  # plain HTTP is not answered
        out = eng.read_output()
    assert r.status == 200 and b"password" in body.lower()
    assert "Secure" in r.headers["Set-Cookie"] and "HttpOnly" in r.headers["Set-Cookie"]
    assert cert == ssl.PEM_cert_to_DER_cert((tmp_path / "tls" / "cert.pem").read_text())
    assert "https://127.0.0.1:" in out


def test_root_leads_to_admin_and_admin_to_login(running):
    c = Client(running.web_port)
    r = c.get("/")
    assert r.status == 302 and r.headers["Location"] == "/gui/admin"
    r = c.get("/gui/admin/settings")
    assert r.status == 302
    assert urllib.parse.unquote(r.headers["Location"]) == "/gui/login?next=/gui/admin/settings"
    r = c.get("/gui/login")
    assert r.status == 200 and 'name="password"' in r.text
    assert r.headers["X-Frame-Options"] == "DENY"
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]


def test_login_then_pages_then_logout(running):
    c = Client(running.web_port)
    r = c.login()
    assert r.status == 303 and r.headers["Location"] == "/gui/admin"
    assert "mailengine_session" in c.cookies
    set_cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    for path in ("/gui/admin", "/gui/admin/settings", "/gui/admin/queue",
                 "/gui/admin/queue/messages", "/gui/admin/lists", "/gui/admin/tokens",
                 "/gui/admin/account"):
        r = c.get(path)
        assert r.status == 200, (path, r.text[:300])
        assert "Log out" in r.text
    r = c.get("/gui/admin/status.json")
    assert r.status == 200 and "history" in json.loads(r.body)
    csrf = c.csrf("/gui/admin")
    r = c.post("/gui/logout", form={"csrf": csrf})
    assert r.status == 303
    assert c.get("/gui/admin").status == 302


def test_refused_logins_are_slowed_down(running):
    c = Client(running.web_port)
    r = c.login(password="wrong")
    assert r.status == 401 and "Wrong user name or password" in r.text
    assert "mailengine_session" not in c.cookies
    # At once again, even with the right password: refused while the delay runs.
    r = c.login()
    assert r.status == 429 and "Too many failed logins" in r.text
    time.sleep(0.6)
    assert c.login(password="wrong again").status == 401
    time.sleep(0.6)  # the second delay is 1 s
    assert c.login().status == 429
    time.sleep(0.5)
    assert c.login(user="nobody", password="opensesame").status == 401  # unknown user: same
    time.sleep(2.1)
    r = c.login()
    assert r.status == 303 and "mailengine_session" in c.cookies


def test_login_and_forms_need_csrf_tokens(running):
    c = Client(running.web_port)
    c.get("/gui/login")
    r = c.post("/gui/login", form={"user": "admin", "password": "opensesame"})
    assert r.status == 403 and "CSRF" in r.text
    assert c.login().status == 303
    r = c.post("/gui/admin/settings/limits", form={"limits.max_recipients": "5"})
    assert r.status == 403 and "CSRF" in r.text
    r = c.post("/gui/admin/settings/limits", form={"limits.max_recipients": "5",
                                                   "csrf": "forged"})
    assert r.status == 403
    text = (running.home / "mailengine.toml").read_text()
    assert "max_recipients" not in text
    # Another browser's session id is not a CSRF token.
    other = Client(running.web_port)
    other.login()
    r = c.post("/gui/admin/settings/limits",
               form={"limits.max_recipients": "5", "csrf": other.cookies["mailengine_session"]})
    assert r.status == 403


def test_no_password_file_says_how_to_make_one(tmp_path):
    home = make_home(tmp_path, password=False)
    with engine(home) as eng:
        wait_web(eng)
        c = Client(eng.web_port)
        r = c.get("/gui/login")
        assert "password.txt" in r.text and f"mailengine --home {home} init" in r.text
        assert "opensesame" not in r.text  # no well-known password suggested
        assert str(home / "password.txt") in r.text
        r = c.login()
        assert r.status == 401 and "Nobody can log in" in r.text
    assert "no users" in eng.output.decode()


def test_client_outside_web_ip_gets_403(tmp_path):
    home = make_home(tmp_path)
    with engine(home, {"network.web_ip": "127.0.0.2"}) as eng:
        wait_web_any = time.monotonic() + 10
        while True:  # the port is bound on 127.0.0.1 (web_ip is a loopback address)
            try:
                r = Client(eng.web_port).get("/gui/login")
                break
            except OSError:
                assert time.monotonic() < wait_web_any
                time.sleep(0.05)
        assert r.status == 403
        assert "127.0.0.1" in r.text and "127.0.0.2" in r.text and "web_ip" in r.text
        c = Client(eng.web_port)
        assert c.get("/").status == 403
        r = c.api("GET", "/api/v1/stats")
        assert r.status == 403 and "not allowed" in r.json["error"]
        assert c.get("/metrics").status == 403
        assert c.post("/gui/login", form={"user": "admin", "password": "opensesame"}).status == 403
        # From the allowed address all is well.
        ok = Client(eng.web_port, source="127.0.0.2")
        assert ok.get("/gui/login").status == 200
        assert ok.login().status == 303
        assert ok.api("GET", "/api/v1/stats").status == 200


def test_web_ip_zero_turns_the_admin_off_and_web_port_zero_too(tmp_path):
    home = make_home(tmp_path)
    with engine(home, {"network.web_ip": "0"}) as eng:
        time.sleep(0.3)
        with pytest.raises(OSError):
            Client(eng.web_port).get("/")
    assert 'web admin is off (network.web_ip = "0")' in eng.output.decode()


def test_password_change_is_stored_hashed(running):
    c = Client(running.web_port)
    c.login()
    csrf = c.csrf("/gui/admin/account")
    new = "a-much-better-one"
    r = c.post("/gui/admin/account", form={"csrf": csrf, "current": "opensesame",
                                           "new": new, "again": new})
    assert r.status == 303
    text = (running.home / "password.txt").read_text()
    assert "opensesame" not in text and "admin:scrypt$" in text
    assert "# users of the web admin" in text
    time.sleep(0.05)
    other = Client(running.web_port)
    assert other.login(password="opensesame").status == 401
    time.sleep(0.6)
    assert other.login(password="a-much-better-one").status == 303


# --- settings ------------------------------------------------------------------------------------

def ehlo_size(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("t.test")
        return int(s.esmtp_features["size"])


def test_settings_change_applies_at_once_and_keeps_the_file_comments(running):
    path = running.home / "mailengine.toml"
    path.write_text("# my own comment, kept\n" + path.read_text())
    c = Client(running.web_port)
    c.login()
    assert ehlo_size(running.smtp_port) == 10485760
    csrf = c.csrf("/gui/admin/settings")
    r = c.post("/gui/admin/settings/limits", form={
        "csrf": csrf, "limits.max_message_size": "2048000", "limits.max_recipients": "3"})
    assert r.status == 303
    page = c.get("/gui/admin/settings")
    assert "applied now: limits.max_message_size, limits.max_recipients" in page.text
    assert ehlo_size(running.smtp_port) == 2048000  # the running listener took it
    with smtplib.SMTP("127.0.0.1", running.smtp_port, timeout=10) as s:
        s.ehlo("t.test")
        s.mail("a@src.test")
        codes = [s.rcpt(f"r{i}@dest.test")[0] for i in range(4)]
    assert codes == [250, 250, 250, 452]
    text = path.read_text()
    assert text.startswith("# my own comment, kept\n")
    data = tomllib.loads(text)
    assert data["limits"]["max_message_size"] == 2048000
    assert data["limits"]["max_recipients"] == 3
    # A policy setting reaches the policy at once too.
    csrf = c.csrf("/gui/admin/settings")
    r = c.post("/gui/admin/settings/policy", form={
        "csrf": csrf, "policy.refused_mail_from": "spammer\nbad.example",
        "policy.relay_ips": "127.0.0.1", "policy.rcpt_relay_domains": "",
        "policy.refused_mail_servers": ""})
    assert r.status == 303
    with smtplib.SMTP("127.0.0.1", running.smtp_port, timeout=10) as s:
        s.ehlo("t.test")
        assert s.mail("spammer@src.test")[0] == 550
    assert tomllib.loads(path.read_text())["policy"]["refused_mail_from"] == [
        "spammer", "bad.example"]


def test_settings_refuse_bad_values_and_mark_restart_ones(running):
    path = running.home / "mailengine.toml"
    before = path.read_text()
    c = Client(running.web_port)
    c.login()
    csrf = c.csrf("/gui/admin/settings")
    r = c.post("/gui/admin/settings/limits", form={
        "csrf": csrf, "limits.max_message_size": "12", "limits.smtp_receive_timeout": "abc"})
    assert r.status == 400
    assert "must be at least 1024" in r.text and "must be a number" in r.text
    assert "Nothing was saved" in r.text
    assert path.read_text() == before
    r = c.post("/gui/admin/settings/policy", form={"csrf": csrf, "policy.relay_ips": "1.2.3"})
    assert r.status == 400 and "not an IP address" in r.text
    # A setting that needs a restart: saved, not applied, and shown as pending.
    new_port = free_port()
    r = c.post("/gui/admin/settings/network", form={
        "csrf": csrf, "network.smtp_port": str(new_port)})
    assert r.status == 303
    page = c.get("/gui/admin/settings")
    assert "takes effect after restart: network.smtp_port" in page.text
    assert f"saved; running: {running.smtp_port}" in page.text
    assert tomllib.loads(path.read_text())["network"]["smtp_port"] == new_port
    assert ehlo_size(running.smtp_port) > 0  # still listening where it was


def test_settings_page_masks_secrets_and_keeps_them_when_saved(tmp_path):
    """The settings page, /metrics and the log never show the webhook secret or a password in a
    URL; saving the form with the masks left as shown keeps the values, a new one replaces."""
    secret, url = "whsec-web-secret-1", "http://hook:url-pw-2@127.0.0.1:9/x"
    with engine(make_home(tmp_path), {"webhooks.secret": secret,
                                      "webhooks.urls": [url]}) as eng:
        wait_web(eng)
        path = eng.home / "mailengine.toml"
        c = Client(eng.web_port)
        c.login()
        page = c.get("/gui/admin/settings").text
        assert secret not in page and "url-pw-2" not in page
        assert re.search(r'name="webhooks.secret" value="\*{8}"', page)
        assert "http://hook:********@127.0.0.1:9/x" in page
        csrf = c.csrf("/gui/admin/settings")
        r = c.post("/gui/admin/settings/webhooks", form={
            "csrf": csrf, "webhooks.secret": "********",
            "webhooks.urls": "http://hook:********@127.0.0.1:9/x", "webhooks.batch_size": "50"})
        assert r.status == 303
        page = c.get("/gui/admin/settings").text
        assert "applied now: webhooks.batch_size" in page and "webhooks.secret" not in \
            page.split("applied now:")[1].split("<")[0]
        data = tomllib.loads(path.read_text())
        assert data["webhooks"]["secret"] == secret and data["webhooks"]["urls"] == [url]
        assert data["webhooks"]["batch_size"] == 50
        r = c.post("/gui/admin/settings/webhooks", form={"csrf": csrf,
                                                         "webhooks.secret": "whsec-new-3"})
        assert r.status == 303
        assert tomllib.loads(path.read_text())["webhooks"]["secret"] == "whsec-new-3"
        page = c.get("/gui/admin/settings").text
        assert "whsec-new-3" not in page
        r = c.post("/gui/admin/settings/webhooks", form={"csrf": csrf, "webhooks.secret": ""})
        assert tomllib.loads(path.read_text())["webhooks"]["secret"] == ""
        assert 'name="webhooks.secret" value=""' in c.get("/gui/admin/settings").text
        metrics = c.get("/metrics").text
        assert "url-pw-2" not in metrics
        assert 'url="http://hook:********@127.0.0.1:9/x"' in metrics
    out = eng.output.decode()
    assert secret not in out and "whsec-new-3" not in out and "url-pw-2" not in out
    assert "settings changed from the web admin" in out


def test_every_setting_is_on_the_settings_page_with_its_doc(running):
    from mailengine.config import SECTION_TITLES, SETTINGS
    c = Client(running.web_port)
    c.login()
    page = c.get("/gui/admin/settings").text
    for s in SETTINGS:
        assert f'name="{s.name}"' in page, s.name
        assert s.doc.split("'")[0][:40].replace("&", "&amp;") in page.replace("&#39;", "'"), s.name
    for title in SECTION_TITLES.values():
        assert title in page


# --- the API -------------------------------------------------------------------------------------

def test_api_refuses_missing_and_wrong_tokens_and_slows_down(running):
    c = Client(running.web_port)
    r = c.api("GET", "/api/v1/stats", token=None)
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    time.sleep(0.6)
    r = c.api("GET", "/api/v1/stats", token="wrong")
    assert r.status == 401
    r = c.api("GET", "/api/v1/stats")  # right, but too soon after a wrong one
    assert r.status == 429 and "wait" in r.json["error"]
    time.sleep(1.1)
    r = c.api("GET", "/api/v1/stats")
    assert r.status == 200 and r.json["received"] == 0
    r = c.api("POST", "/api/v1/messages", token="wrong",
              js={"from": "a@b.test", "to": ["c@d.test"], "body": "x"})
    assert r.status == 401
    assert not list((running.mailq / "retry").glob("*.inf"))


def test_no_token_file_says_how_to_make_one(tmp_path):
    with engine(make_home(tmp_path, tokens=False)) as eng:
        wait_web(eng)
        r = Client(eng.web_port).api("GET", "/api/v1/stats")
        assert r.status == 401 and "api-tokens.txt" in r.json["error"]


def test_tokens_made_in_the_admin_are_stored_hashed_and_work(running):
    c = Client(running.web_port)
    c.login()
    csrf = c.csrf("/gui/admin/tokens")
    r = c.post("/gui/admin/tokens", form={"csrf": csrf, "name": "app1"})
    assert r.status == 200
    token = re.search(r'<pre id="new-token">([^<]+)</pre>', r.text).group(1)
    text = (running.home / "api-tokens.txt").read_text()
    assert token not in text and "app1:sha256$" in text
    assert c.api("GET", "/api/v1/stats", token=token).status == 200
    c.post("/gui/admin/tokens", form={"csrf": csrf, "name": "app1", "revoke": "1"})
    assert c.api("GET", "/api/v1/stats", token=token).status == 401


def test_inject_one_message_for_many_recipients_is_on_disk_before_the_reply(running):
    c = Client(running.web_port)
    r = c.api("POST", "/api/v1/messages", js={
        "from": "news@src.test", "to": ["a@dest.test", "b@dest.test", "c@other.test"],
        "headers": {"Subject": "Grüße", "From": "News <news@src.test>", "To": "list@src.test"},
        "body": "line one\nline two\n.dot line\n"})
    assert r.status == 202, r.json
    (msg_id,) = r.json["ids"]
    retry = running.mailq / "retry"
    inf = parse_inf((retry / f"{msg_id}.inf").read_bytes())
    assert inf.mail_from == "news@src.test"
    assert inf.rcpt_to_send == ["a@dest.test", "b@dest.test", "c@other.test"]
    assert inf.received["helo"] == "http-api" and inf.received["peertcpip"] == "127.0.0.1"
    assert inf.auth_user == "tests"
    data = (retry / f"{msg_id}.dat").read_bytes()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Subject: =?utf-8?" in head and b"\r\nDate: " in head and b"Message-ID: <" in head
    assert body == b"line one\r\nline two\r\n.dot line\r\n"
    assert b"\n" not in data.replace(b"\r\n", b"")
    stats = c.api("GET", "/api/v1/stats").json
    assert stats["received"] == 1 and stats["received_relay"] == 1
    metrics = c.get("/metrics").text
    assert 'mailengine_received_total{kind="relay"} 1' in metrics
    # The queue API sees it.
    q = c.api("GET", "/api/v1/queue").json
    assert q["total"] == 1 and q["messages"][0]["id"] == msg_id
    assert q["messages"][0]["state"] == "paused"
    q = c.api("GET", "/api/v1/queue?domain=other.test").json
    assert [m["id"] for m in q["messages"]] == [msg_id]
    assert c.api("GET", "/api/v1/queue?domain=none.test").json["total"] == 0
    doms = {d["domain"]: d for d in c.api("GET", "/api/v1/queue/domains").json["domains"]}
    assert doms["dest.test"]["recipients"] == 2 and doms["other.test"]["recipients"] == 1
    one = c.api("GET", f"/api/v1/queue/{urllib.parse.quote(msg_id)}").json
    assert one["to"] == inf.rcpt_to_send and "rcpttosend=" in one["inf"]
    assert c.api("GET", "/api/v1/queue/nothing@here").status == 404


def test_inject_with_substitutions_makes_one_message_per_recipient(running):
    c = Client(running.web_port)
    r = c.api("POST", "/api/v1/messages", js={
        "from": "news@src.test", "to": ["ann@dest.test", "bob@dest.test"],
        "headers": [["Subject", "Hello {{name}}"], ["X-Tag", "t"], ["X-Tag", "u"]],
        "body": "Dear {{ name }} <{{to}}>,\n",
        "substitutions": {"ann@dest.test": {"name": "Ann"}}, "defaults": {"name": "reader"}})
    assert r.status == 202, r.json
    assert [m["to"] for m in r.json["messages"]] == [["ann@dest.test"], ["bob@dest.test"]]
    retry = running.mailq / "retry"
    ann, bob = (retry / f"{i}.dat" for i in r.json["ids"])
    assert b"Subject: Hello Ann\r\n" in ann.read_bytes()
    assert b"Dear Ann <ann@dest.test>,\r\n" in ann.read_bytes()
    assert b"Subject: Hello reader\r\n" in bob.read_bytes()
    assert bob.read_bytes().count(b"X-Tag: ") == 2
    r = c.api("POST", "/api/v1/messages", js={
        "from": "news@src.test", "to": ["ann@dest.test", "bob@dest.test"],
        "raw": "Subject: {{x}}\n\nhi\n", "substitutions": {"ann@dest.test": {"x": "1"}}})
    assert r.status == 400 and "no value for x" in r.json["error"]
    assert "bob@dest.test" in r.json["error"]
    assert len(list(retry.glob("*.inf"))) == 2  # nothing of the refused request was stored


def test_inject_raw_and_refusals(running):
    c = Client(running.web_port)
    r = c.api("POST", "/api/v1/messages", js={
        "from": "", "to": "x@dest.test", "raw": "From: a@src.test\nSubject: raw\n\nbody"})
    assert r.status == 202
    data = (running.mailq / "retry" / f"{r.json['ids'][0]}.dat").read_bytes()
    assert data == b"From: a@src.test\r\nSubject: raw\r\n\r\nbody\r\n"
    r = c.api("POST", "/api/v1/messages", js={
        "from": "a@src.test", "to": ["x@dest.test"],
        "raw_base64": "U3ViamVjdDogYjY0DQoNCmJvZHkNCg=="})
    assert r.status == 202
    bad = [
        ({"to": ["x@dest.test"], "body": "x"}, "from: required"),
        ({"from": "a@src.test", "to": [], "body": "x"}, "to: required"),
        ({"from": "a@src.test", "to": ["not an address"], "body": "x"}, "to[0]"),
        ({"from": "a@src.test", "to": ["a\u0085b@dest.test"], "body": "x"}, "cannot be stored"),
        ({"from": "a\u2028b@src.test", "to": ["x@dest.test"], "body": "x"}, "cannot be stored"),
        ({"from": "a@src.test", "to": ["x@dest.test"]}, "give headers and body"),
        ({"from": "a@src.test", "to": ["x@dest.test"], "raw": "x", "body": "y"}, "not both"),
        ({"from": "a@src.test", "to": ["x@dest.test"], "headers": {"Bad Name": "v"},
          "body": "y"}, "not a header name"),
        ({"from": "a@src.test", "to": ["x@dest.test"], "headers": {"Subject": "a\r\nBcc: x"},
          "body": "y"}, "line break"),
        ({"from": "a@src.test", "to": ["x@dest.test"], "body": "x", "cc": []}, "unknown fields"),
        ({"from": "a@src.test", "to": ["x@dest.test"], "raw_base64": "!!"}, "base64"),
    ]
    for doc, why in bad:
        r = c.api("POST", "/api/v1/messages", js=doc)
        assert r.status == 400 and why in r.json["error"], (doc, r.json)
    r = c.request("POST", "/api/v1/messages", body="{not json",
                  headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 400 and b"not JSON" in r.body
    # The policy applies as for SMTP: refused senders are refused.
    csrf_c = Client(running.web_port)
    csrf_c.login()
    csrf = csrf_c.csrf("/gui/admin/settings")
    csrf_c.post("/gui/admin/settings/policy", form={
        "csrf": csrf, "policy.refused_mail_from": "blocked", "policy.relay_ips": "127.0.0.1"})
    r = c.api("POST", "/api/v1/messages", js={"from": "blocked@src.test", "to": ["x@dest.test"],
                                              "body": "x"})
    assert r.status == 403 and "550" in r.json["error"]
    assert len(list((running.mailq / "retry").glob("*.inf"))) == 2


def test_inject_stores_quoted_local_parts(running):
    r = Client(running.web_port).api("POST", "/api/v1/messages", js={
        "from": "a@src.test", "to": ['"doe,john"@dest.test', '"john doe"@dest.test'], "raw": "x"})
    assert r.status == 202, r.json
    inf = parse_inf((running.mailq / "retry" / f"{r.json['ids'][0]}.inf").read_bytes())
    assert inf.rcpt_to_send == ['"doe,john"@dest.test', '"john doe"@dest.test']


def test_inject_too_many_recipients_and_too_big(tmp_path):
    with engine(make_home(tmp_path), {"limits.max_recipients": 2,
                                      "limits.max_message_size": 2048}) as eng:
        wait_web(eng)
        c = Client(eng.web_port)
        r = c.api("POST", "/api/v1/messages", js={
            "from": "a@src.test", "to": ["x@d.test", "y@d.test", "z@d.test"], "body": "x"})
        assert r.status == 400 and "limits.max_recipients" in r.json["error"]
        r = c.api("POST", "/api/v1/messages", js={
            "from": "a@src.test", "to": ["x@d.test"], "body": "x" * 3000})
        assert r.status == 400 and "limits.max_message_size" in r.json["error"]


def test_inject_reaches_a_sink(tmp_path):
    with ThreadedSink("127.0.0.1", 0) as sink:
        settings = {"queue.pause_sending": False, "network.helo_text": "engine.test",
                    "basic.dns_servers": [f"sink.test,mx.sink.test,MX,127.0.0.1:{sink.port}"]}
        with engine(make_home(tmp_path), settings) as eng:
            wait_web(eng)
            c = Client(eng.web_port)
            r = c.api("POST", "/api/v1/messages", js={
                "from": "app@src.test", "to": ["one@sink.test", "two@sink.test"],
                "headers": {"Subject": "via the API"}, "body": "hello\n"})
            assert r.status == 202, r.json
            sink.wait_messages(1, timeout=20)
            deadline = time.monotonic() + 10
            while c.api("GET", "/api/v1/stats").json["sent"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            metrics = c.get("/metrics").text
            assert "mailengine_sent_total 2" in metrics
        msg = sink.messages[0]
        assert msg.mail_from == "app@src.test"
        assert sorted(msg.rcpts) == ["one@sink.test", "two@sink.test"]
        assert b"Subject: via the API\r\n" in msg.data and msg.data.endswith(b"\r\nhello\r\n")


# --- metrics, lists, OpenAPI ---------------------------------------------------------------------

def test_metrics_are_prometheus_text(running):
    r = Client(running.web_port).get("/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    names = set()
    for line in r.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge")
            names.add(name)
        elif line and not line.startswith("#"):
            assert re.fullmatch(r'[a-z_]+(\{[a-z]+="[a-z]+"\})? -?\d+(\.\d+)?', line), line
    for want in ("mailengine_received_total", "mailengine_sent_total",
                 "mailengine_queue_messages", "mailengine_inbound_connections",
                 "mailengine_outbound_connections", "mailengine_delivery_processes",
                 "mailengine_delivery_process_restarts_total"):
        assert want in names


def test_bounce_lists_view_and_download(running):
    (running.home / "hard-bounces.txt").write_text("a@x.test\nb@y.test\n")
    c = Client(running.web_port)
    c.login()
    page = c.get("/gui/admin/lists").text
    assert "hard-bounces.txt" in page and "soft-undeliverable.txt" in page
    r = c.get("/gui/admin/lists/hard-bounces.txt")
    assert "a@x.test" in r.text and "b@y.test" in r.text
    r = c.get("/gui/admin/lists/hard-bounces.txt/download")
    assert r.status == 200 and r.body == b"a@x.test\nb@y.test\n"
    assert "attachment" in r.headers["Content-Disposition"]
    assert c.get("/gui/admin/lists/soft-bounces.txt/download").body == b""
    assert c.get("/gui/admin/lists/..%2Fpassword.txt").status == 404
    assert c.get("/gui/admin/lists/password.txt/download").status == 404


def test_openapi_is_served_and_kept_in_docs(running):
    r = Client(running.web_port).get("/api/v1/openapi.json")
    served = json.loads(r.body)
    assert served["openapi"].startswith("3.")
    assert "/api/v1/messages" in served["paths"]
    assert json.loads((DOCS / "openapi.json").read_text()) == openapi(), \
        "docs/openapi.json is stale: python -m mailengine.web.openapi > docs/openapi.json"


# --- queue actions -------------------------------------------------------------------------------

def test_queue_actions_through_the_api(running):
    c = Client(running.web_port)
    ids = []
    for rcpts in (["a@one.test"], ["b@one.test", "c@two.test"], ["d@two.test"]):
        r = c.api("POST", "/api/v1/messages", js={"from": "s@src.test", "to": rcpts,
                                                  "body": "x"})
        ids += r.json["ids"]
    retry = running.mailq / "retry"
    q = lambda i: c.api("GET", f"/api/v1/queue/{urllib.parse.quote(i)}").json  # noqa: E731
    r = c.api("POST", f"/api/v1/queue/{ids[0]}/hold")
    assert r.status == 200 and r.json["done"] == [ids[0]]
    assert q(ids[0])["held"] and q(ids[0])["state"] == "held"
    assert parse_inf((retry / f"{ids[0]}.inf").read_bytes()).held
    r = c.api("POST", f"/api/v1/queue/{ids[0]}/hold")
    assert r.json["not_done"] == {ids[0]: "already held"}
    assert c.api("POST", f"/api/v1/queue/{ids[0]}/release").json["done"] == [ids[0]]
    assert not q(ids[0])["held"]
    assert c.api("POST", f"/api/v1/queue/{ids[0]}/retry").status == 200
    assert c.api("POST", f"/api/v1/queue/{ids[0]}/explode").status == 404
    # Delete one message, then a whole domain (the shared message keeps its other recipient).
    r = c.api("DELETE", f"/api/v1/queue/{ids[0]}")
    assert r.status == 200 and r.json["done"] == [ids[0]]
    assert not (retry / f"{ids[0]}.inf").exists() and not (retry / f"{ids[0]}.dat").exists()
    assert c.api("DELETE", f"/api/v1/queue/{ids[0]}").status == 404
    r = c.api("POST", "/api/v1/queue/domains/two.test/delete")
    assert r.status == 200 and sorted(r.json["done"]) == sorted(ids[1:])
    assert q(ids[1])["to"] == ["b@one.test"]
    assert not (retry / f"{ids[2]}.inf").exists()
    r = c.api("POST", "/api/v1/queue/domains/one.test/hold")
    assert r.json["done"] == [ids[1]] and q(ids[1])["held"]


def test_checkboxes_turn_settings_on_and_off(running):
    c = Client(running.web_port)
    c.login()
    csrf = c.csrf("/gui/admin/settings")
    bools = ["debug.dns", "debug.smtp_out", "debug.smtp_in", "debug.program", "debug.send_loop",
             "debug.queue_size", "debug.queue_memory"]
    form = [("csrf", csrf)] + [("bools", b) for b in bools] + [("debug.smtp_in", "true")]
    r = c.request("POST", "/gui/admin/settings/debug", body=urllib.parse.urlencode(form),
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 303
    debug = tomllib.loads((running.home / "mailengine.toml").read_text())["debug"]
    assert debug["smtp_in"] is True
    assert debug["queue_size"] is False and debug["queue_memory"] is False
    assert "dns" not in debug  # unchanged settings are not written
    with smtplib.SMTP("127.0.0.1", running.smtp_port, timeout=10) as s:
        s.noop()
    time.sleep(0.3)
    assert "<<< b'noop" in running.read_output().lower()  # the listener traces sessions now
    # A form without the checkbox list leaves the checkboxes alone.
    r = c.post("/gui/admin/settings/debug", form={"csrf": csrf})
    assert r.status == 303
    assert tomllib.loads((running.home / "mailengine.toml").read_text())["debug"]["smtp_in"]


# --- pure parts ----------------------------------------------------------------------------------

def test_throttle_doubles_and_forgets():
    from mailengine.web.auth import Throttle
    now = [100.0]
    t = Throttle(clock=lambda: now[0])
    assert t.wait_left("1.2.3.4") == 0
    assert t.failed("1.2.3.4") == 0.5
    assert t.wait_left("1.2.3.4") == 0.5 and t.wait_left("5.6.7.8") == 0
    now[0] += 0.5
    assert t.failed("1.2.3.4") == 1.0
    now[0] += 1
    assert [t.failed("1.2.3.4") for _ in range(8)][-1] == 30.0  # capped
    t.succeeded("1.2.3.4")
    assert t.failed("1.2.3.4") == 0.5
    now[0] += 10000  # long ago: forgotten
    assert t.wait_left("1.2.3.4") == 0 and t.failed("1.2.3.4") == 0.5


def test_sessions_expire_and_are_capped():
    from mailengine.web import auth
    now = [0.0]
    s = auth.Sessions(clock=lambda: now[0])
    a = s.create("admin")
    assert s.get(a.id) is a and s.get("nope") is None and s.get(None) is None
    now[0] += auth.SESSION_IDLE + 1
    assert s.get(a.id) is None
    for _ in range(auth.MAX_SESSIONS + 5):
        s.create("u")
    assert len(s) == auth.MAX_SESSIONS


def test_prepare_builds_headers_and_checks_sizes():
    from mailengine.web.inject import InjectError, prepare
    (p,) = prepare({"from": "<a@src.test>", "to": ["b@d.test", "b@d.test"],
                    "headers": {"Subject": "é"}, "body": "ü"}, "h.test", 10, 0)
    assert p.rcpts == ["b@d.test"] and p.mail_from == "a@src.test"
    head, _, body = p.data.partition(b"\r\n\r\n")
    assert b"Subject: =?utf-8?b?w6k=?=" in head and b"From: a@src.test" in head
    assert b"Content-Type: text/plain; charset=utf-8" in head and body == "ü\r\n".encode()
    assert b"Message-ID: <" in head and b"@h.test>" in head
    with pytest.raises(InjectError, match="raw_base64"):
        prepare({"from": "", "to": ["b@d.test"], "raw_base64": "AA=="[:-1]}, "h", 10, 0)
    with pytest.raises(InjectError, match="line break"):
        prepare({"from": "", "to": ["b@d.test"], "headers": {"S": "{{x}}"}, "body": "b",
                 "substitutions": {"b@d.test": {"x": "1\r\nBcc: evil@x.test"}}}, "h", 10, 0)


def test_settings_save_keeps_comments_and_order(tmp_path):
    from mailengine.config import default_toml
    from mailengine.web.settings_edit import read_file_values, save
    (tmp_path / "mailengine.toml").write_text(default_toml())
    save(tmp_path, {"limits.max_send_rate": 3600, "queue.retry_intervals": [1.0, 2.5],
                    "policy.relay_ips": ["10.0.0.0/8"]})
    text = (tmp_path / "mailengine.toml").read_text()
    before = default_toml().splitlines()
    after = text.splitlines()
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert changed == [('relay_ips = ["127.0.0.1"]', 'relay_ips = ["10.0.0.0/8"]'),
                       ("retry_intervals = [30, 120, 240, 480, 960]",
                        "retry_intervals = [1, 2.5]"),
                       ("max_send_rate = 0", "max_send_rate = 3600")]
    values = read_file_values(tmp_path)
    assert values["limits.max_send_rate"] == 3600 and values["queue.retry_intervals"] == [1, 2.5]
    (tmp_path / "mailengine.toml").write_text("# only a comment\n")
    save(tmp_path, {"network.web_ip": "10.1.1.1"})
    assert tomllib.loads((tmp_path / "mailengine.toml").read_text()) == {
        "network": {"web_ip": "10.1.1.1"}}


def test_web_ip_change_that_would_lock_out_the_admin_is_refused(running):
    c = Client(running.web_port)
    c.login()
    csrf = c.csrf("/gui/admin/settings")
    for value in ("10.9.9.9", "0"):
        r = c.post("/gui/admin/settings/network", form={"csrf": csrf, "network.web_ip": value})
        assert r.status == 400 and "would shut out your own address 127.0.0.1" in r.text
    assert "web_ip = \"127.0.0.1\"" in (running.home / "mailengine.toml").read_text()
    r = c.post("/gui/admin/settings/network", form={"csrf": csrf,
                                                    "network.web_ip": "127.0.0.0/8"})
    assert r.status == 303
    assert c.get("/gui/admin").status == 200


def test_web_port_in_use_is_one_clear_warning_and_mail_goes_on(tmp_path):
    import socket
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with RunningEngine(make_home(tmp_path), {"network.web_port": port,
                                                 "network.web_ip": "127.0.0.1"}) as eng:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                assert s.sendmail("a@src.test", ["b@dst.test"], b"Subject: x\r\n\r\ny\r\n") == {}
            assert eng.proc.poll() is None
    out = eng.output.decode()
    assert f"web admin NOT started: cannot listen on port {port}" in out
    assert "--web-port" in out and eng.proc.returncode == 0


def test_the_settings_page_is_one_form_saved_whole_or_not_at_all(running):
    """One Save for every section (issue 16): a wrong value anywhere saves nothing; a good
    form writes only what changed, and the page marks values that are not the default."""
    path = running.home / "mailengine.toml"
    c = Client(running.web_port)
    c.login()
    page = c.get("/gui/admin/settings").text
    assert page.count('type="submit" id="save"') == 1 and "Save limits" not in page
    assert 'Default: <code>false</code>' in page and "Default: <code>False</code>" not in page
    before = path.read_text()
    csrf = c.csrf("/gui/admin/settings")
    r = c.post("/gui/admin/settings", form={"csrf": csrf, "limits.max_recipients": "7",
                                            "queue.dsn": "yes", "bools": "queue.dsn",
                                            "policy.relay_ips": "10.0.0.300"})
    assert r.status == 400 and "Nothing was saved" in r.text
    assert path.read_text() == before
    r = c.post("/gui/admin/settings", form={"csrf": csrf, "limits.max_recipients": "7",
                                            "queue.dsn": "true", "bools": "queue.dsn"})
    assert r.status == 303 and r.headers["Location"] == "/gui/admin/settings"
    data = tomllib.loads(path.read_text())
    assert data["limits"]["max_recipients"] == 7 and data["queue"]["dsn"] is True
    page = c.get("/gui/admin/settings").text
    row = page[page.index('id="row-limits.max_recipients"'):]
    row = row[:row.index('id="row-', 10)]
    assert 'class="badge changed"' in row and "default: 1000" in row
    row = page[page.index('id="row-limits.max_errors"'):]
    assert 'class="badge changed"' not in row[:row.index('id="row-', 10)]


def test_a_destination_slowed_by_temporary_failures_is_said_in_plain_words(tmp_path):
    from test_cli_queue import Sink
    from mailengine.testing.sink import SinkScript
    sink = Sink(SinkScript(greeting="421 4.7.0 Too busy, try later"))
    try:
        settings = {"queue.pause_sending": False, "queue.retry_intervals": [60],
                    "limits.max_connections_per_host": 10,
                    "basic.dns_servers": [sink.pin("busy.test")]}
        with engine(make_home(tmp_path), settings) as eng:
            wait_web(eng)
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("a@src.test", ["x@busy.test"], b"Subject: s\r\n\r\nbody\r\n")
            c = Client(eng.web_port)
            c.login()
            deadline = time.monotonic() + 15
            while True:
                dests = json.loads(c.get("/gui/admin/status.json").text)["destinations"]
                why = " ".join(d["why"] for d in dests if d["domain"] == "busy.test")
                if "more slowly" in why or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        assert re.search(r"sending more slowly: at most \d of 10 connections, after temporary "
                         r"failures there \(busy replies or failed connections, once\); back up "
                         r"step by step", why), dests
        assert "cuts" not in why
    finally:
        sink.close()


def test_delivery_processes_are_seen_by_the_api_the_admin_and_metrics(tmp_path):
    """network.delivery_processes: the engine's status counts the processes running the
    outbound sessions, on every view of it (issue 12)."""
    with engine(make_home(tmp_path), {"network.delivery_processes": 2}) as eng:
        wait_web(eng)
        c = Client(eng.web_port)
        assert json.loads(c.api("GET", "/api/v1/stats").body)["delivery_processes"] == 2
        assert "mailengine_delivery_processes 2" in c.get("/metrics").text
        c.login()
        page = c.get("/gui/admin").text
        assert re.search(r'data-k="delivery_processes">2<.*delivery processes', page)


# --- sending sources (sources.py) on the Status page, status.json and /metrics --------------------

SOURCE_A, SOURCE_B = "127.0.0.41", "127.0.0.42"


def sources_rules() -> str:
    import datetime as dt
    return f"""default_pool = "main"
[sources.new]
ip = "{SOURCE_A}"
helo = "new.sender.test"
warmup_start = {dt.date.today().isoformat()}
warmup = [50, 100]
[sources.old]
ip = "{SOURCE_B}"
helo = "old.sender.test"
[pools.main]
sources = {{ new = 3, old = 1 }}
[pools.bulk]
sources = ["old"]
"""


def sources_zones() -> dict:
    """The sources' reverse DNS: new's names its EHLO name, old's another host."""
    return {".".join(reversed(SOURCE_A.split("."))) + ".in-addr.arpa": {"PTR": ["new.sender.test"]},
            ".".join(reversed(SOURCE_B.split("."))) + ".in-addr.arpa": {
                "PTR": ["mail.elsewhere.test"]}}


def test_sending_sources_are_on_the_status_page_and_in_metrics(tmp_path):
    """Each source's address, EHLO name, pools, reverse DNS and today's warm-up count after a
    message went out from it: on the Status page, in status.json and in /metrics."""
    from mailengine.testing.dnsserver import TestDNSServer
    with TestDNSServer(sources_zones()) as dns, ThreadedSink("127.0.0.1", 0) as sink:
        home = make_home(tmp_path)
        (home / "shaping.toml").write_text(sources_rules())
        settings = {"queue.pause_sending": False, "network.helo_text": "engine.test",
                    "basic.nameservers": [dns.address],
                    "basic.dns_servers": [f"sink.test,mx.sink.test,MX,127.0.0.1:{sink.port}"]}
        with engine(home, settings) as eng:
            wait_web(eng)
            c = Client(eng.web_port)
            c.login()
            before = c.get("/gui/admin").text
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("a@src.test", ["x@sink.test", "y@sink.test", "z@sink.test"],
                           b"Subject: s\r\n\r\nbody\r\n")
            sink.wait_messages(1, timeout=20)
            deadline = time.monotonic() + 15
            while True:  # the count is taken before sending; the rDNS check runs at start
                rows = json.loads(c.get("/gui/admin/status.json").text)["sources"]
                if all(r["rdns_checked"] for r in rows) and rows[0]["today"]:
                    break
                assert time.monotonic() < deadline, rows
                time.sleep(0.2)
            page = c.get("/gui/admin").text
            metrics = c.get("/metrics").text
    # one unit of 3 recipients, the first pick of main (new ×3, old ×1): from new
    assert [(s.peer[0], s.helo) for s in sink.sessions] == [(SOURCE_A, "new.sender.test")]
    assert 'id="sources"' in before and "none yet" in before  # nothing sent yet today
    new, old = rows
    assert (new["source"], new["ip"], new["helo"]) == ("new", SOURCE_A, "new.sender.test")
    assert new["today"] == [{"provider": "sink.test", "sent": 3, "limit": 50,
                             "text": "sink.test 3 / 50"}]
    assert new["pools_text"] == "main ×3 (default)" and new["warmup_text"] == \
        "day 1: 50 a provider today"
    assert new["rdns_problem"] is None and new["rdns_text"] == "names its EHLO name"
    assert old["pools_text"] == "main ×1 (default), bulk ×1" and old["warmed"]
    assert old["rdns_problem"].startswith(f"sending source old ({SOURCE_B}): its reverse DNS "
                                          f"says mail.elsewhere.test, not its EHLO name "
                                          f"old.sender.test")
    # the page: the same row, server-rendered
    table = page[page.index('id="sources"'):page.index("</table>", page.index('id="sources"'))]
    row = table[table.index('data-source="new"'):table.index('data-source="old"')]
    for cell in ("<td>new</td>", f"<td>{SOURCE_A}</td>", "<td>new.sender.test</td>",
                 "<td>main ×3 (default)</td>", "names its EHLO name",
                 "day 1: 50 a provider today", '<td class="today">sink.test 3 / 50</td>'):
        assert cell in row, (cell, row)
    assert 'class="bad">sending source old' in table and "warmed up" in table
    # /metrics: every line parses; the series an operator graphs and alerts on
    for line in metrics.splitlines():
        assert line.startswith("#") or re.fullmatch(
            r'[a-z_]+(\{[a-z]+="(\\.|[^"\\])*"(,[a-z]+="(\\.|[^"\\])*")*\})? -?\d+(\.\d+)?',
            line), line
    for want in (f'mailengine_source_info{{source="new",ip="{SOURCE_A}",helo="new.sender.test"}} 1',
                 f'mailengine_source_info{{source="old",ip="{SOURCE_B}",helo="old.sender.test"}} 1',
                 'mailengine_source_pool_weight{source="new",pool="main"} 3',
                 'mailengine_source_pool_weight{source="old",pool="bulk"} 1',
                 'mailengine_source_warmup_sent{source="new",provider="sink.test"} 3',
                 'mailengine_source_warmup_limit{source="new",provider="sink.test"} 50',
                 'mailengine_source_warmup_default_limit{source="new"} 50',
                 'mailengine_source_warmup_day{source="new"} 1',
                 'mailengine_source_rdns_ok{source="new"} 1',
                 'mailengine_source_rdns_ok{source="old"} 0',
                 "# TYPE mailengine_source_warmup_sent gauge",
                 "# TYPE mailengine_source_outbound_connections gauge"):
        assert want in metrics, want
    assert re.search(r'^mailengine_source_outbound_connections\{source="new"\} [01]$', metrics,
                     re.M)
    assert 'mailengine_source_warmup_sent{source="old"' not in metrics  # warmed: not counted
    assert metrics.count("# TYPE mailengine_source_info ") == 1
    readme = (DOCS.parent / "README.md").read_text()  # each series is in README's metrics list
    names = re.findall(r"^# TYPE (mailengine_source_\w+) gauge$", metrics, re.M)
    assert len(names) == 8 and all(f"`{n}{{" in readme for n in names), names


def test_metrics_label_values_are_escaped_and_no_sources_means_no_series(running):
    from mailengine.web.metrics import _labels
    assert _labels(source="a", provider='we"ird\\x\ny') == \
        '{source="a",provider="we\\"ird\\\\x\\ny"}'
    c = Client(running.web_port)
    assert "mailengine_source_" not in c.get("/metrics").text
    c.login()
    assert 'id="sources"' not in c.get("/gui/admin").text
    assert json.loads(c.get("/gui/admin/status.json").text)["sources"] == []
