"""Every setting of MailEngine: its section, key, default, type, limits and documentation.

This table is the one place where settings live (SPEC section 3). The config loader, the generated
commented `mailengine.toml`, the CLI's `config show/set` and the web admin all read it, so a
setting added here appears everywhere with the same validation.
"""
from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "mailengine.toml"


from .home import resolve_home  # noqa: F401  (config.resolve_home for the commands)
from .setting import DELIVERY, INTAKE, Setting  # noqa: E402  (the record type; its table below)
from .webhooks import TYPES as WEBHOOK_TYPES  # noqa: E402
from .webhooks import check_types as _check_webhook_types  # noqa: E402
from .webhooks import check_urls as _check_webhook_urls  # noqa: E402


class ConfigError(ValueError):
    """A setting has a value it may not have; the message names key, value and what is allowed."""


def _check_addresses(values: list[str]) -> str | None:
    for v in values:
        if v == "0":
            continue
        try:
            parse_address_range(v)
        except ValueError:
            return f"{v!r} is not an IP address, a CIDR network or a range a.b.c.d-a.b.c.e"
    return None


def _check_dns_bypass(values: list[str]) -> str | None:
    for v in values:
        parts = [p.strip() for p in v.split(",")]
        if len(parts) != 4 or parts[2].upper() not in ("MX", "NS"):
            return f"{v!r} must be 'domain,hostname,MX|NS,ip' (ip may be ip:port)"
        try:
            split_host_port(parts[3], 25)
        except ValueError:
            return f"{v!r}: {parts[3]!r} is not an IP address or ip:port"
    return None


def _check_nameservers(values: list[str]) -> str | None:
    for v in values:
        try:
            split_host_port(v, 53)
        except ValueError:
            return f"{v!r} is not an IP address or ip:port"
    return None


def _check_reports(value: str) -> str | None:
    if value not in ("", "e", "f", "l", "x"):
        return "must be one of '', 'e', 'f', 'l', 'x'"
    return None


def _check_rcpt_relay_domains(values: list[str]) -> str | None:
    for v in values:
        if not v.startswith("@") or len(v) < 3:
            return f"{v!r} must look like '@example.com'"
    return None


def _check_web_ip(value: str) -> str | None:
    if value in ("", "0"):
        return None
    return _check_addresses([value])



