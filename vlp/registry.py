"""One small registry used for towers, heads, objectives, evaluators, stream stages and datasets.

An entry is a builder plus an optional settings dataclass; ``build(spec)`` validates a
``{"name": ..., **settings}`` mapping against that dataclass, so tower- and
objective-specific keys get the same strict checking as the run config.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable, Dict, Generic, List, Mapping, Optional, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    builder: Callable[..., T]
    settings: Optional[type] = None  # dataclass of the entry's own settings


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Entry[T]] = {}

    def register(self, name: str, settings: Optional[type] = None):
        """Decorator: ``@REG.register("name", SettingsDataclass)``."""

        def deco(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            if settings is not None and not dataclasses.is_dataclass(settings):
                raise TypeError(f"settings for {self.kind} {name!r} must be a dataclass")
            self._entries[name] = Entry(name, builder, settings)
            return builder

        return deco

    def get(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.list())}")
        return self._entries[name]

    def list(self) -> List[str]:
        return sorted(self._entries)

    def builders(self) -> List[Callable[..., T]]:
        """Every entry's builder, in registration order."""
        return [entry.builder for entry in self._entries.values()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def settings(self, spec: Mapping[str, Any]) -> Any:
        """Validated settings dataclass instance for ``spec`` (a mapping with ``name``)."""
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(f"{self.kind} spec needs a 'name'; valid: {', '.join(self.list())}")
        entry = self.get(spec.pop("name"))
        if entry.settings is None:
            if spec:
                raise ValueError(f"{self.kind} {entry.name!r} takes no settings, got {sorted(spec)}")
            return None
        return make_dataclass(entry.settings, spec, where=f"{self.kind} {entry.name!r}")

    def build(self, spec: Mapping[str, Any], *args, **kwargs) -> T:
        settings = self.settings(spec)  # validates the name too
        entry = self.get(spec["name"])
        if settings is None:
            return entry.builder(*args, **kwargs)
        return entry.builder(settings, *args, **kwargs)


def make_dataclass(cls: type, values: Mapping[str, Any], where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``values`` with strict key and type checks."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in {where or cls.__name__}; valid: {', '.join(names)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), dict(values))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ValueError(f"bad value in {where or cls.__name__}: {str(e).splitlines()[0]}") from None


_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def field_comments(cls: type) -> Dict[str, str]:
    """``{field: its trailing # comment}`` of a dataclass, read from its source: the one place a
    setting's meaning is written, shown by ``vlp eval NAME --help`` and docs/config.md."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    out: Dict[str, str] = {}
    above: List[str] = []  # comment lines just above a field
    for line in lines:
        if line.strip().startswith("#"):
            above.append(line.strip().lstrip("#").strip())
            continue
        m = _FIELD.match(line)
        if m and m.group(1) in names and m.group(1) not in out:
            out[m.group(1)] = " ".join(filter(None, [*above, (m.group(2) or "").strip()]))
        above = []
    return out
