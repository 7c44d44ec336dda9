"""Reading an experiment file (TOML): typed lookups whose errors name the file and the key."""
from __future__ import annotations

import pathlib
import tomllib
from collections.abc import Mapping
from typing import Any

import storage

_MISSING = object()


class SettingsError(ValueError):
    """An experiment file is malformed; the message names the file and key."""


def read(path: str | pathlib.Path) -> dict[str, Any]:
    path = storage.Path(path)
    if not path.is_file():
        raise SettingsError(f"{path}: experiment file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{path}: invalid TOML: {e}") from e


class Table:
    """A TOML table with the file and key path it came from, so every error says where it is."""

    def __init__(self, data: Mapping[str, Any], where: str, known: tuple[str, ...] | None = None):
        if not isinstance(data, Mapping):
            raise SettingsError(f"{where}: expected a table, got {data!r}")
        self.data, self.where = dict(data), where
        if known is not None:
            unknown = sorted(set(self.data) - set(known))
            if unknown:
                raise SettingsError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        if key not in self.data:
            if default is _MISSING:
                raise SettingsError(f"{self.where}: `{key}` is required")
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind in (int, float, (int, float)) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise SettingsError(f"{self.where}: `{key}` must be {names}, got {value!r}")
        return value

    def get_list(self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING, *,
                 nonempty: bool = False) -> list:
        values = self.get(key, list, default)
        for i, v in enumerate(values):
            if isinstance(v, bool) and kind in (int, float, (int, float)) or not isinstance(v, kind):
                raise SettingsError(f"{self.where}: `{key}`[{i}] has the wrong type: {v!r}")
        if nonempty and not values:
            raise SettingsError(f"{self.where}: `{key}` must not be empty")
        return list(values)

    def table(self, key: str, known: tuple[str, ...] | None = None) -> "Table":
        return Table(self.data.get(key, {}), f"{self.where} [{key}]", known)