# [unsubscribe] (unsubscribe.py)
def _is_domain(value: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+\.?", value.strip()) is not None


def _check_unsub_domains(values: list[str]) -> str | None:
    bad = [v for v in values if v != "*" and not _is_domain(v)]
    return f"not domain names: {bad}" if bad else None


def _check_unsub_url(value: str) -> str | None:
    if value and not (value.startswith(("https://", "http://")) and value.isascii()
                      and value.isprintable() and not any(c in value for c in " <>,?#\"")):
        return "must be an http(s) URL without spaces, <>, commas, ? or # (https for Gmail)"
    return None


def _check_unsub_listen(value: str) -> str | None:
    if not value:
        return None
    try:
        split_host_port(value, 443)
    except ValueError:
        return f"{value!r} is not ip:port"
    return None


SETTINGS: list[Setting] = [
    # basic (基本設定)
    Setting("basic", "nameservers", [], "list[str]",
            "Recursive DNS resolvers to ask, 'ip' or 'ip:port'. Empty: the system's resolvers.",
            check=_check_nameservers, restart=True, scope=DELIVERY),
    Setting("basic", "dns_servers", [], "list[str]",
            "DNS bypass entries 'domain,hostname,MX|NS,ip'. MX pins a domain's mail host to an IP "
            "(ip:port allowed: a smart host); NS sends that domain's lookups to a given name server.",
            check=_check_dns_bypass, comma_entries=True, scope=DELIVERY),
    Setting("basic", "preload_domains", [], "list[str]",
            "Domains whose mail servers are looked up at start-up.", restart=True, scope=DELIVERY),
    Setting("basic", "local_domains", [], "list[str]",
            "Domains received as local mail (stored in mailq/incoming when save_incoming, else "
            "accepted and discarded). '.' or '@' makes every recipient local."),
    Setting("basic", "admin_email", "", "str",
            "One address notified of problems such as low disk space.", scope=DELIVERY),
    Setting("basic", "min_free_disk_mb", 100, "float",
            "Below this many MB free on the queue's file system, new mail is refused with "
            "'452 4.3.1' and admin_email is told, until space returns. 0 = no check.",
            minimum=0),
    Setting("basic", "pid_file", "", "str",
            "Pid file of the background daemon (-bd). Empty: HOME/mailengine.pid.", restart=True,
            scope=DELIVERY),
    Setting("basic", "group_readable", False, "bool",
            "Let the engine's group read the queue (mailq/) and the logs (log/): directories "
            "0750, new files 0640. False: the engine's user only (0700, 0600).", restart=True),
    # network (TCP/IP とポート)
    Setting("network", "helo_text", "", "str",
            "Name sent in HELO/EHLO and the SMTP greeting. Empty: the host's fully qualified "
            "name (a warning at start when it has none)."),
    Setting("network", "smtp_listen_ips", [], "list[str]",
            "Addresses and ranges (a.b.c.d-a.b.c.e) to accept SMTP on, IPv4 or IPv6. Empty: all.",
            check=_check_addresses, restart=True, scope=INTAKE),
    Setting("network", "smtp_port", 25, "int",
            "SMTP port. 1 disables SMTP intake.", minimum=1, restart=True,
            check=lambda v: None if v <= 65535 else "must be at most 65535", scope=INTAKE),
    Setting("network", "smtp_source_ip", "", "str",
            "One local address for outbound connections. Empty: the operating system chooses.",
            check=lambda v: None if not v else _check_addresses([v]), scope=DELIVERY),
    Setting("network", "web_ip", "127.0.0.1", "str",
            "The client address (or network, or range) allowed to use the web admin; a "
            "loopback one also binds the port on loopback only (where it listens is decided at "
            "start; who may use it, at once). Empty: any. '0' disables it.",
            check=_check_web_ip, scope=DELIVERY),
    Setting("network", "web_port", 81, "int",
            "Web admin port. 0 disables it.", minimum=0, restart=True,
            check=lambda v: None if v <= 65535 else "must be at most 65535", scope=DELIVERY),
    Setting("network", "web_tls", False, "bool",
            "Serve the web admin, the API and /metrics over HTTPS, with tls_cert and tls_key (or "
            "the self-signed pair); its cookies are then sent over HTTPS only.", restart=True,
            scope=DELIVERY),
    Setting("network", "tls_cert", "", "str",
            "PEM certificate for STARTTLS. Empty: a self-signed pair is made in HOME/tls/ on first "
            "start.", restart=True),
    Setting("network", "tls_key", "", "str",
            "PEM private key for tls_cert.", restart=True),
    Setting("network", "intake_workers", 0, "int",
            "Processes accepting SMTP on the same port (SO_REUSEPORT), so intake uses several "
            "cores; max_inbound_connections counts the sessions of all of them together. "
            "0 = one per CPU core. "
            "With 2 or more, the engine process itself takes no SMTP and only delivers.",
            minimum=0, restart=True, check=lambda v: None if v <= 64 else "must be at most 64"),
    Setting("network", "delivery_processes", 0, "int",
            "Processes running the outbound SMTP sessions, so delivery uses several cores; the "
            "engine process still decides what goes where and when, and counts every limit for "
            "all of them together. 1 = the engine process runs them itself. 0 = one per four "
            "CPU cores, at least 2 (1 on a single core).",
            minimum=0, restart=True, scope=DELIVERY,
            check=lambda v: None if v <= 64 else "must be at most 64"),
    # policy (許可と制限)
    Setting("policy", "rcpt_relay_domains", [], "list[str]",
            "'@example.com' entries: accept and relay mail for these domains from anyone (backup "
            "MX).", check=_check_rcpt_relay_domains, scope=INTAKE),
    Setting("policy", "relay_ips", ["127.0.0.1"], "list[str]",
            "Client addresses and ranges allowed to relay. '0' = everyone (an open relay).",
            check=_check_addresses, scope=INTAKE),
    Setting("policy", "refused_mail_from", [], "list[str]",
            "Substrings: MAIL FROM containing one is refused.", scope=INTAKE),
    Setting("policy", "refused_mail_servers", [], "list[str]",
            "IP addresses never delivered to. The engine's own SMTP addresses never are (mail "
            "for them 'loops back to myself'); list here others that reach it, as a NAT's.",
            check=_check_addresses, scope=DELIVERY),
    # queue (キュー)
    Setting("queue", "dsn", False, "bool",
            "After the last retry fails, send a delivery status notification to MAIL FROM.",
            scope=DELIVERY),
    Setting("queue", "queue_check_interval", 600, "float",
            "Seconds between scans of mailq/retry for dropped-in mail; at most the shortest retry "
            "interval.", minimum=0.1, scope=DELIVERY),
    Setting("queue", "pause_sending", False, "bool",
            "Stop all outbound SMTP; mail waits in mailq/retry until this is turned off."),
    Setting("queue", "relay_via_disk", True, "bool",
            "Write relayed mail to disk (fsync) before acknowledging it, so a crash or power loss "
            "loses nothing. False = memory mode, as the old product's default."),
    Setting("queue", "save_done", False, "bool", "Keep finished mail in mailq/done.",
            scope=DELIVERY),
    Setting("queue", "done_retention_minutes", 60, "float",
            "Minutes finished mail stays in mailq/done. 0 = forever.", minimum=0, scope=DELIVERY),
    Setting("queue", "save_incoming", False, "bool", "Keep local mail in mailq/incoming."),
    Setting("queue", "incoming_retention_minutes", 60, "float",
            "Minutes local mail stays in mailq/incoming. 0 = forever.", minimum=0, scope=DELIVERY),
    Setting("queue", "retry_intervals", [30, 120, 240, 480, 960], "list[float]",
            "Minutes between retries (fractions allowed). [0] or [] = no retries.",
            check=lambda v: None if all(x >= 0 for x in v) else "intervals may not be negative",
            scope=DELIVERY),
    # logging (ログ)
    Setting("logging", "bounce_host", "", "str",
            "When set, outbound MAIL FROM becomes mailengine-bounce-USER%DOMAIN@bounce_host (VERP); "
            "it must be a local domain."),
    Setting("logging", "log_retention_days", 10, "int",
            "Days of daily log files kept in log/. 0 = no log files.", minimum=0),
    Setting("logging", "log_undeliverable", True, "bool",
            "Append failed addresses to hard-undeliverable.txt / soft-undeliverable.txt.",
            scope=DELIVERY),
    Setting("logging", "stats_interval", 10, "float",
            "Seconds between console statistics lines (printed only when mail moved). 0 = off.",
            minimum=0, scope=DELIVERY),
    # unsubscribe: one-click unsubscribe (unsubscribe.py, unsubscribe_web.py; issue 18 item 4)
    Setting("unsubscribe", "sender_domains", [], "list[str]",
            "Envelope sender (MAIL FROM) domains whose mail gets List-Unsubscribe and "
            "List-Unsubscribe-Post fields naming each recipient (one transaction per recipient); "
            "\"*\" = every sender. Empty: off.", check=_check_unsub_domains, scope=DELIVERY),
    Setting("unsubscribe", "url_base", "", "str",
            "The public URL of the unsubscribe listener, e.g. https://unsub.example.com: links "
            "are URL_BASE/u/TOKEN. Empty: no link, no one-click (mailto only).",
            check=_check_unsub_url, scope=DELIVERY),
    Setting("unsubscribe", "mailto_domain", "", "str",
            "Domain of the mailto address unsubscribe+TOKEN@DOMAIN (its MX must be this engine: "
            "mail to it unsubscribes, and is not relayed). Empty: no mailto.",
            check=lambda v: None if not v or _is_domain(v) else "must be a domain name"),
    Setting("unsubscribe", "listen", "", "str",
            "ip:port where the public unsubscribe listener answers (no login; separate from "
            "the web admin). Empty: no listener.", check=_check_unsub_listen, restart=True,
            scope=DELIVERY),
    Setting("unsubscribe", "listen_tls", False, "bool",
            "The listener speaks HTTPS with network.tls_cert / tls_key (else plain HTTP behind "
            "a TLS proxy).", restart=True, scope=DELIVERY),
    # limits (制限)
    Setting("limits", "smtp_receive_timeout", 600, "float",
            "Seconds an idle inbound session may wait before it is dropped.", minimum=5,
            scope=INTAKE),
    Setting("limits", "smtp_connect_timeout", 240, "float",
            "Seconds for an outbound connect.", minimum=5, scope=DELIVERY),
    Setting("limits", "smtp_write_timeout", 240, "float",
            "Seconds for an outbound write.", minimum=5, scope=DELIVERY),
    Setting("limits", "smtp_body_timeout", 600, "float",
            "Seconds to wait for the reply after the message body.", minimum=5, scope=DELIVERY),
    Setting("limits", "smtp_read_timeout", 240, "float",
            "Seconds for an outbound read.", minimum=5, scope=DELIVERY),
    Setting("limits", "max_connections_per_host", 10, "int",
            "Parallel outbound connections to one remote server.", minimum=1, scope=DELIVERY),
    Setting("limits", "messages_in_memory", 20000, "int",
            "Queued messages held in memory (Postfix's qmgr_message_active_limit). The rest wait "
            "on disk only, about 200 bytes of memory each, and are loaded when they are due; "
            "when memory is full, messages waiting for a later retry make room for due ones. "
            "The manual's default was 500000 (about 1.5 GB).", minimum=1, scope=DELIVERY),
    Setting("limits", "max_send_rate", 0, "int",
            "Messages per hour at most. 0 = unlimited.", minimum=0, scope=DELIVERY),
    Setting("limits", "inbound_priority_ips", [], "list[str]",
            "Addresses and ranges exempt from max_inbound_connections. '0' = everyone.",
            check=_check_addresses, scope=INTAKE),
    Setting("limits", "max_message_size", 10485760, "int",
            "Largest message in bytes, advertised as ESMTP SIZE and enforced. 0 = no limit.",
            minimum=1024, zero_ok=True, scope=INTAKE),
    Setting("limits", "max_outbound_connections", 500, "int",
            "Parallel outbound SMTP connections.", minimum=1, scope=DELIVERY),
    Setting("limits", "max_queue_memory_kb", 2000000, "int",
            "KiB of memory for queued mail; beyond it, new mail is offloaded to disk.",
            minimum=1000, scope=DELIVERY),
    Setting("limits", "max_bandwidth", 0, "int",
            "Outbound bytes per minute at most. 0 = unlimited.", minimum=0, scope=DELIVERY),
    Setting("limits", "max_inbound_connections", 1000, "int",
            "Parallel inbound SMTP sessions; more get '421 4.7.0'.", minimum=1, scope=INTAKE),
    Setting("limits", "max_recipients", 1000, "int",
            "Recipients accepted per message; more get '452 4.5.3'.", minimum=1, scope=INTAKE),
    Setting("limits", "max_command_line", 2048, "int",
            "Longest SMTP command line in bytes (RFC 5321 says at least 512).", minimum=512,
            scope=INTAKE),
    Setting("limits", "max_errors", 20, "int",
            "Protocol errors in one session before '421' and disconnect.", minimum=1, scope=INTAKE),
    Setting("limits", "max_hops", 50, "int",
            "Received: header fields a message may carry; with more it is a mail loop and is "
            "refused after DATA with '554 5.4.6 Too many hops' (Postfix's hopcount_limit). "
            "0 = no limit.", minimum=0, scope=INTAKE),
    Setting("limits", "smtp_command_deadline", 300, "float",
            "Seconds a client has to send one whole command line, counted from its first byte "
            "(bytes trickled in do not extend it); also the grace a message has before "
            "smtp_min_data_rate counts. Beyond it: '421 4.4.2' and disconnect.", minimum=1,
            scope=INTAKE),
    Setting("limits", "smtp_min_data_rate", 500, "int",
            "Bytes per second a message (DATA, BDAT) must keep up after the grace of "
            "smtp_command_deadline (each byte buys 1/rate s, at most that grace ahead); slower "
            "gets '421 4.4.2' and disconnect. 0 = no minimum.", minimum=0, scope=INTAKE),
    Setting("limits", "max_connections_per_ip", 50, "int",
            "Parallel inbound SMTP sessions from one client address; more get '421 4.7.0' at the "
            "greeting. All intake processes together, like max_inbound_connections. "
            "relay_ips and inbound_priority_ips are exempt. 0 = no limit.", minimum=0,
            scope=INTAKE),
    Setting("limits", "max_intake_memory_mb", 512, "int",
            "MB that the inbound sessions of one intake process may buffer together (messages "
            "being received or stored); the session that would go beyond it gets "
            "'452 4.3.1' for its message and its bytes are dropped.", minimum=1, scope=INTAKE),
    Setting("limits", "max_auth_checks", 16, "int",
            "SMTP AUTH password checks waiting or running at once in one intake process (they "
            "run off the event loop, two at a time); more get '454 4.7.0'.", minimum=1,
            scope=INTAKE),
    # debug (トラブルシューティング)
    Setting("debug", "dns", False, "bool", "Trace DNS lookups on the console.", scope=DELIVERY),
    Setting("debug", "smtp_out", False, "bool", "Trace outbound SMTP sessions on the console.",
            scope=DELIVERY),
    Setting("debug", "smtp_in", False, "bool", "Trace inbound SMTP sessions on the console.",
            scope=INTAKE),
    Setting("debug", "program", False, "bool", "Trace the program's internal steps.",
            scope=DELIVERY),
    Setting("debug", "send_loop", False, "bool", "Trace the delivery loop.", scope=DELIVERY),
    Setting("debug", "queue_size", True, "bool", "Log the number of queued messages.",
            scope=DELIVERY),
    Setting("debug", "queue_memory", True, "bool", "Log the memory used by queued mail.",
            scope=DELIVERY),
    # reports (配信レポート)
    Setting("reports", "delivery_reports", "", "str",
            "Delivery reports: 'e' after every attempt, 'f' after the first, 'l' after the last, "
            "'x' first and last. Empty: none.", check=_check_reports, scope=DELIVERY),
    Setting("reports", "recipients", [], "list[str]", "Who gets delivery reports.", scope=DELIVERY),
    Setting("reports", "domains", [], "list[str]",
            "Only failed addresses containing one of these substrings are reported. Empty: all.",
            scope=DELIVERY),
    # complaints (苦情: feedback loops; complaints.py, complaint_rates.py)
    Setting("complaints", "addresses", [], "list[str]",
            "Addresses registered with the mailbox providers' feedback loops (Yahoo CFL, "
            "Microsoft JMRP...): mail to them is taken from anyone as a complaint report (ARF), "
            "never relayed; the complained-about recipient is suppressed and logged.",
            check=lambda v: next((f"{a!r} is not an address" for a in v
                                  if "@" not in a.strip("@")), None), scope=INTAKE),
    Setting("complaints", "suppress_all_senders", False, "bool",
            "A complaint suppresses the recipient for every sender domain. False: only for "
            "the domain of the mail complained about.", scope=INTAKE),
    Setting("complaints", "trust_unsigned", False, "bool",
            "Also suppress complaints matched by VERP or Original-Rcpt-To, not only by the "
            "signed token of List-Unsubscribe. Those are not signed: anyone who can mail the "
            "complaint address could then suppress any address. Turn it on only when the "
            "complaint address takes mail from the feedback loops alone.", scope=INTAKE),
    Setting("complaints", "rate_threshold_percent", 0.3, "float",
            "Complaint rate (complaints per delivered recipient, per sender domain) above which "
            "the web admin flags a domain; Gmail and Yahoo require senders to stay under 0.3 %.",
            minimum=0, scope=DELIVERY),
    # webhooks (webhooks.py: events posted to the operator's URLs)
    Setting("webhooks", "urls", [], "list[str]",
            "URLs that every delivery and reputation event is POSTed to as JSON, each with its own "
            "progress (HOME/webhooks.db keeps events until each URL answers 2xx). Empty: off.",
            check=_check_webhook_urls),
    Setting("webhooks", "secret", "", "str",
            "Key of the HMAC-SHA256 signature in X-MailEngine-Signature. Empty: unsigned "
            "(a warning at start).", scope=DELIVERY, secret=True),
    Setting("webhooks", "events", list(WEBHOOK_TYPES), "list[str]",
            "Event types posted: delivered, deferred, bounced, complained, unsubscribed, "
            "suppressed.", check=_check_webhook_types),
    Setting("webhooks", "batch_size", 100, "int",
            "Events per POST at most.", minimum=1,
            check=lambda v: None if v <= 10000 else "must be at most 10000", scope=DELIVERY),
    Setting("webhooks", "batch_wait", 1.0, "float",
            "Seconds an event waits for others to fill a batch before it is posted anyway.",
            minimum=0, scope=DELIVERY),
    Setting("webhooks", "timeout", 10.0, "float",
            "Seconds a receiver has to answer a POST; then it is a failure, retried.",
            minimum=0.1, scope=DELIVERY),
    Setting("webhooks", "retry_max_seconds", 300.0, "float",
            "Longest wait between two tries of a failing URL (waits double from 1 s).",
            minimum=0.1, scope=DELIVERY),
    Setting("webhooks", "max_age_hours", 72.0, "float",
            "Events not acknowledged this many hours after they happened are dropped, with a "
            "warning. 0 = kept until acknowledged.", minimum=0.0001, zero_ok=True,
            scope=DELIVERY),
]

SECTION_TITLES = {
    "basic": "Basic settings",
    "network": "TCP/IP and ports",
    "policy": "Permissions and relaying",
    "queue": "Queue",
    "logging": "Logs",
    "limits": "Limits",
    "debug": "Troubleshooting",
    "reports": "Delivery reports",
    "unsubscribe": "One-click unsubscribe",
    "complaints": "Complaints (feedback loops)",
    "webhooks": "Webhooks (events posted to your URLs)",
}

# Settings of other parts, defined beside the code that uses them (their checks live there).
from .dkim import DKIM_SECTION_TITLE, DKIM_SETTINGS  # noqa: E402

from .shared import SHARED_SECTION_TITLE, SHARED_SETTINGS  # noqa: E402

SETTINGS += DKIM_SETTINGS + SHARED_SETTINGS
SECTION_TITLES[DKIM_SECTION_TITLE[0]] = DKIM_SECTION_TITLE[1]
SECTION_TITLES[SHARED_SECTION_TITLE[0]] = SHARED_SECTION_TITLE[1]

from .suppression import SUPPRESSION_SECTION_TITLE, SUPPRESSION_SETTINGS  # noqa: E402

SETTINGS += SUPPRESSION_SETTINGS
SECTION_TITLES[SUPPRESSION_SECTION_TITLE[0]] = SUPPRESSION_SECTION_TITLE[1]

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}

