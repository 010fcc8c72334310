"""Traffic shaping per mailbox provider: who a destination really is, how hard it may be pushed,
and what its throttling replies do to us (issue 17, items 1 and 2).

Pure logic with an injected clock; its only I/O is reading the rules files. delivery.py asks it
and carries out its answers.

- **Providers (MX rollup).** A provider is named by the suffixes of its MX host names
  (`mx = ["google.com", "googlemail.com"]`) and optionally by domain names it is known to hold.
  A domain whose MX hosts end in one of them belongs to it: `learn(domain, mx_hosts)`, told by
  delivery after each MX lookup; a domain not `known` yet is looked up before its first unit
  starts. From then on the scheduler queues that domain's mail under the provider's name
  (`dest`), so every limit below is shared by all the provider's domains.
  Domains matching no provider (every `.test` domain) are their own destination, as before.
- **Rules** (`HOME/shaping.toml`, merged over the shipped `data/shaping_defaults.toml`): limits
  per provider, per domain or as `[default]`; for one domain the first that sets a key wins:
  domain > provider > default. The connection and message-rate limits belong to the
  destination: a provider's are shared by its domains; a domain with its own `max_connections`
  or message rate is its own destination, taken out of its provider.
- **Reactions** (`[[reaction]]`): a reply (code, enhanced code, a regex on the reply, a
  provider) -> `suspend` the destination (no new unit starts until it expires: mail waits, never
  fails), `throttle` it (its connection limit and message rates times `factor`), or `bounce`
  the recipient (fails for good). After a throttle's time the limit comes back step by step:
  the factor doubles every `recover` seconds until it is whole again. Every override keeps its
  cause (the reply) and expiry (`active`), can be lifted by hand (`lift`), and every change is
  logged. Each change is also told to `on_change` (shaping_link.py keeps them in the home and
  shares them with other engines, whose overrides come back through `adopt`).
"""
from __future__ import annotations

import logging
import math
import re
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

from .file_stamp import file_stamp
from .outcome import Kind
from .throttle import TokenBucket

log = logging.getLogger("mailengine.shaping")

RULES_FILE = "shaping.toml"
DEFAULTS_FILE = Path(__file__).parent / "data" / "shaping_defaults.toml"
MAX_LEARNED = 100_000  # domains whose MX rollup is remembered (forgotten all at once beyond)
ACTIONS = ("suspend", "throttle", "bounce")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION = 365 * 86400.0  # s: the longest suspension, throttle, max_age or retry interval
# the sending sources' keys of the same file, read by sources.py (which imports this module)
SOURCE_KEYS = {"sources", "pools", "sender_pools", "default_pool"}


