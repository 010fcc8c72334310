"""`mailengine config show|set|upgrade`: read and change HOME/mailengine.toml from the shell.

- `config show [KEY|SECTION] [--changed]`: the effective values (`postconf`-like); one key also
  shows its meaning, default and whether a change needs a restart. A value given on the command
  line for this run (`--smtp-port 2525`) is shown as in force, marked, with the file's value.
  Secrets (webhooks.secret, a password in a URL such as shared.redis_url's) show as "********"
  (secret_values.py), here and in what `set` and `upgrade` print.
- `config set KEY VALUE`: checked exactly as the engine and the web admin check it
  (config.coerce), written into mailengine.toml with its comments and layout kept (tomlkit); a
  running engine is told through the control socket when the setting allows it.
- `config upgrade OLD_HOME_OR_FILE`: the manual's `upcfg.tcl`. Every value the old file sets is
  carried into this home's mailengine.toml (created with this release's comments and keys when
  missing); comments and keys new in this release stay; keys that no longer exist and values
  this release refuses are reported, never carried. The file as it was is kept beside it as
  `mailengine.toml.before-upgrade`. OLD_HOME may also be a home of the original product: its
  `config/` directory (one file per setting: `config/WebPort.txt`, `config/WebTcpip.txt`, ...)
  is read, each file it knows carried to its key, `config/password.txt` copied to this home's
  `password.txt` when there is none, and the files it does not know reported.
"""
from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path

import tomlkit

from . import config
from .config_file import read_doc, set_in_doc, write_atomically
from .secret_values import mask_text, shown
from .setting import READ_BY

BACKUP_SUFFIX = ".before-upgrade"


def config_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailengine config",
                                description="Show, change and upgrade mailengine.toml.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sh = sub.add_parser("show", help="effective values; KEY (section.key) or SECTION for part")
    sh.add_argument("key", nargs="?")
    sh.add_argument("--changed", action="store_true", help="only values that are not defaults")
    st = sub.add_parser("set", help="set KEY to VALUE (checked), tell a running engine")
    st.add_argument("key")
    st.add_argument("value", help="TOML syntax or plain words; lists as a,b,c or a TOML array "
                                  "([1, 5, 30]); dns_servers and signing_table entries hold "
                                  "commas: one entry as written, several as a TOML array")
    up = sub.add_parser("upgrade", help="carry an older config's values into this home's file")
    up.add_argument("old", metavar="OLD_HOME_OR_FILE",
                    help="an older home or mailengine.toml, or the original product's home "
                         "(its config/ directory of one file per setting)")
    up.add_argument("--dry-run", action="store_true", help="report, change nothing")
    return p


def config_main(cfg: config.Config, argv: list[str], engine_answer=None, ask=None) -> int:
    args = config_parser().parse_args(argv)
    if args.action == "show":
        return show(cfg, args.key, args.changed)
    if args.action == "set":
        return cmd_set(cfg, args.key, args.value, engine_answer, ask)
    return cmd_upgrade(cfg.home, Path(args.old), args.dry_run,
                       running=bool(engine_answer and engine_answer(cfg)))


# ---------------------------------------------------------------- show

def override_note(cfg: config.Config, name: str) -> str:
    """'  # --smtp-port on the command line (mailengine.toml: 25)' for an overridden setting."""
    if name not in cfg.overridden:
        return ""
    from .overrides import option_name
    return (f"  # {option_name(config.BY_NAME[name].key)} on the command line "
            f"({config.CONFIG_FILE}: {_shown(name, cfg.overridden[name])})")


def show(cfg: config.Config, key: str | None, changed_only: bool = False) -> int:
    if key and key in config.BY_NAME:
        s = config.BY_NAME[key]
        print(f"{s.name} = {_shown(s.name, cfg.values[s.name])}{override_note(cfg, s.name)}")
        print(f"  {s.doc}")
        print(f"  default: {_shown(s.name, s.default)}; "
              + ("a change takes effect after restart" if s.restart else
                 "a change applies to a running engine at once (config set)")
              + f"; read by {READ_BY[s.scope]}")
        return 0
    names = [s for s in config.SETTINGS if not key or s.section == key]
    if not names:
        print(f"{key}: no such setting or section (sections: "
              f"{', '.join(dict.fromkeys(s.section for s in config.SETTINGS))})", file=sys.stderr)
        return 2
    for s in names:
        value = cfg.values[s.name]
        if changed_only and value == config.coerce(s, s.default) and s.name not in cfg.overridden:
            continue
        print(f"{s.name} = {_shown(s.name, value)}{override_note(cfg, s.name)}")
    for w in cfg.warnings:
        print(f"# warning: {w}", file=sys.stderr)
    return 0


def _shown(name: str, value) -> str:
    """A value as printed: TOML, a secret masked."""
    setting = config.BY_NAME.get(name)
    return config.toml_value(shown(setting, value) if setting else value)


