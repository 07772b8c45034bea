"""Load a run config from YAML or TOML plus ``--set a.b.c=value`` overrides, and explain mistakes.

Every problem is a :class:`ConfigError` whose message names the file, the dotted field, the bad
value and what would be valid, so the command line can print it and exit 2 without a traceback.
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from causalimg.config.run import PLUGIN_SECTIONS, build_run_config_model
from causalimg.config.sections import PluginsSection
from causalimg.errors import ConfigError
from causalimg.plugins.manager import Registry, load_registry
from causalimg.strict import StrictModel

SHIPPED_CONFIGS = "causalimg.configs"
_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml"}


def resolve_config_path(name: str | os.PathLike[str]) -> Path:
    """An existing file, or the bare name of a shipped config (``quickstart`` -> configs/quickstart.yaml)."""
    path = Path(name)
    if path.exists():
        return path
    if path.suffix == "" and path.name == str(name):
        if str(name) in shipped_configs():
            return Path(str(importlib.resources.files(SHIPPED_CONFIGS) / f"{name}.yaml"))
        raise ConfigError(
            f"config {str(name)!r} is neither a file nor a shipped config ({', '.join(shipped_configs()) or 'none'})"
        )
    raise ConfigError(f"config file {str(path)!r} does not exist")


def shipped_configs() -> tuple[str, ...]:
    """Names of the configs shipped with causalimg, usable as ``--config NAME``."""
    try:
        root = importlib.resources.files(SHIPPED_CONFIGS)
    except ModuleNotFoundError:
        return ()
    return tuple(sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml")))


def read_config_file(path: Path) -> dict[str, Any]:
    """The raw mapping in a YAML or TOML file (YAML through ``safe_load`` only)."""
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"config file {str(path)!r}: unknown format {path.suffix!r}; use .yaml, .yml or .toml")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise ConfigError(f"config file {str(path)!r} is binary, not UTF-8 text")
    if not text.strip():
        raise ConfigError(f"config file {str(path)!r} is empty")
    try:
        raw = tomllib.loads(text) if kind == "toml" else yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r}{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(path)!r}: invalid TOML: {err}") from None
    if raw is None:
        raise ConfigError(f"config file {str(path)!r} holds only comments; it needs a mapping of sections")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, not a {type(raw).__name__}")
    return raw


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"a.b.c=value"`` -> (("a", "b", "c"), value); the value is read as a YAML scalar or list."""
    key, sep, value = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(part.strip() for part in parts):
        raise ConfigError(f"override {text!r} is not of the form section.field=value (for example run.seed=1)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {getattr(err, 'problem', err)}") from None
    return tuple(part.strip() for part in parts), parsed


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each override set; missing mappings on the way are created."""
    result = _deep_copy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = result
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, text, ".".join(parts[: depth + 1]))
        _assign(node, parts[-1], value, text)
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _child(node: Any, part: str, text: str, where: str) -> Any:
    if isinstance(node, dict):
        if isinstance(node.get(part), str):  # plugin shorthand: `regions: grid` is {name: grid}
            node[part] = {"name": node[part]}
        if not isinstance(node.get(part, {}), (dict, list)):
            raise ConfigError(f"override {text!r}: {where} is {node[part]!r}, not a section")
        return node.setdefault(part, {})
    if isinstance(node, list):
        return node[_index(node, part, text, where)]
    raise ConfigError(f"override {text!r}: {where} cannot be reached")


def _assign(node: Any, part: str, value: Any, text: str) -> None:
    if isinstance(node, dict):
        node[part] = value
    else:  # a list: _child only descends into dicts and lists
        node[_index(node, part, text, part)] = value


def _index(node: list, part: str, text: str, where: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"override {text!r}: {where!r} is not an index of a list of {len(node)} items")
    return int(part)


def _dotted(loc: Sequence[int | str], raw: Any) -> str:
    """Pydantic's location as a dotted path the user can type, without discriminator tags."""
    parts: list[str] = []
    node = raw
    for part in loc:
        if isinstance(node, Mapping) and part not in node and node.get("name") == part:
            continue  # the union tag pydantic inserts after a plugin section
        parts.append(str(part))
        if isinstance(node, Mapping):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return ".".join(parts) or "(top level)"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_at(model: Any, loc: Sequence[int | str]) -> Any:
    """The type found at ``loc`` (following pydantic's locations, union tags included) or None."""
    node = model
    for part in loc:
        while get_origin(node) is Annotated:
            node = get_args(node)[0]
        if isinstance(node, type) and issubclass(node, BaseModel):
            if part not in node.model_fields and part == _tag(node):
                continue  # a one-member plugin union: pydantic still inserts the tag
            field = node.model_fields.get(str(part))
            node = field.annotation if field else None
        elif get_origin(node) in (list, tuple, dict):
            node = get_args(node)[-1]
        elif get_origin(node) is Union:
            tagged = [m for m in get_args(node) if _tag(m) == part]
            node = tagged[0] if tagged else None
        else:
            return None
    while get_origin(node) is Annotated:
        node = get_args(node)[0]
    return node


