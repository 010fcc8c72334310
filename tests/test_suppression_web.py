"""The suppression list's admin page in headless Chromium (as tests/test_web_browser.py): find
it in the menu, add an entry, search, import a CSV file, remove, export."""
from __future__ import annotations

import time

from mailengine.suppression import SuppressionStore
from mailengine.testing.engine import RunningEngine, free_port

# the browser, its flags and the skips of tests/test_web_browser.py
from test_web_browser import ARGS, CHROMIUM, pytestmark, sync_api  # noqa: E402,F401


def test_suppression_page_in_a_browser(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "password.txt").write_text("admin:opensesame\n")
    s = SuppressionStore(home)
    s.add("bounced@old.test", reason="550 5.1.1 user unknown", source="bounce")
    s.close()
    csv_file = tmp_path / "old.csv"
    csv_file.write_text("address,sender_domain,reason\nx1@imp.test,,from the old MTA\n"
                        "x2@imp.test,news.test,from the old MTA\n")
    web_port = free_port()
    with RunningEngine(home, {"network.web_port": web_port, "network.web_ip": "127.0.0.1"}), \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("dialog", lambda d: d.accept())  # "Remove ...?"
            base = f"http://127.0.0.1:{web_port}"
            for _ in range(100):
                try:
                    page.goto(base + "/gui/login")
                    break
                except sync_api.Error:
                    time.sleep(0.1)
            page.fill("input[name=user]", "admin")
            page.fill("input[name=password]", "opensesame")
            page.click("button[type=submit]")
            page.wait_for_url(base + "/gui/admin")
            page.click("nav >> text=Suppressions")
            assert "bounced@old.test" in page.inner_text("#suppressions")
            assert "550 5.1.1 user unknown" in page.inner_text("#suppressions")

            page.fill("#add input[name=address]", "Asked@Me.test")
            page.fill("#add input[name=sender_domain]", "news.test")
            page.fill("#add input[name=reason]", "phoned us")
            page.fill("#add input[name=days]", "30")
            page.click("#add button[type=submit]")
            page.wait_for_selector(".flash.ok")
            assert "asked@me.test is suppressed for mail from news.test" in \
                page.inner_text(".flash.ok")
            row = page.locator("#suppressions tr", has_text="asked@me.test")
            assert "news.test" in row.inner_text() and "never" not in row.inner_text()

            page.set_input_files("input[name=file]", str(csv_file))
            page.click("#import button[type=submit]")
            page.wait_for_selector(".flash.ok")
            assert "2 entries imported" in page.inner_text(".flash.ok")
            assert page.inner_text("#total").startswith("4 entries")

            page.fill("#search input[name=search]", "imp.test")
            page.click("#search button[type=submit]")
            assert page.inner_text("#total").startswith("2 entries")
            page.locator("#suppressions tr", has_text="x1@imp.test").locator(
                "button").click()
            page.wait_for_selector(".flash.ok")
            assert "x1@imp.test removed" in page.inner_text(".flash.ok")

            with page.expect_download() as dl:
                page.click("text=Export CSV")
            text = open(dl.value.path()).read()
            assert "x2@imp.test,news.test,from the old MTA,import" in text
            assert "x1@imp.test" not in text
        finally:
            browser.close()
    s = SuppressionStore(home)
    assert s.lookup("asked@me.test", "news.test").reason == "phoned us"
    assert s.lookup("x1@imp.test") is None
    s.close()
