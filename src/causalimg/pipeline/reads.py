"""What a stage reads of the run config, declared once: the same declaration makes its hash and
guards its body.

A declaration is a tuple of dotted paths into the run config (``"pretrain"``, ``"run.seed"``,
``"finetune.strategies.pos"``). ``select`` turns them into the JSON a stage's hash is made of,
leaving out each config model's operational fields (``OPERATIONAL``: how often to log or whether
to recompute activations changes no result); ``ConfigView`` is the config the body gets, which raises on any
read outside the declaration, so a stage can never depend on a field its hash ignores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel

from causalimg.strict import StrictModel

Path_ = tuple[str, ...]
WHOLE = "*"  # the declaration of a stage that reads the whole config (the report shows it)
# Where a run is and where its logs and plugins come from, not what it computes: never hashed, so a
# moved or copied run folder, or logs turned on, redoes nothing.
NOT_HASHED = frozenset({"run.dir", "tracking", "plugins"})


class UndeclaredConfigRead(RuntimeError):
    """A stage body read a config field it did not declare: a bug in the stage, not a user's mistake."""


def parse(reads: Sequence[str]) -> tuple[Path_, ...]:
    return tuple(() if r == WHOLE else tuple(r.split(".")) for r in reads)


def _child(value: Any, part: str) -> Any:
    if isinstance(value, BaseModel):
        return getattr(value, part)
    if isinstance(value, Mapping):
        return value[part]
    raise KeyError(part)


def _hashed_fields(model: BaseModel) -> list[str]:
    skip = type(model).OPERATIONAL if isinstance(model, StrictModel) else frozenset()
    return [name for name in type(model).model_fields if name not in skip]


def to_json(value: Any, where: str = "") -> Any:
    """Plain JSON of a config value, without operational fields and ``NOT_HASHED`` sections."""
    if isinstance(value, BaseModel):
        fields = _hashed_fields(value)
        paths = {name: f"{where}.{name}" if where else name for name in fields}
        return {name: to_json(getattr(value, name), paths[name]) for name in fields if paths[name] not in NOT_HASHED}
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    return value


def select(config: Any, reads: Sequence[str]) -> dict[str, Any]:
    """The declared part of ``config`` as nested JSON keyed by the declared paths."""
    out: dict[str, Any] = {}
    for path in parse(reads):
        value = config
        for part in path:
            try:
                value = _child(value, part)
            except (AttributeError, KeyError):
                raise KeyError(f"declared config path {'.'.join(path)!r} does not exist") from None
        out[".".join(path) or WHOLE] = to_json(value, ".".join(path))
    return out


class ConfigView:
    """The run config as one stage may read it: declared paths pass, anything else raises.

    Reading a declared path or anything below it returns the real object; reading on the way to a
    declared path returns another view.
    """

    def __init__(self, value: Any, allowed: Sequence[Path_], stage: str, where: str = ""):
        self._value, self._allowed, self._stage, self._where = value, tuple(allowed), stage, where

    def _read(self, part: str, fetch: Any) -> Any:
        below = [p[1:] for p in self._allowed if p and p[0] == part]
        if () in below:
            return fetch()
        where = f"{self._where}.{part}" if self._where else part
        if not below:
            raise UndeclaredConfigRead(
                f"stage {self._stage!r} read config field {where!r}, which it does not declare; "
                "add it to the stage's reads so that changing it redoes the stage"
            )
        return ConfigView(fetch(), below, self._stage, where)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._read(name, lambda: getattr(self._value, name))

    def __getitem__(self, key: str) -> Any:
        return self._read(str(key), lambda: self._value[key])

    def __contains__(self, key: str) -> bool:
        return key in self._value

    def __repr__(self) -> str:
        return f"ConfigView({self._where or 'config'} of stage {self._stage!r})"


def view(config: Any, reads: Sequence[str], stage: str) -> Any:
    """What a stage body gets: the whole config when it declares ``*``, else a guarded view."""
    allowed = parse(reads)
    return config if () in allowed else ConfigView(config, allowed, stage)


def leaf_paths(config: Any, reads: Sequence[str]) -> list[str]:
    """Every field below the declared paths, dotted (what a test perturbs to check the hash)."""
    out: list[str] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, BaseModel):
            children = {n: getattr(value, n) for n in _hashed_fields(value)}
        elif isinstance(value, Mapping):
            children = {str(k): v for k, v in value.items()}
        else:
            out.append(path)
            return
        for name, child in children.items():
            walk(child, f"{path}.{name}" if path else name)

    for path in parse(reads):
        value = config
        for part in path:
            value = _child(value, part)
        walk(value, ".".join(path))
    return out
