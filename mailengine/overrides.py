"""Setting values written as text: `--smtp-port 2525` on the command line, `config set KEY VALUE`,
and the help and errors that say how a list is written."""
from __future__ import annotations

import tomllib

from . import config


def option_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def list_syntax(setting: config.Setting) -> str:
    """How a list is written on the command line, for help and errors."""
    if setting.comma_entries:
        return ("one entry as written, or several as a TOML array: "
                "'[\"a,b,MX,1.2.3.4\", \"c,d,MX,5.6.7.8\"]'")
    example = "1,5,30 or [1, 5, 30]" if setting.kind == "list[float]" else \
        "a,b,c or '[\"a\", \"b\", \"c\"]'"
    return f"a list: {example}"


def parse_override(setting: config.Setting, text: str):
    """Command-line text -> a value for the setting. Scalars: TOML syntax, or plain words.
    Lists: a TOML array (`[1, 5, 30]`, `'["a", "b"]'`) or plain `a,b,c` (numbers for a list of
    numbers); a list whose entries hold commas takes plain text as one entry."""
    text = text.strip()
    if setting.kind.startswith("list"):
        if text.startswith("["):
            try:
                return tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError as e:
                raise config.ConfigError(f"{setting.name} = {text}: not a TOML array ({e}); "
                                         f"write {list_syntax(setting)}") from None
        parts = [text] if setting.comma_entries else text.split(",")
        return [_list_entry(setting, p.strip()) for p in parts if p.strip()]
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    return text


def _list_entry(setting: config.Setting, text: str):
    """One plain entry: a number for a list of numbers, a "quoted" string unquoted."""
    if setting.kind == "list[float]" or text[:1] in "\"'":
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            pass
    return text
