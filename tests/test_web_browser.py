"""The web admin in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright.

One engine delivers to an SMTP sink (sink.test) and cannot reach another destination
(down.test: nothing listens there), so the pages have mail moving, mail waiting for a retry,
and a queue to browse. The test logs in, watches the live charts fill, changes a setting and
sees the SMTP listener take it at once, browses the queue by domain and by message, deletes a
message, and views the bounce lists. A second engine sends from two sending sources
(shaping.toml): the Status page's table of sources follows a source's warm-up count live and
shows its reverse DNS problem. With MAILENGINE_SCREENSHOTS=DIR it saves the pages there
(docs/screenshots/ holds the ones made so).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import smtplib
import time
import urllib.request
from pathlib import Path

import pytest

from mailengine.testing.dnsserver import TestDNSServer
from mailengine.testing.engine import RunningEngine, free_port
from mailengine.testing.sink import ThreadedSink

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="Debian's chromium is not installed")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-dev-shm-usage"]
SHOTS = os.environ.get("MAILENGINE_SCREENSHOTS")


def shot(page, tmp_path: Path, name: str, full_page: bool = True) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=full_page)
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=full_page)


def send(port: int, rcpts: list[str], subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("news@src.test", rcpts,
                   f"From: news@src.test\r\nSubject: {subject}\r\n\r\nhello\r\n".encode())


def ehlo_size(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("t.test")
        return int(s.esmtp_features["size"])


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_admin_in_a_browser(tmp_path, browser):
    home = tmp_path / "home"
    home.mkdir()
    (home / "password.txt").write_text("admin:opensesame\n")
    (home / "hard-bounces.txt").write_text("gone@old.test\nnobody@void.test\n")
    (home / "soft-undeliverable.txt").write_text("full@box.test\n")
    web_port, dead_port = free_port(), free_port()
    with ThreadedSink("127.0.0.1", 0) as sink:
        settings = {
            "network.web_port": web_port, "network.web_ip": "127.0.0.1",
            "queue.pause_sending": False, "network.helo_text": "engine.test",
            "queue.retry_intervals": [30, 60], "queue.queue_check_interval": 60,
            "limits.smtp_connect_timeout": 5,
            "basic.dns_servers": [f"sink.test,mx.sink.test,MX,127.0.0.1:{sink.port}",
                                  f"down.test,mx.down.test,MX,127.0.0.1:{dead_port}"]}
        with RunningEngine(home, settings) as eng:
            for i in range(12):  # mail moving while the charts sample
                send(eng.smtp_port, [f"u{i}@sink.test", f"v{i}@sink.test"], f"news {i}")
                if i % 3 == 0:
                    send(eng.smtp_port, [f"w{i}@down.test"], f"stuck {i}")
                time.sleep(0.4)
            sink.wait_messages(12, timeout=20)

            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("dialog", lambda d: d.accept())  # the "Delete ...?" confirmations
            base = f"http://127.0.0.1:{web_port}"

            # Log in: / leads to the admin, which asks for a login first.
            page.goto(base + "/")
            assert page.url.startswith(base + "/gui/login")
            page.fill("input[name=user]", "admin")
            page.fill("input[name=password]", "wrong")
            page.click("button[type=submit]")
            assert "Wrong user name or password" in page.inner_text("#login-error")
            time.sleep(0.6)  # the slowdown after a failure
            shot(page, tmp_path, "login")
            page.fill("input[name=user]", "admin")
            page.fill("input[name=password]", "opensesame")
            page.click("button[type=submit]")
            page.wait_for_url(base + "/gui/admin")

            # Live status: the charts fill from status.json, the tiles show what moved.
            page.wait_for_function(
                "document.querySelector('#chart-rates').getAttribute('data-points') > 2",
                timeout=15000)
            assert int(page.inner_text("[data-k=received]")) == 16
            assert int(page.inner_text("[data-k=sent]")) >= 24
            page.wait_for_selector("#dests >> text=down.test")
            tiles = page.inner_text("#tiles")  # each count says what it counts
            for label in ("messages received", "recipients sent", "recipients failed",
                          "messages queued"):
                assert label in tiles, tiles
            page.wait_for_function(
                "document.querySelector('#chart-conns').getAttribute('data-clock')",
                timeout=15000)
            for chart in ("#chart-rates", "#chart-conns"):  # 24-hour times, as in the logs
                assert re.fullmatch(r"\d\d:\d\d:\d\d \d\d:\d\d:\d\d",
                                    page.get_attribute(chart, "data-clock"))
            for chart in ("#chart-conns", "#chart-queue"):  # counts: whole-number ticks
                ticks = page.get_attribute(chart, "data-ticks").split()
                assert len(ticks) == 5 and all(t.isdigit() for t in ticks), (chart, ticks)
            shot(page, tmp_path, "status")

            # Settings: change one, see it applied to the running listener at once.
            assert ehlo_size(eng.smtp_port) == 10485760
            page.click("text=Settings")
            assert page.locator("button[type=submit]:visible").count() == 2  # Save, Log out
            assert page.locator("#save").count() == 1  # one Save button for every section
            row = "#row-queue\\.pause_sending"
            assert "Default: false" in page.inner_text(row)  # TOML, as the file writes it
            assert "Default: [\"127.0.0.1\"]" in page.inner_text("#row-policy\\.relay_ips")
            assert page.locator("#row-limits\\.max_message_size .badge.changed").count() == 0
            page.fill("textarea[name='policy.refused_mail_from']", "spammer")
            page.fill("input[name='limits.max_message_size']", "5000000")
            page.click("#save")
            page.wait_for_selector(".flash.ok")
            assert "applied now: limits.max_message_size, policy.refused_mail_from" in \
                page.inner_text(".flash.ok")
            assert ehlo_size(eng.smtp_port) == 5000000
            assert "max_message_size = 5000000" in (home / "mailengine.toml").read_text()
            # the banner is in view, at the top and after scrolling to the bottom
            in_view = ("(() => { const r = document.querySelector('.flash.ok')"
                       ".getBoundingClientRect(); return r.top >= 0 && r.bottom <= "
                       "window.innerHeight; })()")
            assert page.evaluate(in_view)
            page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
            assert page.evaluate(in_view)
            assert page.locator("#row-limits\\.max_message_size .badge.changed").count() == 1
            # A bad value is refused with the config file's rule, and nothing is saved.
            page.fill("input[name='limits.max_message_size']", "10")
            page.click("#save")
            assert "must be at least 1024" in page.inner_text("#row-limits\\.max_message_size")
            assert ehlo_size(eng.smtp_port) == 5000000
            page.goto(base + "/gui/admin/settings")
            shot(page, tmp_path, "settings", full_page=False)

            # The queue by domain, then by message, then one message; delete it.
            page.click("text=Queue")
            page.wait_for_selector("#domains >> text=down.test")
            shot(page, tmp_path, "queue")
            page.click("#domains >> text=down.test")
            rows = page.locator("#messages tbody tr")
            assert rows.count() == 4
            first = rows.nth(0).locator("a").inner_text()
            page.click(f"text={first}")
            assert page.inner_text("#state") in ("waiting for retry", "ready", "sending")
            assert "rcpttosend=w0@down.test" in page.inner_text("#inf")
            assert "@down.test" in page.inner_text("#last-reply")  # why it waits
            assert page.evaluate("getComputedStyle(document.querySelector('#inf'))"
                                 ".whiteSpace") == "pre-wrap"  # the long log= line wraps
            shot(page, tmp_path, "message")
            for _ in range(40):  # a message being tried right now cannot be deleted yet
                page.click("#do-delete")
                page.wait_for_selector(".flash")
                if "done" in page.inner_text(".flash"):
                    break
                time.sleep(0.25)
                page.goto(base + f"/gui/admin/queue/message/{first}")
            assert "delete: done" in page.inner_text(".flash.ok")
            assert not (eng.mailq / "retry" / f"{first}.inf").exists()
            page.click("#domains >> text=down.test")
            assert page.locator("#messages tbody tr").count() == 3

            # Bounce and undeliverable lists.
            page.click("text=Bounces")
            assert "hard-bounces.txt" in page.inner_text("#lists")
            shot(page, tmp_path, "lists")
            page.click("#lists >> text=hard-bounces.txt")
            assert "gone@old.test" in page.inner_text("#list")

            # API tokens: make one and use it.
            page.click("text=API tokens")
            page.fill("input[name=name]", "newsletter-app")
            page.click("text=Create token")
            token = page.inner_text("#new-token").strip()
            assert token.startswith("me_")
            shot(page, tmp_path, "tokens")
            req = urllib.request.Request(base + "/api/v1/stats",
                                         headers={"Authorization": f"Bearer {token}"})
            stats = json.loads(urllib.request.urlopen(req, timeout=10).read())
            assert stats["received"] == 16

            # Log out: the admin asks for a login again.
            page.click("text=Log out")
            page.wait_for_url(base + "/gui/login")
            page.goto(base + "/gui/admin/queue")
            assert page.url.startswith(base + "/gui/login")


def test_sending_sources_in_a_browser(tmp_path, browser):
    """The Status page's table of sending sources (shaping.toml [sources.NAME]) fills its warm-up
    count live as mail goes out from a source, and shows a reverse DNS problem in red."""
    import datetime as dt
    home = tmp_path / "home"
    home.mkdir()
    (home / "password.txt").write_text("admin:opensesame\n")
    (home / "shaping.toml").write_text(f"""default_pool = "main"