# ---------------------------------------------------------------- set

def cmd_set(cfg: config.Config, key: str, text: str, engine_answer=None, ask=None) -> int:
    from .overrides import list_syntax, parse_override
    setting = config.BY_NAME.get(key)
    if key in config.OBSOLETE:
        print(f"{key}: obsolete, nothing reads it ({config.OBSOLETE[key]})", file=sys.stderr)
        return 2
    if setting is None:
        near = [s.name for s in config.SETTINGS if s.key == key.rpartition(".")[2]]
        print(f"{key}: no such setting" + (f" (did you mean {near[0]}?)" if near else ""),
              file=sys.stderr)
        return 2
    try:
        value = config.coerce(setting, parse_override(setting, text))
        path, doc = read_doc(cfg.home)
        set_in_doc(doc, setting, value)
        new_text = tomlkit.dumps(doc)
        checked = config.from_dict(cfg.home, tomllib.loads(new_text))  # the whole file stays valid
    except config.ConfigError as e:
        hint = ""
        if setting.kind.startswith("list") and "; write " not in str(e):
            hint = f" (write {list_syntax(setting)})"
        print(f"Not changed: {mask_text(str(e))}{hint}", file=sys.stderr)  # it may quote a URL
        return 2
    write_atomically(path, new_text)
    print(f"{setting.name} = {_shown(setting.name, value)}  (written to {path})")
    for w in checked.warnings:
        print(f"warning: {w}")
    alive = engine_answer(cfg) if engine_answer else None
    if not alive:
        print("The engine is not running: it takes effect when the engine starts.")
    elif setting.restart:
        print(f"The running engine (pid {alive['pid']}) keeps the old value: this setting takes "
              "effect after restart.")
    else:
        answer = ask(cfg, "config.set", name=setting.name, value=value)
        if answer.get("applied"):
            print(f"Applied to the running engine (pid {alive['pid']}).")
            for note in answer.get("notes", []):
                print(f"note: {note}")
        else:
            print(f"The running engine says: {answer.get('why', 'not applied')}")
    return 0


# ---------------------------------------------------------------- upgrade

def old_config_file(old: Path) -> Path:
    if old.is_dir():
        return old / config.CONFIG_FILE
    return old


# ---------------------------------------------------------------- the original product's config/

# The original product keeps one file per setting in HOME/config/ ("#" comment lines, then the
# value; a list one entry a line). The manual names WebPort.txt and WebTcpip.txt (and
# password.txt, the users); the other files are matched by the setting's key written without
# "_" in any case (SmtpPort.txt, RelayIps.txt, RetryIntervals.txt), "Tcpip" read as "Ip".
ORIGINAL_NAMES = {"webport": "network.web_port", "webtcpip": "network.web_ip",
                  "smtptcpip": "network.smtp_listen_ips",
                  "smtpsourcetcpip": "network.smtp_source_ip"}
USERS_FILE = "password.txt"