def _tag(member: Any) -> Any:
    field = getattr(member, "model_fields", {}).get("name")
    args = get_args(field.annotation) if field and get_origin(field.annotation) is Literal else ()
    return args[0] if len(args) == 1 else None


def _unknown_field_message(model: Any, loc: Sequence[int | str]) -> str:
    parent = _model_at(model, loc[:-1]) if model is not None else None
    if not (isinstance(parent, type) and issubclass(parent, BaseModel)):
        return "not a field of this section (see `causalimg schema`)"
    fields = list(parent.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"not a field of this section; {hint}fields: {', '.join(fields)}"


def format_validation_error(
    err: ValidationError,
    raw: Mapping[str, Any],
    source: str,
    overrides: Sequence[str] = (),
    registry: Registry | None = None,
    model: Any = None,
) -> ConfigError:
    """One line per problem: ``dotted.field = value: message`` (and the override that set it)."""
    set_paths = {".".join(parse_override(text)[0]): text for text in overrides}
    lines = []
    for error in err.errors(include_url=False):
        where = _dotted(error["loc"], raw)
        message = error["msg"]
        if error["type"] == "missing":
            line = f"{where}: missing"
            kind = PLUGIN_SECTIONS.get(where)
            if kind and registry is not None:
                names = registry.names(kind)
                message = (
                    f"choose a {kind} by name: {', '.join(names)}" if names else f"no {kind} plugins are registered"
                )
        elif error["type"] == "extra_forbidden":
            line = f"{where}: unknown field"
            message = _unknown_field_message(model, error["loc"])
        elif error["type"] in ("unknown_plugin", "no_plugins") and isinstance(error["input"], Mapping):
            line = f"{where}.name = {_short(error['input'].get('name'))}"
        else:
            line = f"{where} = {_short(error['input'])}"
        line = f"  {line}: {message}"
        origin = next((text for path, text in set_paths.items() if path == where or where.startswith(path + ".")), None)
        if origin:
            line += f" (from --set {origin})"
        lines.append(line)
    count = len(lines)
    return ConfigError(f"invalid config {source} ({count} error{'s' * (count != 1)}):\n" + "\n".join(lines))


def validate_config(
    raw: Mapping[str, Any], registry: Registry, source: str = "<config>", overrides: Sequence[str] = ()
) -> StrictModel:
    """Validate a raw mapping against the run config built from ``registry``; resolve ``run.dir``."""
    model = build_run_config_model(registry)
    try:
        config = model.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err, raw, source, overrides, registry, model) from None
    return _resolve_run_dir(config, source)


def _resolve_run_dir(config: Any, source: str) -> Any:
    run_dir = Path(config.run.dir)
    if run_dir.is_absolute():
        return config
    cwd = Path.cwd().resolve()
    resolved = (cwd / run_dir).resolve()
    if not resolved.is_relative_to(cwd):
        raise ConfigError(
            f"invalid config {source}: run.dir = {str(run_dir)!r} leaves the working directory {str(cwd)!r}; "
            "give an absolute path to write there"
        )
    return config.model_copy(update={"run": config.run.model_copy(update={"dir": resolved})})


class _PluginsOnly(BaseModel):
    """The ``plugins`` section alone: read before the plugins it names are loaded."""

    model_config = ConfigDict(extra="ignore")
    plugins: PluginsSection = PluginsSection()


def plugin_dirs_of(raw: Mapping[str, Any], source: str) -> tuple[Path, ...]:
    """The one-file plugin directories a raw config asks for."""
    try:
        return _PluginsOnly.model_validate(raw).plugins.dirs
    except ValidationError as err:
        raise format_validation_error(err, raw, source, model=_PluginsOnly) from None


def load_config(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), registry: Registry | None = None
) -> StrictModel:
    """Read ``path`` (a file or a shipped config name), apply overrides, load plugins, validate."""
    file = resolve_config_path(path)
    raw = apply_overrides(read_config_file(file), overrides)
    source = str(file)
    if registry is None:
        registry = load_registry(plugin_dirs_of(raw, source))
    return validate_config(raw, registry, source, overrides)


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
