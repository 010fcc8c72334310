"""Bounce categories: what kind of failure a reply or a returned mail is (issue 18, item 1).

`categorize(code, enhanced, text)` names the category of one failure, whether it is a reply the
engine got while sending (the SMTP code, the RFC 3463 enhanced code, the server's text) or an
asynchronous bounce parsed by bounces.py (its status, code and reason). Hard or soft is another
question (outcome.classify, bounces.classify_reply): the category says *why*, so an operator can
tell an address that will never work from a blocklisted IP or a full mailbox.

The categories (the names are PowerMTA's, which bounce-processing tools already know):

    bad-mailbox          the address does not exist at the domain (user unknown, X.1.1, a bad
                         address syntax)
    inactive-mailbox     the mailbox exists but is disabled, suspended or abandoned
    bad-domain           the domain does not exist or takes no mail (NXDOMAIN, null MX, X.1.2)
    quota-issues         the mailbox or the receiving system is full (X.2.2, X.3.1, 552)
    invalid-sender       the sender address is refused (unknown sender domain, X.1.7, X.1.8)
    policy-related       the receiver's rules refuse it: authentication (SPF, DKIM, DMARC, PTR,
                         Microsoft's 5.7.515), rate limits, greylisting, local policy (X.7.x)
    spam-related         taken for spam: content filters, blocklists (Spamhaus, ...), reputation
                         and complaint throttles
    virus-related        a virus or malware was found in the message
    content-related      the content is refused for what it is: size, attachments, encoding
    relaying-issues      the server will not relay for that domain
    routing-errors       no usable route: failing DNS lookups, MX hosts without addresses, loops
    protocol-errors      the SMTP dialogue went wrong: syntax, sequence, a missing extension
    bad-connection       the connection broke after it was made: lost, timed out, TLS failure
    no-answer-from-host  no connection at all: refused, timed out, unreachable (X.4.1)
    message-expired      the message waited too long: X.4.7, or given up after the last retry
    other                nothing else matched

`PERMANENT` holds the categories that mean "this address will never work", for suppression.

The rules: `data/bounce_categories.toml`, shipped in the package, is an ordered list of rules;
the first that matches wins, and no match is `other`. A rule names its `category` and any of
`enhanced` (patterns like "5.1.1", "x.1.1" or "x.7.x": each part a number or x), `code` (numbers
or patterns like "55x", "5xx") and `text` (a regular expression, searched case-insensitively);
all the conditions a rule gives must hold, and a list means any of its entries. An operator may
add rules in `HOME/bounce_categories.toml` (same format): they come before the shipped ones and
are read again when the file changes (checked at most every RECHECK seconds). Every rule is
checked when its file is read; a bad rule is an error naming the file and the rule. A bad
override file is logged and ignored (the rules read before stay), never a traceback.
"""
from __future__ import annotations

import logging
import re
import threading
import time
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .file_stamp import file_stamp

log = logging.getLogger("mailengine.categories")

CATEGORIES: dict[str, str] = {
    "bad-mailbox": "the address does not exist at the domain",
    "inactive-mailbox": "the mailbox exists but is disabled, suspended or abandoned",
    "bad-domain": "the domain does not exist or takes no mail",
    "quota-issues": "the mailbox or the receiving system is full",
    "invalid-sender": "the sender address is refused",
    "policy-related": "the receiver's rules refuse it (authentication, rate limits, policy)",
    "spam-related": "taken for spam (filters, blocklists, reputation, complaints)",
    "virus-related": "a virus or malware was found",
    "content-related": "the content is refused (size, attachments, encoding)",
    "relaying-issues": "the server will not relay for that domain",
    "routing-errors": "no usable route (DNS failures, MX hosts without addresses, loops)",
    "protocol-errors": "the SMTP dialogue went wrong",
    "bad-connection": "the connection broke after it was made",
    "no-answer-from-host": "no connection to the server",
    "message-expired": "the message waited too long",
    "other": "nothing else matched",
}
OTHER = "other"
EXPIRED = "message-expired"
PERMANENT = frozenset({"bad-mailbox", "bad-domain", "inactive-mailbox"})  # "will never work"

