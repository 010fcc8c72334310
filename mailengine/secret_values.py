"""Secret setting values, shown masked wherever a value is shown: `mailengine config show` (and
`config set`'s, `config upgrade`'s and `init`'s echo), the web admin's settings page, the log
line of a change, and webhook URLs in `mailengine status`, /metrics and the log.

A setting is secret when its record says so (`Setting.secret`: webhooks.secret) or its key reads
like one (secret, password, token, api key...), so a setting added later is masked without
anyone remembering to mark it. Its value shows as MASK when set and "" when not: whether it is
set stays visible. Any other value holding a URL with a password (`redis://:pw@host/0`,
`https://user:pw@host/hook`) shows that password as MASK.

The web form sends back what it showed, so `unmask` turns a MASK left untouched into the value
it stands for: saving the page never writes "********" as a secret or a password.
"""
from __future__ import annotations

import re
from typing import Any

from .setting import Setting

MASK = "********"
_SECRET_KEY = re.compile(r"secret|passw|token|api_?key|credential|private", re.I)
# scheme://user:PASSWORD@ (the user may be empty: redis://:pw@host)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/?#@\s:]*:)([^/?#@\s]+)(@)", re.I)


def is_secret(s: Setting) -> bool:
    return s.secret or bool(_SECRET_KEY.search(s.key))


def mask_text(text: str) -> str:
    """`text` with the password of every URL in it replaced by MASK."""
    return _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), text) \
        if "@" in text else text


def shown(s: Setting, value: Any) -> Any:
    """`value` of setting `s` as it may be shown."""
    if is_secret(s):
        if isinstance(value, list):
            return [MASK if v else v for v in value]
        return MASK if value else value
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, list):
        return [mask_text(v) if isinstance(v, str) else v for v in value]
    return value


def unmask(s: Setting, submitted: Any, current: Any) -> Any:
    """A value sent back by a form that showed `shown(s, current)`: what was left as shown is
    `current` again, a URL password left as MASK is the one `current` has for that scheme, user
    and host; what was typed anew stays."""
    if submitted == shown(s, current):
        return current
    if is_secret(s):
        if isinstance(submitted, list) and isinstance(current, list):  # entries left as MASK
            return [current[i] if v == MASK and i < len(current) else v
                    for i, v in enumerate(submitted)]
        return submitted
    passwords = {}
    for text in current if isinstance(current, list) else [current]:
        if isinstance(text, str):
            for m in _URL_PASSWORD.finditer(text):
                passwords[_where(text, m)] = m.group(2)

    def back(text: str) -> str:
        if not isinstance(text, str) or MASK not in text:
            return text
        return _URL_PASSWORD.sub(
            lambda m: m.group(1) + passwords.get(_where(text, m), m.group(2)) + m.group(3)
            if m.group(2) == MASK else m.group(0), text)

    return [back(v) for v in submitted] if isinstance(submitted, list) else back(submitted)


def _where(text: str, m: re.Match) -> tuple[str, str]:
    """A URL's scheme://user: and host, which a password belongs to."""
    host = re.match(r"[^/?#\s]*", text[m.end():]).group(0)
    return m.group(1).lower(), host.lower()