[sources.fresh]
ip = "127.0.0.43"
helo = "fresh.sender.test"
warmup_start = {(dt.date.today() - dt.timedelta(days=1)).isoformat()}
warmup = [10, 40, 100]
[sources.warm]
ip = "127.0.0.44"
helo = "warm.sender.test"
[pools.main]
sources = {{ fresh = 2, warm = 1 }}
""")
    web_port = free_port()
    zones = {"43.0.0.127.in-addr.arpa": {"PTR": ["mail.elsewhere.test"]},  # not its EHLO name
             "44.0.0.127.in-addr.arpa": {"PTR": ["warm.sender.test"]}}
    with TestDNSServer(zones) as dns, ThreadedSink("127.0.0.1", 0) as sink:
        settings = {
            "network.web_port": web_port, "network.web_ip": "127.0.0.1",
            "queue.pause_sending": False, "network.helo_text": "engine.test",
            "basic.nameservers": [dns.address],
            "basic.dns_servers": [f"sink.test,mx.sink.test,MX,127.0.0.1:{sink.port}"]}
        with RunningEngine(home, settings) as eng:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            base = f"http://127.0.0.1:{web_port}"
            for _ in range(100):
                try:
                    page.goto(base + "/gui/login")
                    break
                except sync_api.Error:  # the web server is not up yet
                    time.sleep(0.1)
            page.fill("input[name=user]", "admin")
            page.fill("input[name=password]", "opensesame")
            page.click("button[type=submit]")
            page.wait_for_url(base + "/gui/admin")
            fresh = "#sources tr[data-source=fresh]"
            assert page.inner_text(fresh + " td.today") == "none yet"
            cells = page.locator(fresh + " td").all_inner_texts()
            assert cells[:4] == ["fresh", "127.0.0.43", "fresh.sender.test",
                                 "main ×2 (default)"], cells
            assert cells[6] == "day 2: 40 a provider today"

            # mail goes out from "fresh" (the first pick of main): the table follows, no reload
            send(eng.smtp_port, ["a@sink.test", "b@sink.test"], "warm-up")
            sink.wait_messages(1, timeout=20)
            page.locator(fresh + " td.today", has_text="sink.test 2 / 40").wait_for(
                timeout=15000)
            assert page.inner_text(fresh + " td.today") == "sink.test 2 / 40"
            assert [s.peer[0] for s in sink.sessions] == ["127.0.0.43"]
            page.wait_for_selector("#sources td.bad >> text=mail.elsewhere.test", timeout=15000)
            problem = page.inner_text(fresh + " td.bad")
            assert problem.startswith("sending source fresh (127.0.0.43): its reverse DNS says "
                                      "mail.elsewhere.test, not its EHLO name "
                                      "fresh.sender.test"), problem
            assert page.evaluate(f"getComputedStyle(document.querySelector('{fresh} td.bad'))"
                                 ".color") == "rgb(179, 38, 30)"  # --bad
            warm = page.locator("#sources tr[data-source=warm] td").all_inner_texts()
            assert warm[3] == "main ×1 (default)" and warm[6] == "warmed up", warm
            assert warm[4] == "names its EHLO name" and warm[7] == "none yet", warm
            card = page.locator("section:has(#sources)")  # the Status page's sources card
            card.screenshot(path=str(tmp_path / "sources.png"))
            if SHOTS:
                Path(SHOTS).mkdir(parents=True, exist_ok=True)
                card.screenshot(path=str(Path(SHOTS) / "sources.png"))