OVERRIDE_FILE = "bounce_categories.toml"
RECHECK = 2.0          # seconds between looks at the override file
MAX_TEXT = 1000        # characters of a reply searched: a returned mail's essay is no help
CACHE_SIZE = 4096      # (code, enhanced, text) answers kept: failures repeat in bulk
_RULE_KEYS = {"category", "enhanced", "code", "text", "note"}
_ENHANCED_PART = re.compile(r"\d{1,3}|x", re.I)
_CODE_PATTERN = re.compile(r"[2-5][0-9x][0-9x]", re.I)
_REPLY = re.compile(r"\s*(\d{3})(?:[ -]+([245]\.\d{1,3}\.\d{1,3})(?![\d.]))?[ -]*(.*)", re.S)


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file and the rule."""


@dataclass(frozen=True)
class Rule:
    category: str
    enhanced: tuple[tuple[str, str, str], ...] = ()  # parts, "x" = any
    code: tuple[str, ...] = ()                       # three characters each, "x" = any digit
    text: re.Pattern | None = None
    where: str = ""                                  # "FILE, rule N", for messages

    def matches(self, code: int, enhanced: str, text: str) -> bool:
        if self.enhanced:
            parts = enhanced.split(".")
            if len(parts) != 3 or not any(
                    all(p == "x" or p == q for p, q in zip(pat, parts)) for pat in self.enhanced):
                return False
        if self.code:
            c = str(code)
            if len(c) != 3 or not any(
                    all(p == "x" or p == q for p, q in zip(pat, c)) for pat in self.code):
                return False
        return self.text is None or self.text.search(text) is not None


# ------------------------------------------------------------------------------------- reading

def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _rule(entry, where: str) -> Rule:
    if not isinstance(entry, dict):
        raise RulesError(f"{where}: a rule is a table ([[rule]]), not {type(entry).__name__}")
    unknown = sorted(set(entry) - _RULE_KEYS)
    if unknown:
        raise RulesError(f"{where}: unknown key {', '.join(unknown)} (a rule has "
                         f"{', '.join(sorted(_RULE_KEYS))})")
    category = entry.get("category")
    if category not in CATEGORIES:
        raise RulesError(f"{where}: category {category!r} is not one of "
                         f"{', '.join(CATEGORIES)}")
    where = f"{where} ({category})"
    if not any(k in entry for k in ("enhanced", "code", "text")):
        raise RulesError(f"{where}: give at least one of enhanced, code, text")
    enhanced = []
    for pat in _as_list(entry.get("enhanced", [])):
        parts = pat.lower().split(".") if isinstance(pat, str) else []
        if len(parts) != 3 or not all(_ENHANCED_PART.fullmatch(p) for p in parts) or \
                parts[0] not in ("2", "4", "5", "x"):
            raise RulesError(f"{where}: enhanced {pat!r} is not like 5.1.1, x.1.1 or x.7.x")
        enhanced.append(tuple(p if p == "x" else str(int(p)) for p in parts))
    codes = []
    for pat in _as_list(entry.get("code", [])):
        s = str(pat).lower() if isinstance(pat, (int, str)) and not isinstance(pat, bool) else ""
        if not _CODE_PATTERN.fullmatch(s):
            raise RulesError(f"{where}: code {pat!r} is not like 550, 55x or 5xx")
        codes.append(s)
    text = None
    if "text" in entry:
        if not isinstance(entry["text"], str) or not entry["text"]:
            raise RulesError(f"{where}: text must be a non-empty regular expression")
        try:
            text = re.compile(entry["text"], re.I)
        except re.error as e:
            raise RulesError(f"{where}: text {entry['text']!r} is not a regular expression: "
                             f"{e}") from None
    if "note" in entry and not isinstance(entry["note"], str):
        raise RulesError(f"{where}: note must be a string")
    if (("enhanced" in entry and not enhanced) or ("code" in entry and not codes)):
        raise RulesError(f"{where}: an empty list matches nothing")
    return Rule(category, tuple(enhanced), tuple(codes), text, where)


def parse_rules(source: str, name: str = "rules") -> list[Rule]:
    """The rules of one file's text; RulesError names what is wrong and where."""
    try:
        data = tomllib.loads(source)
    except tomllib.TOMLDecodeError as e:
        raise RulesError(f"{name}: not valid TOML: {e}") from None
    unknown = sorted(set(data) - {"rule"})
    if unknown:
        raise RulesError(f"{name}: unknown key {', '.join(unknown)} (the file holds [[rule]] "
                         "tables only)")
    rules = data.get("rule", [])
    if not isinstance(rules, list):
        raise RulesError(f"{name}: write each rule as [[rule]]")
    return [_rule(entry, f"{name}, rule {i}") for i, entry in enumerate(rules, 1)]


