"""Secret setting values are shown masked (secret_values.py) and a mask sent back by the web
form stands for the value it hid."""
from __future__ import annotations

import re

from mailengine.config import BY_NAME, SETTINGS
from mailengine.secret_values import MASK, is_secret, mask_text, shown, unmask


def test_which_settings_are_secret():
    assert is_secret(BY_NAME["webhooks.secret"])
    assert not is_secret(BY_NAME["network.tls_key"])  # a file's path, not the key itself
    assert not is_secret(BY_NAME["shared.redis_url"])  # only its password is
    # any setting whose name reads like a secret is masked, marked or not
    for s in SETTINGS:
        if re.search(r"secret|password|passwd|token|api_?key", s.key):
            assert is_secret(s), s.name


def test_secrets_show_whether_they_are_set_and_nothing_more():
    s = BY_NAME["webhooks.secret"]
    assert shown(s, "whsec-1") == MASK and shown(s, "") == ""
    assert unmask(s, MASK, "whsec-1") == "whsec-1"  # left as shown: kept
    assert unmask(s, "new", "whsec-1") == "new"  # typed anew
    assert unmask(s, "", "whsec-1") == ""  # cleared


def test_passwords_in_urls_are_masked_and_come_back():
    r = BY_NAME["shared.redis_url"]
    url = "redis://:s3cr3t@10.0.0.5:6379/0"
    assert shown(r, url) == f"redis://:{MASK}@10.0.0.5:6379/0"
    assert shown(r, "redis://10.0.0.5:6379/0") == "redis://10.0.0.5:6379/0"
    assert shown(r, "rediss://app:pw@h:6380") == f"rediss://app:{MASK}@h:6380"
    assert unmask(r, shown(r, url), url) == url
    # the database changed, the password left masked: it is kept
    assert unmask(r, f"redis://:{MASK}@10.0.0.5:6379/3", url) == "redis://:s3cr3t@10.0.0.5:6379/3"
    # another host: the mask stands for nothing there, left as written
    assert unmask(r, f"redis://:{MASK}@other:6379/0", url) == f"redis://:{MASK}@other:6379/0"
    assert unmask(r, "redis://:typed@10.0.0.5:6379/0", url) == "redis://:typed@10.0.0.5:6379/0"
    w = BY_NAME["webhooks.urls"]
    urls = ["https://crm:pw1@crm.example/hook", "https://plain.example/h?x=1",
            "http://a.example:8080/p@th"]
    assert shown(w, urls) == [f"https://crm:{MASK}@crm.example/hook", urls[1], urls[2]]
    assert unmask(w, shown(w, urls), urls) == urls
    assert unmask(w, shown(w, urls)[:1] + ["https://new.example/"], urls) == [
        urls[0], "https://new.example/"]
    assert mask_text("no url here, a@b.example") == "no url here, a@b.example"
    assert shown(BY_NAME["limits.max_recipients"], 5) == 5


def test_webhook_status_shows_no_url_password():
    """`mailengine status` and /metrics show each webhook URL's progress from this record."""
    from mailengine.webhooks import UrlState
    st = UrlState("https://crm:pw-5@crm.example/hook")
    st.last_error = "POST https://crm:pw-5@crm.example/hook: 500"
    d = st.as_dict()
    assert "pw-5" not in json_text(d) and d["url"] == f"https://crm:{MASK}@crm.example/hook"


def json_text(d: dict) -> str:
    import json
    return json.dumps(d)