# Settings of earlier releases that nothing reads any more: a file that still has one loads, with
# a warning saying why (config set refuses them with the same words).
OBSOLETE: dict[str, str] = {
    "limits.max_threads": "the engine runs its connections on asyncio, not one thread each, "
                          "and sizes its few thread pools itself",
}


# --- address helpers shared by policy, inbound and delivery --------------------------------------

def parse_address_range(text: str) -> tuple[ipaddress._BaseAddress, ipaddress._BaseAddress]:
    """'1.2.3.4', '1.2.3.0/24', '1.2.3.4-1.2.3.9' or '::1' -> (first, last) address."""
    text = text.strip()
    if "-" in text:
        a, b = (ipaddress.ip_address(p.strip()) for p in text.split("-", 1))
        if a.version != b.version or b < a:
            raise ValueError(text)
        return a, b
    if "/" in text:
        net = ipaddress.ip_network(text, strict=False)
        return net[0], net[-1]
    a = ipaddress.ip_address(text)
    return a, a


class AddressSet:
    """A set of addresses from config entries; '0' matches everyone."""

    def __init__(self, entries: list[str]):
        self.everyone = "0" in entries
        self.ranges = [parse_address_range(e) for e in entries if e != "0"]

    def __contains__(self, ip: str) -> bool:
        if self.everyone:
            return True
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(a.version == addr.version and a <= addr <= b for a, b in self.ranges)

    def __bool__(self) -> bool:
        return self.everyone or bool(self.ranges)


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """'1.2.3.4', '1.2.3.4:2525', '::1', '[::1]:2525' -> (ip, port); raises ValueError."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = int(p)
    else:
        host, port = text, default_port
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(text)
    return host, port


# --- values ---------------------------------------------------------------------------------------

def coerce(setting: Setting, value: Any) -> Any:
    """Check one value against its setting; return it in canonical form or raise ConfigError."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{setting.name} = {value!r}: {why}")

    kind = setting.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("must be true or false")
    elif kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("must be a number")
        if kind == "int":
            if value != int(value):
                raise bad("must be a whole number")
            value = int(value)
        else:
            value = float(value)
        if setting.minimum is not None and value < setting.minimum and not (
                setting.zero_ok and value == 0):
            extra = " (or 0)" if setting.zero_ok else ""
            raise bad(f"must be at least {setting.minimum:g}{extra}")
    elif kind == "str":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # web_ip = 0 written without quotes
        if not isinstance(value, str):
            raise bad("must be a string")
    elif kind == "list[str]":
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [str(value)]  # relay_ips = "0" or 0
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
            raise bad("must be a list of strings")
        value = [str(v).strip() for v in value if str(v).strip()]
    elif kind == "list[float]":
        if not isinstance(value, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise bad("must be a list of numbers")
        value = [float(v) for v in value]
    if setting.check is not None:
        why = setting.check(value)
        if why:
            raise bad(why)
    return value


class Section:
    """Attribute access to one section's values: cfg.queue.relay_via_disk."""

    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return f"Section({self.__dict__!r})"


@dataclass
class Config:
    home: Path
    values: dict[str, Any] = field(default_factory=dict)  # "section.key" -> value
    warnings: list[str] = field(default_factory=list)
    # Settings given on the command line for this run (`--smtp-port 2525`): name -> the value
    # the file (or the default) holds, so `config show` can say which one is in force.
    overridden: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for s in SETTINGS:
            self.values.setdefault(s.name, s.default)
        self._build_sections()

    def _build_sections(self) -> None:
        by_section: dict[str, dict[str, Any]] = {}
        for name, value in self.values.items():
            sec, key = name.split(".", 1)
            by_section.setdefault(sec, {})[key] = value
        for sec, values in by_section.items():
            setattr(self, sec, Section(values))

    def get(self, name: str) -> Any:
        if name not in BY_NAME:
            raise ConfigError(f"{name}: no such setting")
        return self.values[name]

    def set(self, name: str, value: Any) -> None:
        if name not in BY_NAME:
            raise ConfigError(f"{name}: no such setting")
        self.values[name] = coerce(BY_NAME[name], value)
        self._cross_check()
        self._build_sections()

    def _cross_check(self) -> None:
        intervals = [i for i in self.values["queue.retry_intervals"] if i > 0]
        check = self.values["queue.queue_check_interval"]
        if intervals and check > min(intervals) * 60:
            self.warnings.append(
                f"queue.queue_check_interval = {check:g}s is longer than the shortest retry "
                f"interval ({min(intervals):g} min); dropped-in mail may wait longer than expected")

    # Paths derived from the home directory.
    def mailq(self, test_mode: bool = False) -> Path:
        return self.home / ("mailq-test" if test_mode else "mailq")

    @property
    def intake_processes(self) -> int:
        n = self.values["network.intake_workers"]
        return n if n > 0 else max(1, os.cpu_count() or 1)

    @property
    def delivery_process_count(self) -> int:
        """Delivery processes to start (network.delivery_processes); 1: none, the engine sends.
        0: one per four cores, at least 2 (on 2 cores 2 drained 8-13 % faster than the engine
        alone, relay the same: bench/README.md), none on one core."""
        n = self.values["network.delivery_processes"]
        if n > 0:
            return n
        cores = os.cpu_count() or 1
        return max(2, cores // 4) if cores > 1 else 1

    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    @property
    def pid_file(self) -> Path:
        p = self.values["basic.pid_file"]
        return Path(p) if p else self.home / "mailengine.pid"

    @property
    def password_file(self) -> Path:
        return self.home / "password.txt"


def unknown_setting(sec: str, key: str | None = None) -> str:
    """Why `[sec]` (key None) or `sec.key` is not a setting, with the nearest real one."""
    sections = list(dict.fromkeys(s.section for s in SETTINGS))
    if key is None:
        near = difflib.get_close_matches(sec, sections, n=1)
        return (f"[{sec}]: no such section" + (f" (did you mean [{near[0]}]?)" if near else "")
                + f"; sections: {', '.join(sections)}")
    name = f"{sec}.{key}"
    same_key = [s.name for s in SETTINGS if s.key == key]  # right key, wrong section
    near = same_key or difflib.get_close_matches(
        key, [s.key for s in SETTINGS if s.section == sec], n=1)
    if near and not same_key:
        near = [f"{sec}.{near[0]}"]
    near = near or difflib.get_close_matches(name, list(BY_NAME), n=1)
    return f"{name}: no such setting" + (f" (did you mean {near[0]}?)" if near else "")


def from_dict(home: Path, data: dict[str, Any], strict: bool = True,
              source: str = "") -> Config:
    """Validate a parsed TOML document into a Config. An unknown section or key (a typo such as
    `smtp_prot`) is an error naming the nearest real setting; with strict=False it is only a
    warning (`config upgrade` reads files with keys of older releases)."""
    values: dict[str, Any] = {}
    unknown: list[str] = []
    obsolete: list[str] = []
    for sec, body in data.items():
        if not isinstance(body, dict):
            near = [s.name for s in SETTINGS if s.key == sec]
            unknown.append(f"{sec}: a key outside any section"
                           + (f" (did you mean {near[0]} under [{near[0].split('.')[0]}]?)"
                              if near else ""))
            continue
        if not any(s.section == sec for s in SETTINGS):
            unknown.append(unknown_setting(sec))
            continue
        for key, value in body.items():
            name = f"{sec}.{key}"
            if name in OBSOLETE:
                obsolete.append(f"{name}: obsolete, ignored ({OBSOLETE[name]}); "
                                "remove it from the file")
                continue
            if name not in BY_NAME:
                unknown.append(unknown_setting(sec, key))
                continue
            values[name] = coerce(BY_NAME[name], value)
    if unknown and strict:
        raise ConfigError((f"{source}: " if source else "") + "; ".join(unknown))
    cfg = Config(home=home, values=values,
                 warnings=obsolete + [f"{u}; ignored" for u in unknown])
    cfg._cross_check()
    return cfg


def load(home: Path | str, strict: bool = True) -> Config:
    """Read HOME/mailengine.toml, creating HOME and a commented default file when missing."""
    home = Path(home).absolute()
    path = home / CONFIG_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        path.write_text(default_toml())
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(home, data, strict, source=str(path))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(int(value)) if value == int(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def default_toml() -> str:
    """The commented mailengine.toml written into a new home: every setting with its default."""
    lines = ["# MailEngine configuration. Every setting is listed with its default value.",
             "# Edit a value (and remove nothing): the engine and the web admin both read this file.",
             ""]
    section = None
    for s in SETTINGS:
        if s.section != section:
            section = s.section
            lines += ["", f"[{section}]  # {SECTION_TITLES[section]}"]
        lines.append(f"# {s.doc}" + (" (takes effect after restart)" if s.restart else ""))
        lines.append(f"{s.key} = {toml_value(s.default)}")
    return "\n".join(lines) + "\n"