def load_rules(path: Path | str) -> list[Rule]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RulesError(f"{path}: cannot read it: {e}") from None
    return parse_rules(text, str(path))


def shipped_rules() -> list[Rule]:
    """The rules that come with the package (a bad one is a bug: it raises)."""
    ref = resources.files(__package__).joinpath("data", "bounce_categories.toml")
    return parse_rules(ref.read_text(encoding="utf-8"), "bounce_categories.toml (shipped)")


# ------------------------------------------------------------------------------------- matching

class Categorizer:
    """Shipped rules, with an operator's override file in front when one is set."""

    def __init__(self, rules: list[Rule] | None = None, override: Path | str | None = None,
                 clock=time.monotonic) -> None:
        self._base = rules
        self._extra: list[Rule] = []
        self.override = Path(override) if override else None
        self.problem = ""          # what is wrong with the override file, "" when nothing
        self._seen = None          # the override file's (mtime, size, inode) last read
        self._checked = float("-inf")
        self._clock = clock
        self._cache: dict[tuple[int, str, str], str] = {}
        self._lock = threading.Lock()  # the intake's bounce threads categorize too

    @property
    def rules(self) -> list[Rule]:
        if self._base is None:
            self._base = shipped_rules()
        return self._extra + self._base

    def set_override(self, path: Path | str | None) -> None:
        path = Path(path) if path else None
        with self._lock:
            if path != self.override:
                self.override, self._seen, self._extra = path, None, []
                self._checked = float("-inf")
                self._cache.clear()

    def _recheck(self) -> None:
        now = self._clock()
        if now - self._checked < RECHECK:
            return
        self._checked = now
        seen = file_stamp(self.override)
        if seen == self._seen:
            return
        self._seen = seen
        if seen is None:
            if self._extra:
                log.info("%s is gone: the shipped bounce categories only", self.override)
            self._extra, self.problem = [], ""
        else:
            try:
                self._extra = load_rules(self.override)
                self.problem = ""
                log.info("bounce categories: %d rules of %s come first", len(self._extra),
                         self.override)
            except RulesError as e:  # keep what was read before; say why, once per change
                self.problem = str(e)
                log.error("bounce categories: %s; the file is ignored until it is fixed", e)
        self._cache.clear()

    def categorize(self, code: int, enhanced: str = "", text: str = "") -> str:
        code = code if isinstance(code, int) else 0
        enhanced = (enhanced or "").strip()
        text = (text or "")[:MAX_TEXT]
        key = (code, enhanced, text)
        with self._lock:
            if self.override is not None:
                self._recheck()
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            found = next((r.category for r in self.rules if r.matches(code, enhanced, text)),
                         OTHER)
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = found
            return found

    def check(self) -> str:
        """Look at the override file (when due) and say what is wrong with it, '' if nothing."""
        with self._lock:
            if self.override is not None:
                self._recheck()
            return self.problem

    def categorize_reply(self, reply: str) -> str:
        return self.categorize(*split_reply(reply))


def split_reply(reply: str) -> tuple[int, str, str]:
    """'550 5.1.1 No such user' -> (550, '5.1.1', 'No such user'); text without a code -> (0,
    '', text)."""
    m = _REPLY.fullmatch(reply or "")
    if not m:
        return 0, "", reply or ""
    return int(m.group(1)), m.group(2) or "", m.group(3)


_default = Categorizer()


def use_home(home: Path | str | None) -> None:
    """Read operator rules from HOME/bounce_categories.toml (when it exists) from now on."""
    _default.set_override(Path(home) / OVERRIDE_FILE if home else None)


def categorize(code: int, enhanced: str, text: str) -> str:
    """The category of one failure: an SMTP reply (code, enhanced code, text) or a parsed
    bounce (its code, status and reason). 'other' when no rule matches."""
    return _default.categorize(code, enhanced, text)


def categorize_reply(reply: str) -> str:
    """The category of a reply written as one line ('550 5.1.1 No such user')."""
    return _default.categorize_reply(reply)


def override_problem() -> str:
    """What is wrong with the operator's rules file now ('' when nothing is)."""
    return _default.check()
