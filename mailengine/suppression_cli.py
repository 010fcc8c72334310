"""`mailengine suppress add|remove|list|check|import|export`: the suppression list from a shell.

It works on HOME/suppression.db directly, whether the engine runs or not (the file is made for
several processes at once: a running engine and its intake processes see a change at their next
RCPT). With `shared.redis_url` set the change is also sent to Redis before the command ends, and
`list`, `check` and `export` first take in what other engines changed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .suppression import SOURCES, SuppressionStore, utc_text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailengine suppress", description=(
        "The suppression list: addresses this engine does not send to (for every sender, or "
        "for one sender domain; for good or until an entry expires)."))
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = sub.add_parser("add", help="suppress addresses")
    a.add_argument("addresses", nargs="+", metavar="ADDRESS")
    a.add_argument("--reason", default="added by hand", help="why (shown at RCPT and in lists)")
    a.add_argument("--source", default="manual", choices=SOURCES)
    a.add_argument("--sender-domain", default="", metavar="DOMAIN",
                   help="only for mail from this domain (default: every sender)")
    until = a.add_mutually_exclusive_group()
    until.add_argument("--days", type=float, help="expires after this many days")
    until.add_argument("--until", metavar="TIME", help="expires then (ISO 8601 or epoch)")
    r = sub.add_parser("remove", help="take addresses off the list")
    r.add_argument("addresses", nargs="+", metavar="ADDRESS")
    r.add_argument("--sender-domain", default="", metavar="DOMAIN",
                   help="the entry for this sender domain (default: the one for every sender)")
    ls = sub.add_parser("list", help="entries by address")
    ls.add_argument("search", nargs="?", default="", help="part of the address")
    ls.add_argument("--sender-domain", metavar="DOMAIN",
                    help="only entries for this sender domain ('' = those for every sender)")
    ls.add_argument("--source", choices=SOURCES)
    ls.add_argument("--expired", action="store_true", help="expired entries too")
    ls.add_argument("--limit", type=int, default=0, help="at most this many (0 = all)")
    ls.add_argument("--offset", type=int, default=0)
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    c = sub.add_parser("check", help="is ADDRESS suppressed (for mail from SENDER)? exit 0 if so")
    c.add_argument("address")
    c.add_argument("--from", dest="sender", default="", metavar="SENDER")
    i = sub.add_parser("import", help="add the entries of a CSV file ('-' = stdin)")
    i.add_argument("file")
    e = sub.add_parser("export", help="every entry as CSV (default: stdout)")
    e.add_argument("file", nargs="?", default="-")
    return p


def suppress_main(cfg, argv: list[str]) -> int:
    args = parser().parse_args(argv)
    store = SuppressionStore(cfg.home, cfg.shared.redis_url, cfg.shared.key_prefix, sync=False)
    store.cfg = cfg  # additions by hand are posted to webhooks too
    try:
        if args.action in ("list", "check", "export") and store.redis:
            _sync(store)
        code = ACTIONS[args.action](store, args)
        if args.action in ("add", "remove", "import") and store.redis:
            _sync(store)
        return code
    except ValueError as e:
        print(f"mailengine suppress {args.action}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"mailengine suppress {args.action}: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()


def _sync(store: SuppressionStore) -> None:
    if not store.sync():
        print("mailengine suppress: Redis (shared.redis_url) cannot be reached: working on this "
              "home's list only; changes go to Redis when an engine here next reaches it",
              file=sys.stderr)


def _add(store: SuppressionStore, args) -> int:
    expires = time.time() + args.days * 86400 if args.days is not None else args.until
    if args.days is not None and args.days <= 0:
        raise ValueError("--days: give a number above 0")
    from .suppression import make_entry
    for a in args.addresses:  # all checked before any is added
        make_entry(a, reason=args.reason, source=args.source, sender_domain=args.sender_domain,
                   expires=expires)
    for a in args.addresses:
        e = store.add(a, reason=args.reason, source=args.source,
                      sender_domain=args.sender_domain, expires=expires)
        print(f"suppressed {e.address}" + (f" for mail from {e.sender_domain}"
                                           if e.sender_domain else "")
              + (f" until {utc_text(e.expires)}" if e.expires is not None else ""))
    return 0


def _remove(store: SuppressionStore, args) -> int:
    missing = 0
    for a in args.addresses:
        if store.remove(a, args.sender_domain):
            print(f"removed {a.strip().lower()}")
        else:
            missing += 1
            what = f"sender domain {args.sender_domain}" if args.sender_domain else "all senders"
            print(f"{a}: no entry for {what}", file=sys.stderr)
    return 1 if missing == len(args.addresses) else 0


def _list(store: SuppressionStore, args) -> int:
    rows = store.entries(args.search, sender_domain=args.sender_domain, source=args.source,
                         include_expired=args.expired, limit=args.limit or None,
                         offset=args.offset)
    if args.json:
        for e in rows:
            print(json.dumps(e.as_json()))
        return 0
    for e in rows:
        print(f"{e.address}\t{e.sender_domain or '*'}\t{e.source}\t{utc_text(e.created)}\t"
              f"{utc_text(e.expires) or 'never'}\t{e.reason}")
    total = store.count(args.search, sender_domain=args.sender_domain, source=args.source,
                        include_expired=args.expired)
    print(f"{len(rows)} of {total} entries", file=sys.stderr)
    return 0


def _check(store: SuppressionStore, args) -> int:
    domain = args.sender.rpartition("@")[2] if "@" in args.sender else args.sender
    e = store.lookup(args.address, domain)
    if e is None:
        print(f"{args.address}: not suppressed" + (f" for mail from {domain}" if domain else ""))
        return 1
    senders = f"mail from {e.sender_domain}" if e.sender_domain else "every sender"
    until = f"until {utc_text(e.expires)}" if e.expires is not None else "for good"
    print(f"{e.address}: suppressed for {senders} since {utc_text(e.created)}, {until} "
          f"({e.source}: {e.reason})")
    return 0


def _import(store: SuppressionStore, args) -> int:
    if args.file == "-":
        n = store.import_csv(sys.stdin)
    else:
        with open(args.file, encoding="utf-8-sig", newline="") as f:
            n = store.import_csv(f)
    print(f"imported {n} entries")
    return 0


def _export(store: SuppressionStore, args) -> int:
    if args.file == "-":
        n = store.export_csv(sys.stdout)
    else:
        with open(args.file, "w", encoding="utf-8", newline="") as f:
            n = store.export_csv(f)
    print(f"exported {n} entries", file=sys.stderr)
    return 0


ACTIONS = {"add": _add, "remove": _remove, "list": _list, "check": _check, "import": _import,
           "export": _export}
