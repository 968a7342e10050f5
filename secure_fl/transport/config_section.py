"""The JSON section reader of the transport configs: typed access to one JSON object that refuses
keys nobody read (a typo must not silently fall back to a default).

Errors: ConfigError naming the field (as a dotted path) and the expected type.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from secure_fl.errors import ConfigError


class _Section:
    """Typed access to one JSON object; :meth:`done` refuses keys nobody read."""

    def __init__(self, data: object, where: str, base: Path) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'config'} must be a JSON object")
        self.data: dict[str, Any] = data
        self.where = where
        self.base = base
        self.read: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.data.get(key, default)

    def str_(self, key: str, default: str | None = None) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self._name(key)} must be a string, got {value!r}")
        return value

    def opt_str(self, key: str) -> str | None:
        return self.str_(key) if self.has(key) else self.raw(key)

    def int_(self, key: str, default: int | None = None) -> int:
        value = self.raw(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self._name(key)} must be an integer, got {value!r}")
        return value

    def opt_int(self, key: str) -> int | None:
        return self.int_(key) if self.has(key) else self.raw(key)

    def float_(self, key: str, default: float | None = None) -> float:
        value = self.raw(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{self._name(key)} must be a number, got {value!r}")
        return float(value)

    def bool_(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._name(key)} must be true or false, got {value!r}")
        return value

    def path(self, key: str) -> Path:
        return (self.base / self.str_(key)).resolve()

    def opt_path(self, key: str) -> Path | None:
        return self.path(key) if self.has(key) else self.raw(key)

    def section(self, key: str) -> _Section:
        return _Section(self.raw(key, {}), self._name(key), self.base)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise ConfigError(f"unknown keys in {self.where or 'config'}: {unknown}")


def _read_json(path: Path) -> tuple[dict[str, Any], Path]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a JSON object")
    return data, Path(path).resolve().parent