def _normal(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def original_names() -> dict[str, str]:
    """Normalised file stem -> setting name; keys shared by two sections are left out."""
    by_key: dict[str, list[str]] = {}
    for s in config.SETTINGS:
        by_key.setdefault(_normal(s.key), []).append(s.name)
    names = {k: v[0] for k, v in by_key.items() if len(v) == 1}
    names.update({k.replace("ip", "tcpip"): v for k, v in list(names.items()) if "ip" in k})
    names.update(ORIGINAL_NAMES)
    return names


def original_config_dir(old: Path) -> Path | None:
    """OLD's `config/` directory of the original product (or OLD itself, being one), or None
    when OLD is a home of this release (it has mailengine.toml) or holds no such directory."""
    if not old.is_dir() or (old / config.CONFIG_FILE).exists():
        return None
    for d in (old / "config", old):
        if d.is_dir() and any(d.glob("*.txt")):
            return d
    return None


def original_value(setting: config.Setting, text: str):
    """A file's text -> a value for config.coerce (which reports what it cannot take)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if setting.kind.startswith("list"):
        if setting.kind == "list[float]":
            return [_number(x) for ln in lines for x in ln.replace(",", " ").split()]
        return lines
    first = lines[0] if lines else ""
    if setting.kind == "bool":
        low = first.lower()
        return {"1": True, "yes": True, "true": True, "on": True, "0": False, "no": False,
                "false": False, "off": False, "": False}.get(low, first)
    if setting.kind in ("int", "float"):
        return _number(first)
    return first


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def read_original(config_dir: Path) -> tuple[dict, list[str]]:
    """The settings of a config/ directory as a TOML-like dict {section: {key: value}}, and the
    files it does not know."""
    names = original_names()
    data: dict[str, dict] = {}
    unknown = []
    for f in sorted(config_dir.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name == USERS_FILE:
            continue
        name = names.get(_normal(f.stem)) if f.suffix.lower() == ".txt" else None
        if name is None:
            unknown.append(f"config/{f.name}")
            continue
        setting = config.BY_NAME[name]
        text = f.read_text(encoding="utf-8", errors="replace")
        data.setdefault(setting.section, {})[setting.key] = original_value(setting, text)
    return data, unknown


def upgrade(home: Path, old: Path, dry_run: bool = False) -> dict:
    """Carry the values of an older config file (or of the original product's config/
    directory) into HOME/mailengine.toml. Returns a report:
    carried [(name, value)], same [name], unknown [name], invalid [(name, why)],
    not_default [(name, value, default)] (carried values that differ from this release's
    defaults), path, backup, users (what became of config/password.txt)."""
    path = home / config.CONFIG_FILE
    original = original_config_dir(old)
    unknown_files: list[str] = []
    if original is not None:
        src = original
        old_data, unknown_files = read_original(original)
    else:
        src = old_config_file(old)
        if src.absolute().resolve() == path.absolute().resolve():
            raise config.ConfigError(f"{src} is this home's own file; name the old home or file")
        try:
            old_data = tomllib.loads(src.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise config.ConfigError(f"{src}: no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise config.ConfigError(f"{src}: not valid TOML: {e}") from None
    created = not path.exists()
    path, doc = read_doc(home)
    current = config.from_dict(home, tomllib.loads(tomlkit.dumps(doc)), strict=False)
    rep: dict = {"carried": [], "same": [], "unknown": list(unknown_files), "invalid": [],
                 "not_default": [], "path": str(path), "backup": "", "created": created,
                 "source": str(src), "users": ""}
    if original is not None and (original / USERS_FILE).is_file():
        users = home / USERS_FILE
        if users.exists():
            rep["users"] = f"kept this home's {users} (the old {original / USERS_FILE} not copied)"
        else:
            rep["users"] = f"{original / USERS_FILE} -> {users}"
            if not dry_run:
                write_atomically(users, (original / USERS_FILE).read_text(encoding="utf-8"))
                os.chmod(users, 0o600)
    for sec, body in old_data.items():
        if not isinstance(body, dict):
            rep["unknown"].append(sec)
            continue
        for key, raw in body.items():
            name = f"{sec}.{key}"
            setting = config.BY_NAME.get(name)
            if setting is None:
                rep["unknown"].append(name)
                continue
            try:
                value = config.coerce(setting, raw)
            except config.ConfigError as e:
                rep["invalid"].append((name, str(e)))
                continue
            if value != config.coerce(setting, setting.default):
                rep["not_default"].append((name, value, setting.default))
            if value == current.values[name]:
                rep["same"].append(name)
                continue
            set_in_doc(doc, setting, value)
            rep["carried"].append((name, value))
    text = tomlkit.dumps(doc)
    rep["warnings"] = config.from_dict(home, tomllib.loads(text), strict=False).warnings
    if rep["carried"] and not dry_run:
        backup = path.with_name(path.name + BACKUP_SUFFIX)
        was = path.read_text(encoding="utf-8")
        if not created and was != config.default_toml():  # a fresh default holds nothing to keep
            write_atomically(backup, was)
            rep["backup"] = str(backup)
        write_atomically(path, text)
    return rep


def cmd_upgrade(home: Path, old: Path, dry_run: bool = False, running: bool = False) -> int:
    try:
        rep = upgrade(home, old, dry_run)
    except config.ConfigError as e:
        print(f"config upgrade: {e}", file=sys.stderr)
        return 2
    verb = "would carry" if dry_run else "carried"
    print(f"{rep['source']} -> {rep['path']}"
          + (" (created with this release's defaults)" if rep["created"] else ""))
    n = len(rep["carried"])
    print(f"{verb} {n} value{'' if n == 1 else 's'}; {len(rep['same'])} were already the same")
    for name, value in rep["carried"]:
        print(f"  {name} = {_shown(name, value)}")
    if rep["not_default"]:
        print("values from the old file that differ from this release's defaults "
              "(check they are still what you want):")
        for name, value, default in rep["not_default"]:
            print(f"  {name} = {_shown(name, value)}  (default {_shown(name, default)})")
    if rep["users"]:
        print(f"users: {rep['users']}")
    if rep["unknown"]:
        print("keys and files this release does not know (not carried):")
        for name in rep["unknown"]:
            print(f"  {name}")
    if rep["invalid"]:
        print("values this release refuses (not carried; set them anew):")
        for name, why in rep["invalid"]:
            print(f"  {why}")
    for w in rep["warnings"]:
        print(f"warning: {w}")
    if rep["backup"]:
        print(f"the file as it was: {rep['backup']}")
    if running and rep["carried"] and not dry_run:
        print("The engine is running: restart it to use the carried values.")
    return 0