class ShapingError(ValueError):
    """A rules file that cannot be used; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class Rule:
    """Limits; None = not set here (the next rule in precedence decides)."""
    max_connections: int | None = None
    max_deliveries_per_connection: int | None = None
    max_messages_per_hour: int | None = None
    max_messages_per_minute: int | None = None
    max_connections_per_minute: int | None = None
    max_recipients_per_transaction: int | None = None
    retry_intervals: tuple[float, ...] | None = None  # minutes, as queue.retry_intervals
    max_age: float | None = None  # seconds: soft failures older than this fail for good

    def over(self, *others: "Rule | None") -> "Rule":
        """This rule, its unset keys taken from `others` in order."""
        vals = {}
        for f in fields(self):
            v = getattr(self, f.name)
            for o in others:
                if v is not None:
                    break
                if o is not None:
                    v = getattr(o, f.name)
            vals[f.name] = v
        return Rule(**vals)

    @property
    def own_destination(self) -> bool:
        """A domain rule with limits of its own: the domain is its own destination."""
        return (self.max_connections is not None or self.max_messages_per_hour is not None
                or self.max_messages_per_minute is not None
                or self.max_connections_per_minute is not None)


_RULE_KEYS = {f.name for f in fields(Rule)}
_PROVIDER_KEYS = _RULE_KEYS | {"mx", "domains"}
_REACTION_KEYS = {"provider", "code", "enhanced", "match", "action", "duration", "factor",
                  "recover"}


@dataclass(frozen=True)
class Provider:
    name: str
    mx: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    rule: Rule = Rule()


@dataclass(frozen=True)
class Reaction:
    action: str
    duration: float = 0.0  # seconds
    provider: str = ""     # "" = any provider (never a domain outside every provider)
    code: int | None = None
    enhanced: str = ""     # exact, or a prefix ending in "." ("4.7.")
    match: re.Pattern | None = None
    factor: float = 0.5    # throttle: the limits are multiplied by it
    recover: float = 0.0   # throttle: seconds per step back up (0 = `duration`)
    where: str = ""        # "shaping.toml reaction 2", for the logs

    def matches(self, provider: str | None, code: int, enhanced: str, reply: str) -> bool:
        if provider is None or (self.provider and self.provider != provider):
            return False  # only providers' mail: other destinations behave as without shaping
        if self.code is not None and self.code != code:
            return False
        if self.enhanced and not (enhanced == self.enhanced or (
                self.enhanced.endswith(".") and enhanced.startswith(self.enhanced))):
            return False
        return self.match is None or self.match.search(reply) is not None


@dataclass
class Rules:
    default: Rule = Rule()
    providers: dict[str, Provider] = field(default_factory=dict)
    domains: dict[str, Rule] = field(default_factory=dict)
    reactions: list[Reaction] = field(default_factory=list)
    builtin: bool = True


# ---------------------------------------------------------------- reading and checking a file

def parse_duration(value, where: str) -> float:
    """"90s", "15m", "2h", "3d" or a number of seconds."""
    if isinstance(value, bool):
        raise ShapingError(f"{where}: a duration like \"15m\", \"2h\" or seconds, not {value!r}")
    if isinstance(value, (int, float)):
        secs = float(value)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(value))
        if not m:
            raise ShapingError(f"{where}: a duration like \"90s\", \"15m\", \"2h\" or \"3d\", "
                               f"not {value!r}")
        secs = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if secs <= 0 or not math.isfinite(secs):
        raise ShapingError(f"{where}: must be more than zero, not {value!r}")
    if secs > MAX_DURATION:  # beyond, clock arithmetic overflows; nothing needs that long
        raise ShapingError(f"{where}: at most 365 days, not {value!r}")
    return secs


def _int(value, where: str, lo: int = 1, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (
            hi is not None and value > hi):
        rng = f"from {lo} to {hi}" if hi is not None else f"{lo} or more"
        raise ShapingError(f"{where}: a whole number {rng}, not {value!r}")
    return value


def _unknown(keys: Iterable[str], known: set[str], where: str) -> None:
    for k in keys:
        if k not in known:
            raise ShapingError(f"{where}: unknown key {k!r} (known: {', '.join(sorted(known))})")


def _rule(table, where: str, known: set[str] = _RULE_KEYS) -> Rule:
    if not isinstance(table, dict):
        raise ShapingError(f"{where}: must be a table")
    _unknown(table, known, where)
    vals: dict = {}
    for k, v in table.items():
        at = f"{where} {k}"
        if k in ("mx", "domains"):
            continue
        if k == "retry_intervals":
            if not isinstance(v, list) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool)
                    and 0 <= x <= MAX_DURATION / 60 for x in v):
                raise ShapingError(f"{at}: a list of minutes (numbers from 0 to 525600, a "
                                   f"year), not {v!r}")
            vals[k] = tuple(float(x) for x in v)
        elif k == "max_age":
            vals[k] = parse_duration(v, at)
        elif k == "max_recipients_per_transaction":
            vals[k] = _int(v, at, 1, 1000)
        else:
            vals[k] = _int(v, at)
    return Rule(**vals)


def _names(value, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(x, str) and x.strip() for x in value):
        raise ShapingError(f"{where}: a list of host or domain names, not {value!r}")
    return tuple(x.strip().lower().strip(".") for x in value)


def _reaction(table, where: str, providers: set[str]) -> Reaction:
    if not isinstance(table, dict):
        raise ShapingError(f"{where}: must be a table")
    _unknown(table, _REACTION_KEYS, where)
    action = table.get("action")
    if action not in ACTIONS:
        raise ShapingError(f"{where} action: one of {', '.join(ACTIONS)}, not {action!r}")
    provider = table.get("provider", "")
    if not isinstance(provider, str):
        raise ShapingError(f"{where} provider: the name of one provider, not {provider!r}")
    if provider and provider not in providers:
        raise ShapingError(f"{where} provider: no provider {provider!r} is defined "
                           f"(known: {', '.join(sorted(providers))})")
    code = table.get("code")
    if code is not None:
        code = _int(code, f"{where} code", 200, 599)
    enhanced = table.get("enhanced", "")
    if not isinstance(enhanced, str) or (enhanced and not re.fullmatch(
            r"[245](\.\d{1,3}){0,2}\.?", enhanced)):
        raise ShapingError(f"{where} enhanced: an enhanced status code like \"4.7.28\" or a "
                           f"prefix like \"4.7.\", not {enhanced!r}")
    pattern = table.get("match")
    match = None
    if pattern is not None:
        try:
            match = re.compile(str(pattern), re.IGNORECASE)
        except re.error as e:
            raise ShapingError(f"{where} match: not a regular expression ({e})") from None
    if code is None and not enhanced and match is None:
        raise ShapingError(f"{where}: say which replies it is for (code, enhanced or match)")
    duration = 0.0
    if action != "bounce":
        if "duration" not in table:
            raise ShapingError(f"{where} duration: required for {action}")
        duration = parse_duration(table["duration"], f"{where} duration")
    factor = table.get("factor", 0.5)
    if action == "throttle" and (isinstance(factor, bool) or not isinstance(
            factor, (int, float)) or not 0 < factor < 1):
        raise ShapingError(f"{where} factor: a number between 0 and 1, not {factor!r}")
    recover = parse_duration(table["recover"], f"{where} recover") if "recover" in table else 0.0
    return Reaction(action, duration, provider, code, enhanced, match, float(factor), recover,
                    where)


def parse_rules(text: str, source: str, base: Rules | None = None) -> Rules:
    """The rules of one file, merged over `base` (the shipped defaults): a provider section of
    the file overrides the same keys of the shipped one; the file's reactions come first.
    `builtin = false` at the top drops the shipped rules. Raises ShapingError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ShapingError(f"{source}: not valid TOML: {e}") from None
    _unknown(data, {"builtin", "default", "provider", "domain", "reaction"} | SOURCE_KEYS, source)
    builtin = data.get("builtin", True)
    if not isinstance(builtin, bool):
        raise ShapingError(f"{source} builtin: true or false, not {builtin!r}")
    if not builtin or base is None:
        base = Rules()
    default = _rule(data.get("default", {}), f"{source} [default]").over(base.default)
    providers = dict(base.providers)
    ptables = data.get("provider", {})
    if not isinstance(ptables, dict):
        raise ShapingError(f"{source} provider: must be tables [provider.NAME]")
    for name, table in ptables.items():
        where = f"{source} [provider.{name}]"
        if not _NAME.match(name):
            raise ShapingError(f"{where}: a provider name is lower-case letters, digits, - and _")
        rule = _rule(table, where, _PROVIDER_KEYS)
        old = providers.get(name)
        mx = _names(table["mx"], f"{where} mx") if "mx" in table else (old.mx if old else ())
        doms = (_names(table["domains"], f"{where} domains") if "domains" in table
                else (old.domains if old else ()))
        if not mx and not doms:
            raise ShapingError(f"{where}: say which mail it is: mx = [host name suffixes] "
                               "and/or domains = [...]")
        providers[name] = Provider(name, mx, doms, rule.over(old.rule if old else None))
    domains = dict(base.domains)
    dtables = data.get("domain", {})
    if not isinstance(dtables, dict):
        raise ShapingError(f"{source} domain: must be tables [domain.\"example.com\"]")
    for name, table in dtables.items():
        d = name.strip().lower().strip(".")
        domains[d] = _rule(table, f"{source} [domain.\"{name}\"]").over(domains.get(d))
    rtables = data.get("reaction", [])
    if not isinstance(rtables, list):
        raise ShapingError(f"{source} reaction: must be [[reaction]] tables")
    reactions = [_reaction(t, f"{source} reaction {i + 1}", set(providers))
                 for i, t in enumerate(rtables)]
    return Rules(default, providers, domains, reactions + base.reactions, builtin)


