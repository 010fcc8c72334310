"""Settings changed from the web admin: form text -> checked values -> mailengine.toml -> engine.

Values are checked with config.coerce, the rules the config file obeys. They are written into
HOME/mailengine.toml with tomlkit, so every comment and the order of the file stay as they are
(write to a temporary file, then rename). A setting whose `restart` flag is False is applied to
the running engine at once (engine.cfg.set, then Engine.apply_settings tells the parts that keep
derived state, and replaces the intake worker processes when the setting's scope includes them);
the others are only saved and shown as "takes effect after restart" until then.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import tomlkit

from .. import config_file
from ..config import BY_NAME, CONFIG_FILE, SETTINGS, ConfigError, coerce
from ..secret_values import mask_text, shown, unmask
from ..setting import Setting

log = logging.getLogger("mailengine.web")


def form_text(s: Setting, value: Any) -> str:
    """A value as the settings form shows it."""
    if s.kind.startswith("list"):
        return "\n".join(_num(v) if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return _num(value)
    return str(value)


def _num(v: float) -> str:
    return str(int(v)) if v == int(v) else repr(v)


def parse_field(s: Setting, raw: str | None) -> Any:
    """Form text (None: an unticked checkbox) -> a value for coerce; ConfigError when malformed."""
    if s.kind == "bool":
        return raw is not None and raw not in ("", "0", "false", "off")
    raw = (raw or "").strip()
    if s.kind in ("int", "float"):
        try:
            return float(raw) if s.kind == "float" or "." in raw else int(raw)
        except ValueError:
            raise ConfigError(f"{s.name} = {raw!r}: must be a number") from None
    if s.kind == "str":
        return raw
    if s.kind == "list[str]":
        return [ln.strip() for ln in raw.splitlines() if ln.strip()]
    if s.kind == "list[float]":
        out = []
        for part in re.split(r"[\s,]+", raw):
            if part:
                try:
                    out.append(float(part))
                except ValueError:
                    raise ConfigError(f"{s.name}: {part!r} is not a number") from None
        return out
    raise ConfigError(f"{s.name}: cannot edit a {s.kind} here")


def read_file_values(home) -> dict[str, Any]:
    """The values written in mailengine.toml (defaults for keys it lacks), checked."""
    path = home / CONFIG_FILE
    out = {s.name: s.default for s in SETTINGS}
    try:
        doc = tomlkit.parse(path.read_text())
    except (OSError, tomlkit.exceptions.ParseError):
        return out
    for sec, body in doc.items():
        if not isinstance(body, dict):
            continue
        for key, value in body.items():
            name = f"{sec}.{key}"
            if name in BY_NAME:
                try:
                    out[name] = coerce(BY_NAME[name], _plain(value))
                except ConfigError:
                    pass
    return out


def _plain(value: Any) -> Any:
    """tomlkit items -> plain Python values."""
    if hasattr(value, "unwrap"):
        return value.unwrap()
    return value


def save(home, changes: dict[str, Any]) -> None:
    """Write `changes` ("section.key" -> checked value) into mailengine.toml, keeping comments."""
    config_file.save(home, changes)


def apply(engine, changes: dict[str, Any]) -> None:
    """Apply live-changeable settings to the running engine."""
    cfg = engine.cfg
    for name, value in changes.items():
        cfg.set(name, value)
    engine.apply_settings()
    log.info("settings changed from the web admin: %s",
             ", ".join(f"{k} = {shown(BY_NAME[k], v)!r}" for k, v in changes.items()))


def submit(engine, section: str | None, form) -> tuple[dict[str, str], list[str], list[str]]:
    """Handle the settings form (one section's, or all of them for None). Returns (errors by
    name, applied names, restart names). Nothing is saved when any field is wrong."""
    errors: dict[str, str] = {}
    new: dict[str, Any] = {}
    saved = read_file_values(engine.cfg.home)
    for s in SETTINGS:
        if section is not None and s.section != section:
            continue
        on_form = s.name in form if s.kind != "bool" else s.name in form.getall("bools", [])
        if not on_form:
            continue  # not on the form: unchanged (an unticked checkbox sends nothing: the
            # form lists its checkboxes in "bools")
        # the page showed secrets masked: a mask sent back is the value it stood for
        showed = saved[s.name] if s.restart else engine.cfg.values[s.name]
        try:
            new[s.name] = coerce(s, unmask(s, parse_field(s, form.get(s.name)), showed))
        except ConfigError as e:
            errors[s.name] = mask_text(str(e))  # a check may quote a URL with its password
    if errors:
        return errors, [], []
    live = {n: v for n, v in new.items() if not BY_NAME[n].restart and v != engine.cfg.values[n]}
    later = {n: v for n, v in new.items() if BY_NAME[n].restart and v != saved[n]}
    to_file = {**live, **later}  # what differs from what the form showed
    if to_file:
        save(engine.cfg.home, to_file)
    if live:
        apply(engine, live)
    return {}, sorted(live), sorted(later)
