"""Writing HOME/mailengine.toml: the one writer behind `config set`, `config upgrade`, the
options of `mailengine start` and the web admin's settings form.

Values are changed in the parsed document (tomlkit), so the operator's comments, the order of
keys and a comment on the changed line stay as they were; a section the file lacks is added with
its title. The file is replaced by rename (a reader sees the old file or the new one, never half)
and keeps its mode. Checking values is config.py's job (config.coerce); this module only writes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import tomlkit

from . import config
from .atomic_file import write_atomically  # noqa: F401  (config_file.write_atomically)


def toml_ready(setting: config.Setting, value: Any) -> Any:
    """The canonical value as the file writes it: whole numbers without '.0'."""
    if setting.kind == "float" and float(value).is_integer():
        return int(value)
    if setting.kind == "list[float]":
        return [int(v) if float(v).is_integer() else v for v in value]
    return value


def set_in_doc(doc: tomlkit.TOMLDocument, setting: config.Setting, value: Any) -> None:
    """Set one value in a parsed document, keeping comments; adds the section if missing."""
    if setting.section not in doc:
        table = tomlkit.table()
        table.comment(config.SECTION_TITLES.get(setting.section, setting.section))
        doc.add(setting.section, table)
    table = doc[setting.section]
    old = table.get(setting.key)
    item = tomlkit.item(toml_ready(setting, value))
    if old is not None and getattr(old, "trivia", None) is not None and old.trivia.comment:
        item.comment(old.trivia.comment.lstrip("# ").rstrip())  # keep a comment on the line
    table[setting.key] = item


def read_doc(home: Path) -> tuple[Path, tomlkit.TOMLDocument]:
    """HOME/mailengine.toml parsed for changing (the commented default file is written first
    when there is none)."""
    path = Path(home) / config.CONFIG_FILE
    if not path.exists():
        config.load(home)  # writes the commented default file
    try:
        return path, tomlkit.parse(path.read_text(encoding="utf-8"))
    except Exception as e:  # tomlkit raises its own ParseError family
        raise config.ConfigError(f"{path}: not valid TOML: {e}") from None


def save(home: Path, changes: dict[str, Any]) -> None:
    """Write checked `changes` ("section.key" -> value) into the home's mailengine.toml."""
    path, doc = read_doc(Path(home))
    for name, value in changes.items():
        set_in_doc(doc, config.BY_NAME[name], value)
    write_atomically(path, tomlkit.dumps(doc))