def shipped_rules() -> Rules:
    return parse_rules(DEFAULTS_FILE.read_text(), "shaping_defaults.toml")


# ---------------------------------------------------------------- the live state

@dataclass
class Override:
    """A suspension or a throttle of one destination, with its cause and expiry."""
    dest: str
    action: str        # suspend | throttle
    cause: str         # the reply that started it
    since: float
    until: float
    factor: float = 1.0
    recover: float = 0.0  # seconds per step back up after `until` (throttle)
    rule: str = ""

    def factor_at(self, now: float) -> float:
        """The throttle's factor now: `factor` until `until`, then doubling per step."""
        if now < self.until:
            return self.factor
        steps = 1 + int((now - self.until) // self.recover) if self.recover > 0 else 99
        return min(1.0, self.factor * (2 ** steps))

    def over(self, now: float) -> bool:
        return now >= self.until if self.action == "suspend" else self.factor_at(now) >= 1.0

    def end(self) -> float:
        """The clock time it is over (a throttle: once its last step back up is done)."""
        if self.action == "suspend" or self.recover <= 0:
            return self.until
        return self.until + max(0, math.ceil(math.log2(1 / self.factor)) - 1) * self.recover

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Override":
        """Raises ValueError (or KeyError, TypeError) for a record that is not one."""
        o = cls(str(d["dest"]), str(d["action"]), str(d["cause"]), float(d["since"]),
                float(d["until"]), float(d.get("factor", 1.0)), float(d.get("recover", 0.0)),
                str(d.get("rule", "")))
        if o.action not in ("suspend", "throttle") or not 0 < o.factor <= 1 or not o.dest:
            raise ValueError(f"not a suspension or throttle: {d!r}")
        return o


class Shaping:
    def __init__(self, rules: Rules | None = None, clock: Callable[[], float] = time.time,
                 path: Path | None = None) -> None:
        self.clock = clock
        self.path = path  # HOME/shaping.toml, watched by reload_if_changed
        self._stamp: tuple | None = None
        self.overrides: dict[str, Override] = {}
        self._buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None,
                                       TokenBucket | None]] = {}
        self._learned: dict[str, tuple[tuple[str, ...], str | None]] = {}  # domain->(mx, prov)
        self._factor_seen: dict[str, float] = {}  # dest -> the factor last logged
        # told of each change: (dest, the override now or None, "new" | "longer" | "lifted" |
        # "over"); the I/O (state file, Redis) is the listener's, so this module stays pure
        self.on_change: Callable[[str, Override | None, str], None] | None = None
        self.per_source = 1  # sending sources (sources.py): the limits hold for each of them
        self.use(rules if rules is not None else Rules())

    @classmethod
    def from_home(cls, home: Path | str, clock: Callable[[], float] = time.time) -> "Shaping":
        """The shipped rules with HOME/shaping.toml over them, if there is one. A file that
        cannot be used is logged and the shipped rules alone are used."""
        s = cls(shipped_rules(), clock, Path(home) / RULES_FILE)
        s.reload_if_changed()
        return s

    def use(self, rules: Rules) -> None:
        self.rules = rules
        self._static = {d: p.name for p in rules.providers.values() for d in p.domains}
        self._own = {d for d, r in rules.domains.items() if r.own_destination}
        self._caps: dict[str, int] = {}
        for name, p in rules.providers.items():
            cap = p.rule.over(rules.default).max_connections
            if cap is not None:
                self._caps[name] = cap
        for d in self._own:
            cap = rules.domains[d].over(rules.default).max_connections
            if cap is not None:
                self._caps[d] = cap
        self._default_cap = rules.default.max_connections
        self._any_mx = any(p.mx for p in rules.providers.values())
        self._buckets.clear()
        self._by_domain: dict[str, Rule] = {}  # rule_for_domain's answers (asked per unit)
        # the rollup learnt so far, read again with the new providers
        self._learned = {d: (mx, self.match_mx(mx)) for d, (mx, _) in self._learned.items()}

    def reload_if_changed(self) -> str | None:
        """Read HOME/shaping.toml again when it changed (or appeared, or went). Returns a line
        for the log, or None when nothing changed. A file that cannot be used leaves the rules
        as they were, with an error logged."""
        if self.path is None:
            return None
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return None
        first = not hasattr(self, "_loaded")
        self._loaded = True
        self._stamp = stamp
        base = shipped_rules()
        if stamp is None:
            self.use(base)
            line = (None if first else
                    f"{self.path} removed: traffic shaping uses the shipped rules alone")
        else:
            try:
                rules = parse_rules(self.path.read_text(), str(self.path), base)
            except Exception as e:  # ShapingError, OSError...: a bad file never stops delivery
                if not isinstance(e, (ShapingError, OSError, UnicodeDecodeError)):
                    e = ShapingError(f"{self.path}: cannot be used ({type(e).__name__}: {e})")
                line = (f"{e}; " + ("the shipped rules are used alone" if first else
                                    "the rules in force stay as they were"))
                log.error("%s", line)
                return line
            self.use(rules)
            line = (f"traffic shaping rules read from {self.path}: {len(rules.providers)} "
                    f"providers, {len(rules.domains)} domains, {len(rules.reactions)} reactions")
        if line:
            log.info("%s", line)
        return line

    # -- who a destination is ------------------------------------------------------------------

    def match_mx(self, hosts: Iterable[str]) -> str | None:
        """The provider whose MX suffixes match every one of these MX host names. One match
        among others (a company's own server with a Google backup MX) is no match: that
        domain's mail goes to its own server, not to the provider."""
        found = None
        for h in hosts:
            h = h.lower().rstrip(".")
            name = next((p.name for p in self.rules.providers.values()
                         if any(h == s or h.endswith("." + s) for s in p.mx)), None)
            if name is None or (found is not None and name != found):
                return None
            found = name
        return found

    def provider_of(self, domain: str) -> str | None:
        if domain in self._own:
            return None
        p = self._static.get(domain)
        if p is None:
            hit = self._learned.get(domain)
            p = hit[1] if hit is not None else None
        return p

    def known(self, dest: str) -> bool:
        """Whether `dest` (a scheduler destination) is known to be a provider or not one.
        False for a domain whose MX hosts were never looked at while providers are named by
        their MX hosts: delivery looks them up before any of its units starts, so a provider's
        limits hold from its domains' first message on."""
        return (not self._any_mx or dest in self._learned or dest in self._static
                or dest in self.rules.providers or dest in self._own)

    def dest(self, domain: str) -> str:
        """The scheduler's destination for a domain: its provider when known, else itself."""
        return self.provider_of(domain) or domain

    def learn(self, domain: str, mx_hosts: Iterable[str]) -> str | None:
        """Delivery resolved `domain`'s MX hosts (none: the lookup failed). Returns the provider
        when the domain has just joined it (its waiting mail should move to the provider's
        queue), else None."""
        if domain in self._own or domain in self._static:
            return None
        mx = tuple(mx_hosts)
        hit = self._learned.get(domain)
        if hit is not None and hit[0] == mx:
            return None
        p = self.match_mx(mx)
        if len(self._learned) >= MAX_LEARNED:
            self._learned.clear()
        self._learned[domain] = (mx, p)
        self._by_domain.pop(domain, None)
        if p is not None and (hit is None or hit[1] != p):
            log.info("%s: its mail servers (%s) are %s's: it shares %s's limits", domain,
                     ", ".join(mx[:3]), p, p)
            return p
        return None

    # -- the rules in force ------------------------------------------------------------------

    def rule_for_dest(self, dest: str) -> Rule:
        r = self.rules
        p = r.providers.get(dest)
        if p is not None:
            return p.rule.over(r.default)
        return r.domains[dest].over(r.default) if dest in r.domains else r.default

    def rule_for_domain(self, domain: str) -> Rule:
        """domain > provider > default."""
        rule = self._by_domain.get(domain)
        if rule is None:
            r = self.rules
            p = self.provider_of(domain)
            rule = (r.domains.get(domain) or Rule()).over(
                r.providers[p].rule if p else None, r.default)
            if len(self._by_domain) >= MAX_LEARNED:
                self._by_domain.clear()
            self._by_domain[domain] = rule
        return rule

    def set_per_source(self, n: int) -> None:
        """`n` sending sources (sources.py). Providers count per client IP, so the limits hold
        per source (sources.py keeps those) and the destination as a whole may use n times
        them: its connections and message rates here."""
        n = max(1, n)
        if n != self.per_source:
            self.per_source = n
            self._buckets.clear()

    def cap(self, dest: str) -> int | None:
        """`dest`'s max_connections (times the sources), or None."""
        cap = self._caps.get(dest, self._default_cap)
        return None if cap is None else cap * self.per_source

    def limit(self, dest: str, base: int) -> int:
        """`dest`'s concurrency now: its window (`base`) within its max_connections, times a
        throttle's factor; 0 while it is suspended."""
        cap = self.cap(dest)
        lim = base if cap is None else min(base, cap)
        o = self.overrides.get(dest)
        if o is None:
            return lim
        now = self.clock()
        if o.action == "suspend":
            return 0 if now < o.until else lim
        return max(1, int(lim * o.factor_at(now)))

    def _factor(self, dest: str) -> float:
        o = self.overrides.get(dest)
        if o is None or o.action != "throttle":
            return 1.0
        return o.factor_at(self.clock())

    def rate_delay(self, dest: str) -> float:
        """Take one message from `dest`'s message rates; seconds to wait before sending it."""
        return self._take(dest, 0, 1)

    def connect_delay(self, dest: str) -> float:
        """Take one new connection from `dest`'s connection rate; seconds to wait first."""
        return self._take(dest, 2, 2)

    def _take(self, dest: str, first: int, last: int) -> float:
        b = self._buckets.get(dest)
        if b is None:
            rule = self.rule_for_dest(dest)
            b = self._buckets[dest] = (
                self._bucket(rule.max_messages_per_minute, 60.0),
                self._bucket(rule.max_messages_per_hour, 3600.0),
                self._bucket(rule.max_connections_per_minute, 60.0))
            if len(self._buckets) > MAX_LEARNED:
                self._buckets.clear()
        f = self._factor(dest)
        wait = 0.0
        for bucket in b[first:last + 1]:
            if bucket is not None:
                bucket.rate = bucket.full * f
                wait = max(wait, bucket.wait(1))
        return wait

    def rates(self, dest: str, connections: bool) -> list[tuple[str, float, float, float]]:
        """`dest`'s message rates (or its connection rate) now, a throttle's factor applied:
        [(name, rate, per seconds, burst)], for buckets kept elsewhere (shared_shaping.py)."""
        rule, f = self.rule_for_dest(dest), self._factor(dest)
        rates = ([("conn/m", rule.max_connections_per_minute, 60.0)] if connections else
                 [("msg/m", rule.max_messages_per_minute, 60.0),
                  ("msg/h", rule.max_messages_per_hour, 3600.0)])
        return [(f"{dest}:{name}", rate * f, per, burst(rate, per))
                for name, rate, per in rates if rate]

    def _bucket(self, rate: int | None, per: float) -> TokenBucket | None:
        if not rate:
            return None
        rate *= self.per_source
        b = TokenBucket(rate, per, burst(rate, per), clock=self.clock)
        b.full = rate
        return b

    def retry_plan(self, domains: Iterable[str], intervals: list[float]) -> list[float]:
        """The retry intervals (minutes) for a message whose recipients left are at `domains`:
        their rules' `retry_intervals` when they all agree (else `intervals`,
        queue.retry_intervals), cut at the rules' `max_age` (the retries that would come after
        it are dropped, counting from the first attempt, so the recipient fails for good when
        it is reached)."""
        plans = {(r.retry_intervals, r.max_age) for r in map(self.rule_for_domain, set(domains))}
        if len(plans) != 1:
            return intervals
        (mine, max_age), = plans
        if mine is None and max_age is None:
            return intervals
        plan = list(mine) if mine is not None else list(intervals)
        if max_age is None:
            return plan
        out, total = [], 0.0
        for gap in plan:
            total += gap * 60
            if total > max_age:
                break
            out.append(gap)
        return out or [0]

    # -- reactions ---------------------------------------------------------------------------

    def react(self, dest: str, outcomes: Iterable) -> set[str]:
        """One unit's outcomes (RcptOutcome) for `dest`: every reply that matches a reaction
        rule acts; returns the recipients to fail for good (`bounce`)."""
        provider = dest if dest in self.rules.providers else None
        bounce: set[str] = set()
        seen: dict[str, Reaction | None] = {}
        for o in outcomes:
            if o.kind is Kind.SENT or not o.code or o.stage in ("dns", "local"):
                continue  # our own lookups and errors are not the provider speaking
            reply = o.reply
            if reply not in seen:
                seen[reply] = next((r for r in self.rules.reactions
                                    if r.matches(provider, o.code, o.enhanced, reply)), None)
                if seen[reply] is not None and seen[reply].action != "bounce":
                    self._act(dest, seen[reply], reply)
            r = seen[reply]
            if r is not None and r.action == "bounce" and o.kind is not Kind.HARD:
                bounce.add(o.address)
        if bounce:
            log.info("%s: %d recipients failed for good by a traffic shaping rule", dest,
                     len(bounce))
        return bounce

    def _act(self, dest: str, r: Reaction, reply: str) -> None:
        now = self.clock()
        until = now + r.duration
        o = self.overrides.get(dest)
        if o is not None and o.over(now):
            o = None
        if r.action == "suspend":
            if o is not None and o.action == "suspend":
                o.until = max(o.until, until)  # units still running say it again: no new line
                self._tell(dest, o, "longer")
                return
            o = self.overrides[dest] = Override(dest, "suspend", reply, now, until, rule=r.where)
            log.warning("%s suspended until %s: %s (%s)", dest, _when(until), reply, r.where)
            self._tell(dest, o, "new")
            return
        if o is not None and o.action == "suspend" and now < o.until:
            return  # suspended already: the stronger one stands
        factor = r.factor if o is None else min(o.factor_at(now), r.factor)
        if o is not None and now < o.until and o.factor <= factor:
            o.until = max(o.until, until)  # the same trouble again: it lasts longer, quietly
            self._tell(dest, o, "longer")
            return
        o = self.overrides[dest] = Override(dest, "throttle", reply, now, until, factor,
                                            r.recover or r.duration, r.where)
        self._factor_seen[dest] = factor
        log.warning("%s throttled to %g of its limits until %s, then back step by step: %s (%s)",
                    dest, factor, _when(until), reply, r.where)
        self._tell(dest, o, "new")

    def _tell(self, dest: str, o: Override | None, what: str) -> None:
        if self.on_change is not None:
            self.on_change(dest, o, what)

    def lift(self, dest: str) -> Override | None:
        """Lift a suspension or throttle by hand; the override lifted, or None."""
        o = self.overrides.pop(dest, None)
        self._factor_seen.pop(dest, None)
        if o is not None:
            log.warning("%s: %s lifted by hand (it was for: %s)", dest, o.action, o.cause)
            self._tell(dest, o, "lifted")
        return o

    def adopt(self, o: Override, source: str) -> bool:
        """A suspension or throttle from elsewhere (`source`: "another engine", "before the
        restart"): in force here too, unless it is over or a suspension in force here stands
        over it (a suspension beats a throttle; of two suspensions the longer holds). Not told
        to `on_change` (it came from there). True when the destination's limits changed."""
        now = self.clock()
        if o.over(now):
            return False
        mine = self.overrides.get(o.dest)
        if mine is not None and mine.over(now):
            mine = None
        if mine is not None and mine.action == "suspend":
            if o.action == "suspend" and o.until > mine.until:
                mine.until = o.until
            return False
        if mine is not None and (mine.action, mine.cause, mine.until, mine.factor) == (
                o.action, o.cause, o.until, o.factor):
            return False  # the same one (it came back from Redis)
        self.overrides[o.dest] = o
        self._factor_seen[o.dest] = o.factor_at(now)
        if o.action == "suspend":
            log.warning("%s suspended until %s (%s): %s", o.dest, _when(o.until), source,
                        o.cause)
        else:
            log.warning("%s throttled to %g of its limits until %s (%s): %s", o.dest,
                        o.factor_at(now), _when(o.until), source, o.cause)
        return True

    def lifted_elsewhere(self, dest: str, at: float) -> Override | None:
        """Another engine lifted `dest`'s override by hand at `at`: so is ours, unless it began
        after that (new trouble). The override lifted, or None."""
        o = self.overrides.get(dest)
        if o is None or o.since > at:
            return None
        del self.overrides[dest]
        self._factor_seen.pop(dest, None)
        log.warning("%s: %s lifted by hand on another engine (it was for: %s)", dest, o.action,
                    o.cause)
        return o

    def tick(self) -> list[str]:
        """Expire what is over and log each step back up; returns the destinations whose limits
        grew (the scheduler looks at them again)."""
        if not self.overrides:
            return []
        now = self.clock()
        grew = []
        for dest, o in list(self.overrides.items()):
            if o.over(now):
                del self.overrides[dest]
                self._factor_seen.pop(dest, None)
                log.info("%s: %s over, its limits are whole again (it was for: %s)", dest,
                         "suspension" if o.action == "suspend" else "throttle", o.cause)
                grew.append(dest)
                self._tell(dest, None, "over")
            elif o.action == "throttle":
                f = o.factor_at(now)
                if f > self._factor_seen.get(dest, f):
                    log.info("%s: throttle eased to %g of its limits", dest, f)
                    grew.append(dest)
                self._factor_seen[dest] = f
        return grew

    def next_change(self) -> float | None:
        """The clock time of the next expiry or step up, or None."""
        now = self.clock()
        times = []
        for o in self.overrides.values():
            if now < o.until or o.recover <= 0:
                times.append(o.until)
            else:
                times.append(o.until + (1 + int((now - o.until) // o.recover)) * o.recover)
        return min(times) if times else None

    def explain(self, domain_or_dest: str) -> tuple[str, str] | None:
        """(state, why) when a suspension or throttle holds this domain (or its provider)
        back now, for the web admin's destinations; else None."""
        dest = self.dest(domain_or_dest)
        o = self.overrides.get(dest)
        if o is None or o.over(self.clock()):
            return None
        now = self.clock()
        a = {"dest": o.dest, "action": o.action, "cause": o.cause, "rule": o.rule,
             "since": o.since, "until": o.until,
             "factor": 0.0 if o.action == "suspend" else o.factor_at(now),
             "recovering": o.action == "throttle" and now >= o.until}
        return ("suspended" if o.action == "suspend" else "throttled",
                "traffic shaping: " + describe([a], now)[0])

    def active(self) -> list[dict]:
        """Every suspension and throttle in force, for `status`, the API and /metrics."""
        now = self.clock()
        out = []
        for o in sorted(self.overrides.values(), key=lambda o: o.dest):
            if o.over(now):
                continue
            out.append({"dest": o.dest, "action": o.action, "cause": o.cause, "rule": o.rule,
                        "since": o.since, "until": o.until,
                        "factor": 0.0 if o.action == "suspend" else o.factor_at(now),
                        "recovering": o.action == "throttle" and now >= o.until})
        return out


def burst(rate: float, per: float) -> float:
    """A rate's burst: a minute's worth of an hourly rate may go at once; a few seconds' of a
    per-minute one."""
    return max(1.0, rate / (60 if per > 60 else 20))


def _when(t: float) -> str:
    return time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(t))


def describe(active: list[dict], now: float | None = None) -> list[str]:
    """Lines for `mailengine status`: one per suspension or throttle in force."""
    now = time.time() if now is None else now
    lines = []
    for a in active:
        left = max(0, int(a["until"] - now))
        if a["action"] == "suspend":
            what = f"SUSPENDED for {left // 60}m {left % 60}s more"
        elif a["recovering"]:
            what = f"throttled to {a['factor']:g}, coming back step by step"
        else:
            what = f"throttled to {a['factor']:g} for {left // 60}m {left % 60}s more"
        lines.append(f"{a['dest']}: {what} (until {_when(a['until'])}); cause: {a['cause']}")
    return lines
