"""Plugin loading and the registry of named components.

``get_plugin_manager()`` builds a fresh pluggy manager (never a global): built-in plugins first
(``BUILTIN_PLUGINS``), then installed entry points of group ``causalimg``, then one-file plugins
from directories named in the config. A plugin that fails to import or register, a misspelled
hook name and a duplicate component name are all a :class:`PluginError` naming the plugin and
where it came from: nothing is dropped silently.

Environment variables:
  CAUSALIMG_PLUGINS_ONLY   comma-separated plugin names: load only these
  CAUSALIMG_PLUGINS_BLOCK  comma-separated plugin names: never load these
  CAUSALIMG_TRACE_HOOKS=1  print every hook call and its result to stderr

A plugin's name is the last part of a built-in's module path (``axial``), an entry point's name
(``unequal-axial``) or a one-file plugin's file stem.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Literal

import pluggy

import causalimg
from causalimg.errors import ConfigError, PluginError
from causalimg.plugins import hookspecs
from causalimg.plugins.specs import SPEC_KINDS, PluginSpec
from causalimg.strict import StrictModel

PROJECT = "causalimg"
ENTRY_POINT_GROUP = "causalimg"
ENV_ONLY = "CAUSALIMG_PLUGINS_ONLY"
ENV_BLOCK = "CAUSALIMG_PLUGINS_BLOCK"
ENV_TRACE = "CAUSALIMG_TRACE_HOOKS"

# Built-in plugins: one module each, loaded in this order. Add a module with a one-line edit.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "causalimg.regions.axial",
    "causalimg.regions.landmarks",
    "causalimg.regions.grid",
    "causalimg.data.phantom",
    "causalimg.data.folder",
    "causalimg.mechanisms.flows",
    "causalimg.mechanisms.hvae",
    "causalimg.mechanisms.flow_matching",
    "causalimg.metrics.effectiveness",
    "causalimg.metrics.ground_truth",
    "causalimg.metrics.composition",
    "causalimg.metrics.reversibility",
    "causalimg.metrics.realism",
    "causalimg.guidance.regressor",
    "causalimg.guidance.segmentor",
    "causalimg.guidance.positional",
)

_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class PluginOrigin:
    """Where a plugin came from: shown by ``causalimg plugins`` and in every plugin error."""

    plugin: str
    distribution: str
    version: str = ""
    source: Literal["builtin", "entry-point", "file", "runtime"] = "runtime"

    def describe(self) -> str:
        dist = f"{self.distribution} {self.version}".strip() or "registered at run time"
        return f"plugin {self.plugin!r} ({dist})"


class CausalImgPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers each plugin's origin (distribution, version or file)."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, PluginOrigin] = {}

    def origin(self, plugin_name: str) -> PluginOrigin:
        return self.origins.get(plugin_name, PluginOrigin(plugin_name, ""))

    def register_plugin(self, plugin: object, origin: PluginOrigin) -> None:
        """Register one plugin; a clash or an invalid hook implementation is a PluginError."""
        clash = self.origins.get(origin.plugin)
        if clash is not None or self.has_plugin(origin.plugin):
            first = clash.describe() if clash else f"plugin {origin.plugin!r}"
            raise PluginError(f"two plugins are named {origin.plugin!r}: {first} and {origin.describe()}")
        try:
            self.register(plugin, name=origin.plugin)
        except (pluggy.PluginValidationError, ValueError) as err:
            raise PluginError(f"{origin.describe()} cannot be registered: {err}") from err
        self.origins[origin.plugin] = origin


def _names_from_env(variable: str) -> frozenset[str] | None:
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return None
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


class _Selection:
    """The ONLY / BLOCK environment filters; names that match no plugin are reported, not ignored."""

    def __init__(self) -> None:
        self.only = _names_from_env(ENV_ONLY)
        self.block = _names_from_env(ENV_BLOCK) or frozenset()
        self.seen: set[str] = set()

    def allows(self, name: str) -> bool:
        self.seen.add(name)
        return name not in self.block and (self.only is None or name in self.only)

    def check_unmatched(self) -> None:
        for variable, names in ((ENV_ONLY, self.only or frozenset()), (ENV_BLOCK, self.block)):
            for name in sorted(names - self.seen):
                raise PluginError(
                    f"{variable} names {name!r}, which is no known plugin{_did_you_mean(name, self.seen)}; "
                    f"known plugins: {', '.join(sorted(self.seen)) or '(none)'}"
                )


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _load_builtins(pm: CausalImgPluginManager, selection: _Selection) -> None:
    for module_path in BUILTIN_PLUGINS:
        name = module_path.rsplit(".", 1)[-1]
        if not selection.allows(name):
            continue
        origin = PluginOrigin(name, PROJECT, causalimg.__version__, "builtin")
        try:
            module = importlib.import_module(module_path)
        except Exception as err:
            raise PluginError(
                f"built-in {origin.describe()} failed to import module {module_path}: {type(err).__name__}: {err}"
            ) from err
        pm.register_plugin(module, origin)


def _load_entry_points(pm: CausalImgPluginManager, selection: _Selection) -> None:
    eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    for ep in eps:
        if not selection.allows(ep.name):
            continue
        dist = ep.dist
        origin = PluginOrigin(ep.name, dist.name if dist else "", dist.version if dist else "", "entry-point")
        try:
            plugin = ep.load()
        except (Exception, SystemExit) as err:  # a plugin calling sys.exit() must not end the run quietly
            raise PluginError(
                f"entry-point {origin.describe()} failed to load {ep.value!r}: {type(err).__name__}: {err}"
            ) from err
        pm.register_plugin(plugin, origin)


def _import_file(path: Path) -> ModuleType:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"causalimg_file_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None  # a *.py path always has a loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pydantic look their module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _load_files(pm: CausalImgPluginManager, selection: _Selection, plugin_dirs: Sequence[Path]) -> None:
    for directory in plugin_dirs:
        directory = Path(directory)
        if not directory.is_dir():
            raise PluginError(f"plugin directory {str(directory)!r} does not exist or is not a directory")
        for path in sorted(directory.glob("*.py")):
            if not selection.allows(path.stem):
                continue
            origin = PluginOrigin(path.stem, str(path.resolve()), "", "file")
            try:
                module = _import_file(path.resolve())
            except (Exception, SystemExit) as err:  # a plugin calling sys.exit() must not end the run quietly
                raise PluginError(
                    f"one-file plugin {str(path)!r} failed to import: {type(err).__name__}: {err}"
                ) from err
            pm.register_plugin(module, origin)


def _check_pending(pm: CausalImgPluginManager) -> None:
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        name = pm.get_name(err.plugin) or repr(err.plugin)
        raise PluginError(f"{pm.origin(name).describe()}: {err} (is the hook name misspelled?)") from err


def get_plugin_manager(plugin_dirs: Sequence[Path | str] = (), *, builtin_only: bool = False) -> CausalImgPluginManager:
    """A fresh manager with built-ins, entry points and one-file plugins from ``plugin_dirs``.

    ``builtin_only`` skips entry points and directories: what the generated docs describe.
    """
    pm = CausalImgPluginManager()
    selection = _Selection()
    _load_builtins(pm, selection)
    if not builtin_only:
        _load_entry_points(pm, selection)
        _load_files(pm, selection, [Path(d) for d in plugin_dirs])
    selection.check_unmatched()
    _check_pending(pm)
    if os.environ.get(ENV_TRACE, "").strip() not in ("", "0"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return pm


def registration_hooks() -> dict[str, type[PluginSpec]]:
    """Hook name -> record type, read from the return annotations in ``hookspecs``."""
    hooks: dict[str, type[PluginSpec]] = {}
    for name, function in vars(hookspecs).items():
        if not name.startswith(f"{PROJECT}_") or not callable(function):
            continue
        args = typing.get_args(typing.get_type_hints(function).get("return"))
        record = args[0] if len(args) == 1 else None
        if isinstance(record, type) and issubclass(record, PluginSpec):
            hooks[name] = record
    return hooks


def _checked_record(record: object, expected: type[PluginSpec], origin: PluginOrigin, hook: str) -> PluginSpec:
    where = f"{origin.describe()} hook {hook}"
    if not isinstance(record, expected):
        raise PluginError(f"{where} returned {record!r}; expected {expected.__name__} records")
    if not _NAME_PATTERN.match(record.name):
        raise PluginError(f"{where}: name {record.name!r} must be lower case letters, digits, '.', '_' or '-'")
    if not (isinstance(record.config, type) and issubclass(record.config, StrictModel)):
        raise PluginError(f"{where}: config of {record.name!r} must subclass causalimg.strict.StrictModel")
    annotation = record.config.model_fields["name"].annotation
    if typing.get_origin(annotation) is not Literal or typing.get_args(annotation) != (record.name,):
        raise PluginError(
            f"{where}: {record.config.__name__}.name must be annotated Literal[{record.name!r}], not {annotation!r}"
        )
    if not record.summary.strip() or "\n" in record.summary.strip():
        raise PluginError(f"{where}: {record.name!r} needs a one-line summary")
    return replace(record, provider=origin.describe())


class Registry:
    """Every registered component, per kind, as name -> record sorted by name.

    Sorted order makes every distributed rank (and every run) see the same components in the
    same order, whatever order plugins were installed in.
    """

    def __init__(
        self,
        specs: Mapping[str, Mapping[str, PluginSpec]],
        origins: Mapping[tuple[str, str], PluginOrigin] | None = None,
    ):
        kinds: dict[str, dict[str, PluginSpec]] = {spec_type.kind: {} for spec_type in SPEC_KINDS}
        for kind, by_name in specs.items():
            kinds[kind] = dict(sorted(by_name.items()))
        self._specs = MappingProxyType({kind: MappingProxyType(by_name) for kind, by_name in kinds.items()})
        self._origins = dict(origins or {})

    @classmethod
    def from_manager(cls, pm: pluggy.PluginManager) -> Registry:
        """Call every registration hook of every plugin once; all or nothing."""
        origins = dict(getattr(pm, "origins", {}))
        specs: dict[str, dict[str, PluginSpec]] = {spec_type.kind: {} for spec_type in SPEC_KINDS}
        providers: dict[tuple[str, str], PluginOrigin] = {}
        for hook, record_type in registration_hooks().items():
            caller = getattr(pm.hook, hook)
            for impl in caller.get_hookimpls():
                origin = origins.get(impl.plugin_name, PluginOrigin(impl.plugin_name, ""))
                others = [p for p in pm.get_plugins() if p is not impl.plugin]
                try:  # through pluggy, so CAUSALIMG_TRACE_HOOKS sees the call
                    results = pm.subset_hook_caller(hook, remove_plugins=others)()
                except Exception as err:
                    raise PluginError(
                        f"{origin.describe()} failed in hook {hook}: {type(err).__name__}: {err}"
                    ) from err
                for returned in results:
                    if not isinstance(returned, (list, tuple)):
                        raise PluginError(f"{origin.describe()} hook {hook} must return a list, got {returned!r}")
                    for record in returned:
                        record = _checked_record(record, record_type, origin, hook)
                        existing = specs[record_type.kind].get(record.name)
                        if existing is not None:
                            raise PluginError(
                                f"{record_type.kind} {record.name!r} is registered twice: by "
                                f"{existing.provider} and by {record.provider}"
                            )
                        specs[record_type.kind][record.name] = record
                        providers[record_type.kind, record.name] = origin
        return cls(specs, providers)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def specs(self, kind: str) -> Mapping[str, PluginSpec]:
        """name -> record for one kind, sorted by name (empty when no plugin provides the kind)."""
        if kind not in self._specs:
            raise ConfigError(f"unknown plugin kind {kind!r}; kinds: {', '.join(self._specs)}")
        return self._specs[kind]

    def names(self, kind: str) -> tuple[str, ...]:
        return tuple(self.specs(kind))

    def get(self, kind: str, name: str) -> PluginSpec:
        """The record of ``name``; an unknown name is a ConfigError with the valid names."""
        by_name = self.specs(kind)
        if name in by_name:
            return by_name[name]
        if not by_name:
            raise ConfigError(
                f"no {kind} plugins are registered, so {name!r} is unavailable "
                "(`causalimg plugins` lists what is loaded)"
            )
        raise ConfigError(f"unknown {kind} {name!r}{_did_you_mean(name, by_name)}; valid names: {', '.join(by_name)}")

    def origin(self, kind: str, name: str) -> PluginOrigin:
        """The plugin, distribution and version that provide a component."""
        self.get(kind, name)
        return self._origins.get((kind, name), PluginOrigin("", ""))

    def __iter__(self) -> Iterator[PluginSpec]:
        for by_name in self._specs.values():
            yield from by_name.values()

    def __len__(self) -> int:
        return sum(len(by_name) for by_name in self._specs.values())


def registry(pm: pluggy.PluginManager) -> Registry:
    """Shorthand for :meth:`Registry.from_manager`."""
    return Registry.from_manager(pm)


def load_registry(plugin_dirs: Sequence[Path | str] = ()) -> Registry:
    """Load every plugin and collect its components: what the command line and the run use."""
    return Registry.from_manager(get_plugin_manager(plugin_dirs))
