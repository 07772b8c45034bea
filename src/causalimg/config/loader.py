"""Load a run config from YAML or TOML plus ``--set a.b.c=value`` overrides, and explain mistakes.

Every problem is a :class:`ConfigError` whose message names the file (or the ``--set`` override),
the dotted field, the bad value and what would be valid, so the command line can print it and exit
2 without a traceback. Config files are untrusted input: their size, their nesting, what YAML
aliases expand to and the length of every message are bounded, and a key given twice is an error.
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
import re
import stat
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from causalimg.config.run import PLUGIN_SECTIONS, RunConfig, build_run_config_model, config_checks
from causalimg.config.sections import PluginsSection
from causalimg.errors import ConfigError
from causalimg.plugins.manager import Registry, load_registry

SHIPPED_CONFIGS = "causalimg.configs"
_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml"}

# Limits on untrusted config input. A shipped config is under 2 KB, 6 levels deep, 200 values.
MAX_CONFIG_BYTES = 256 * 1024  # the pure-Python YAML parser reads about 100 KB/s on a busy core
MAX_DEPTH = 32  # nesting of mappings and lists, aliases expanded
MAX_VALUES = 100_000  # scalars, lists and mappings, every alias counted as what it repeats
MAX_ERRORS = 5  # problems listed in one message; the rest are counted
MAX_LINE = 300  # characters of one listed problem (five fit the command line's 2,000-character cap)
_MERGE_TAG = "tag:yaml.org,2002:merge"


def abbreviate(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters with the count of what was left out."""
    if len(text) <= limit:
        return text
    return f"{text[: max(limit - 25, 10)]}... ({len(text):,} characters)"


def _short(value: Any, limit: int = 60) -> str:
    """A value as the user would type it in Python, abbreviated (a message never echoes a file)."""
    try:
        text = repr(value) if not isinstance(value, (Mapping, list, tuple)) or _small(value) else None
    except RecursionError:
        text = None
    return abbreviate(text, limit) if text is not None else f"<{type(value).__name__} of {len(value):,} items>"


def _small(value: Any, budget: int = 200) -> bool:
    """Whether a nested value has few enough items to repr (an alias-expanded value could be huge)."""
    stack = [value]
    while stack:
        item = stack.pop()
        budget -= 1
        if budget < 0:
            return False
        if isinstance(item, Mapping):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            stack += list(item)
    return True


def _named(path: str | os.PathLike[str] | Any, limit: int = 120) -> str:
    return repr(abbreviate(str(path), limit))


def resolve_config_path(name: str | os.PathLike[str]) -> Path:
    """An existing file, or the bare name of a shipped config (``quickstart`` -> configs/quickstart.yaml)."""
    path = Path(name)
    try:
        exists = path.exists()
    except (OSError, ValueError) as err:  # a NUL byte, a name too long for the file system
        reason = getattr(err, "strerror", None) or str(err)
        raise ConfigError(f"config {_named(name)} is not a usable path: {abbreviate(reason, 100)}") from None
    if exists:
        return path
    if path.suffix == "" and path.name == str(name):
        if str(name) in shipped_configs():
            return Path(str(importlib.resources.files(SHIPPED_CONFIGS) / f"{name}.yaml"))
        raise ConfigError(
            f"config {_named(name)} is neither a file nor a shipped config ({', '.join(shipped_configs()) or 'none'})"
        )
    raise ConfigError(f"config file {_named(path)} does not exist")


def shipped_configs() -> tuple[str, ...]:
    """Names of the configs shipped with causalimg, usable as ``--config NAME``."""
    try:
        root = importlib.resources.files(SHIPPED_CONFIGS)
    except ModuleNotFoundError:
        return ()
    return tuple(sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml")))


def read_config_file(path: Path) -> dict[str, Any]:
    """The raw mapping in a YAML or TOML file, within the limits on size, nesting and expansion."""
    kind = _SUFFIXES.get(path.suffix.lower())
    name = _named(path)
    if kind is None:
        raise ConfigError(f"config file {name}: unknown format {_named(path.suffix, 20)}; use .yaml, .yml or .toml")
    data = _read_limited(path, name)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise ConfigError(f"config file {name} is binary, not UTF-8 text")
    if not text.strip():
        raise ConfigError(f"config file {name} is empty")
    try:
        raw = tomllib.loads(text) if kind == "toml" else load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {name}{_yaml_where(err)}: invalid YAML: {_yaml_problem(err)}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {name}: invalid TOML: {_toml_problem(err, text)}") from None
    except ValueError as err:  # tomllib: an integer longer than Python reads from text
        raise ConfigError(f"config file {name}: invalid TOML: {abbreviate(str(err).split(';')[0], 200)}") from None
    except RecursionError:
        raise ConfigError(f"config file {name}: invalid {kind.upper()}: nested too deeply") from None
    if raw is None:
        raise ConfigError(f"config file {name} holds only comments; it needs a mapping of sections")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {name} must hold a mapping of sections, not a {type(raw).__name__}")
    depth = _depth(raw)
    if depth > MAX_DEPTH:
        raise ConfigError(f"config file {name}: nested {depth} levels deep; a config may nest {MAX_DEPTH}")
    return raw


def _read_limited(path: Path, name: str) -> bytes:
    """The file's bytes; a file above MAX_CONFIG_BYTES is refused after reading that much at most,
    and anything but a regular file before it is opened (a FIFO would block, a device never end)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise ConfigError(f"config file {name} is not a regular file")
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"config file {name} cannot be read: {err.strerror or type(err).__name__}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file {name} has {max(size, len(data)):,} bytes; the limit for a config is "
            f"{MAX_CONFIG_BYTES:,} bytes ({MAX_CONFIG_BYTES // 1024} KiB)"
        )
    return data


def _yaml_where(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _yaml_problem(err: yaml.YAMLError) -> str:
    return abbreviate(str(getattr(err, "problem", None) or err), 200)


def _toml_problem(err: tomllib.TOMLDecodeError, text: str) -> str:
    """tomllib's message (it names line and column) and the line it points at, abbreviated."""
    problem = abbreviate(str(err), 200)
    found = re.search(r"line (\d+)", str(err))
    lines = text.splitlines()
    if found and 0 < int(found.group(1)) <= len(lines):
        problem += f": {abbreviate(lines[int(found.group(1)) - 1].strip(), 80)!r}"
    return problem


def _depth(value: Any) -> int:
    """Nesting depth of parsed mappings and lists (iterative: TOML has no aliases, YAML's are checked)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                stack += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return deepest


class ConfigYAMLLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for untrusted configs: nesting is bounded while composing, a key given
    twice in one mapping is an error (TOML refuses it too; PyYAML keeps the last silently), and the
    document is refused before it is built when its aliases would expand it past ``MAX_VALUES``
    values or ``MAX_DEPTH`` levels (a billion-laughs file is a few hundred bytes of aliases)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nesting = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._nesting += 1
        try:
            if self._nesting > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._nesting -= 1

    def compose_mapping_node(self, anchor: str | None) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], Node] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag == _MERGE_TAG:
                continue
            first = seen.setdefault((key.tag, key.value), key)
            if first is not key:
                raise ComposerError(
                    None,
                    None,
                    f"key {abbreviate(key.value)!r} is given twice in one mapping: on line {_line(first)} "
                    f"and on line {_line(key)}",
                    key.start_mark,
                )
        return node

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        """PyYAML's constructors let a value that does not fit its explicit tag (``!!float k``,
        ``!!float ''``, ``!!timestamp x``) escape as a ValueError, IndexError or AttributeError;
        here any of them is a YAML error at the value (nesting is bounded, so no RecursionError)."""
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception:
            value = f" {abbreviate(node.value, 40)!r}" if isinstance(node, ScalarNode) else ""
            problem = f"the value{value} cannot be read as {node.tag.rsplit(':', 1)[-1]}"
            raise ConstructorError(None, None, problem, node.start_mark) from None

    def construct_yaml_int(self, node: ScalarNode) -> int:
        """An integer; one longer than Python reads from text (4,300 digits) is a YAML error."""
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            if len(node.value) <= sys.get_int_max_str_digits():
                raise  # not a number at all (``!!int x``): construct_object says so
            limit = f"{sys.get_int_max_str_digits():,}"
            problem = f"an integer of {len(node.value):,} digits (Python reads at most {limit})"
            raise ConstructorError(None, None, problem, node.start_mark) from None


ConfigYAMLLoader.add_constructor("tag:yaml.org,2002:int", ConfigYAMLLoader.construct_yaml_int)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _check_expansion(root: Node) -> None:
    """Count the values the document would hold with every alias expanded, without expanding it:
    each node is measured once (its size and height are memoised), so the check is linear in the
    file while the expanded document may be exponential in it."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels)
    open_nodes: set[int] = set()

    def measure(node: Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in open_nodes:
            raise ComposerError(None, None, "an alias refers to a collection that contains it", node.start_mark)
        if key not in measured:
            if depth > MAX_DEPTH:
                raise ComposerError(None, None, f"aliases nest it deeper than {MAX_DEPTH} levels", node.start_mark)
            open_nodes.add(key)
            values, levels = 1, 0
            children = node.value if isinstance(node, SequenceNode) else []
            if isinstance(node, MappingNode):
                children = [child for pair in node.value for child in pair]
            for child in children:
                size, height = measure(child, depth + 1)
                values, levels = values + size, max(levels, height)
                if values > MAX_VALUES:
                    raise ComposerError(
                        None,
                        None,
                        f"its aliases expand it to more than {MAX_VALUES:,} values (a config holds a few hundred)",
                        node.start_mark,
                    )
            open_nodes.discard(key)
            measured[key] = (values, levels + 1)
        values, height = measured[key]
        if depth + height - 1 > MAX_DEPTH:
            raise ComposerError(None, None, f"aliases nest it deeper than {MAX_DEPTH} levels", node.start_mark)
        return values, height

    measure(root, 1)


def load_yaml(text: str) -> Any:
    """``text`` read by :class:`ConfigYAMLLoader` (safe tags only, bounded, no repeated keys)."""
    loader = ConfigYAMLLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"a.b.c=value"`` -> (("a", "b", "c"), value); the value is read as YAML (a scalar, a list
    or a whole section such as ``{name: folder, path: data}``), with the limits of config files."""
    key, sep, value = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(part.strip() for part in parts):
        raise ConfigError(f"override {_named(text)} is not of the form section.field=value (for example run.seed=1)")
    try:
        parsed = load_yaml(value) if value.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {_named(text)}: the value is not valid YAML: {_yaml_problem(err)}") from None
    except RecursionError:
        raise ConfigError(f"override {_named(text)}: the value is nested too deeply") from None
    return tuple(part.strip() for part in parts), parsed


def _selects_component(parts: Sequence[str]) -> bool:
    """Whether ``parts`` is where a config selects a component by ``name``: a plugin section, one
    term of a fine-tuning strategy or one metric."""
    return (
        (len(parts) == 1 and parts[0] in PLUGIN_SECTIONS)
        or (len(parts) == 2 and parts[0] == "compare_mechanisms")
        or (len(parts) == 4 and tuple(parts[:2]) == ("finetune", "strategies"))
        or (len(parts) == 3 and tuple(parts[:2]) == ("evaluate", "metrics"))
    )


def switched_components(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[tuple[str, ...], str]:
    """The component sections whose ``name`` an override changes, each with that override: such a
    section starts from the new component's defaults, since the old one's fields mean nothing to it
    (``--set data.name=folder`` must not keep the phantom's ``n_train``)."""
    final: dict[tuple[str, ...], tuple[Any, str]] = {}
    for text in overrides:
        parts, value = parse_override(text)
        if parts[-1] == "name" and _selects_component(parts[:-1]):
            final[parts[:-1]] = (value, text)
        else:  # a later whole-section override replaces the section anyway
            for section in [s for s in final if parts == s[: len(parts)]]:
                del final[section]
    switched = {}
    for section, (value, text) in final.items():
        current = _lookup(raw, section)
        current_name = current.get("name") if isinstance(current, Mapping) else current
        if current is not None and current_name != value:
            switched[section] = text
    return switched


def _lookup(raw: Any, parts: Sequence[str]) -> Any:
    """The value at ``parts`` in a raw config, or None; list items by index."""
    node = raw
    for part in parts:
        if isinstance(node, Mapping):
            node = node.get(part)
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each override set; missing mappings on the way are created. A
    component section whose ``name`` an override changes is emptied first (``switched_components``),
    so it holds the new name and the other overrides given for it, whatever their order."""
    overrides = list(overrides)
    result = _deep_copy(raw)
    for section in switched_components(raw, overrides):
        *parents, last = section
        parent = _lookup(result, parents)
        if isinstance(parent, dict):
            parent[last] = {}
        elif isinstance(parent, list):
            parent[int(last)] = {}
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
            raise ConfigError(f"override {_named(text)}: {abbreviate(where)} is {_short(node[part])}, not a section")
        return node.setdefault(part, {})
    if isinstance(node, list):
        return node[_index(node, part, text, where)]
    raise ConfigError(f"override {_named(text)}: {abbreviate(where)} cannot be reached")


def _assign(node: Any, part: str, value: Any, text: str) -> None:
    if isinstance(node, dict):
        node[part] = value
    else:  # a list: _child only descends into dicts and lists
        node[_index(node, part, text, part)] = value


def _index(node: list, part: str, text: str, where: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(
            f"override {_named(text)}: {_named(where, 40)} is not an index of a list of {len(node)} items"
        )
    return int(part)


def _dotted(loc: Sequence[int | str], raw: Any) -> list[str]:
    """Pydantic's location as the parts of a dotted path the user can type, without union tags."""
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
    return parts


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
    switched: Mapping[tuple[str, ...], str] | None = None,
) -> ConfigError:
    """One line per problem, ``dotted.field = value: message``, naming the ``--set`` override that
    gave the value (or switched its section to another component); at most MAX_ERRORS lines of at
    most MAX_LINE characters, values abbreviated."""
    origins = {parse_override(text)[0]: text for text in overrides}
    origins.update(switched or {})  # a switched section's missing or unknown fields come from that override
    errors = err.errors(include_url=False)
    lines, from_file, from_set = [], False, False
    for error in errors[:MAX_ERRORS]:
        parts, value = _dotted(error["loc"], raw), error["input"]
        message = _message(error)
        if error["type"] in ("value_error", "assertion_error") and isinstance(value, Mapping):
            # a model validator's error, pointed at the field it names: a dotted path it starts with, or a key
            path, whole = _path_named_in(message, parts, raw)
            field = None if path else _field_named_in(message, value)
            if path:
                parts, value = path, _lookup(raw, path)
                message = message.split(": ", 1)[1] if whole else message  # the line starts with the path
            elif field is not None:
                parts, value = [*parts, field], value[field]
        where = ".".join(abbreviate(part, 40) for part in parts) or "(top level)"
        if error["type"] == "missing":
            head = f"{where}: missing"
            kind = PLUGIN_SECTIONS.get(where)
            if kind and registry is not None:
                names = registry.names(kind)
                message = (
                    f"choose a {kind} by name: {', '.join(names)}" if names else f"no {kind} plugins are registered"
                )
        elif error["type"] == "extra_forbidden":
            head = f"{where}: unknown field"
            message = _unknown_field_message(model, error["loc"])
        elif error["type"] in ("unknown_plugin", "no_plugins") and isinstance(value, Mapping):
            head = f"{where}.name = {_short(value.get('name'))}"
        else:
            found = _lookup(raw, parts)  # the value as the user wrote it, not as a validator saw it
            head = f"{where} = {_short(value if found is None else found)}"
        origin = _origin(parts, origins)
        suffix = "" if origin is None else f" (from --set {abbreviate(origin, 80)})"
        from_file, from_set = from_file or origin is None, from_set or origin is not None
        lines.append(abbreviate(f"  {head}: {message}", MAX_LINE - len(suffix)) + suffix)
    if len(errors) > MAX_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS} more")
    count = f"{len(errors)} error{'s' * (len(errors) != 1)}"
    name = abbreviate(source, 120)
    where = f"{name} and --set" if from_file and from_set else "from --set" if from_set else name
    return ConfigError(f"invalid config {where} ({count}):\n" + "\n".join(lines))


def _message(error: Mapping[str, Any]) -> str:
    """Pydantic's message without its "Value error, " prefix: the validator's own words."""
    cause = error.get("ctx", {}).get("error") if error["type"] in ("value_error", "assertion_error") else None
    return abbreviate(str(cause) if cause is not None else str(error["msg"]), MAX_LINE)


def _path_named_in(message: str, parts: Sequence[str], raw: Mapping[str, Any]) -> tuple[list[str] | None, bool]:
    """The deepest existing field below ``parts`` of the dotted path a message starts with
    (``finetune.per_mechanism: ...``, or relative to ``parts``), and whether all of that path exists."""
    head = re.match(r"[\w-]+(?:\.[\w-]+)*(?=: )", message)
    if head is None:
        return None, False
    named = head.group().split(".")
    if named[: len(parts)] != list(parts):  # a path relative to the section that failed
        named = [*parts, *named]
    deepest = None
    for end in range(len(parts) + 1, len(named) + 1):
        if _lookup(raw, named[:end]) is None:
            break
        deepest = named[:end]
    return deepest, deepest == named


def _field_named_in(message: str, section: Mapping[str, Any]) -> str | None:
    """The field of ``section`` that a model validator's message names first, if any."""
    positions = {}
    for key in section:
        if isinstance(key, str) and key != "name" and len(key) < 100:
            found = re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message)
            if found:
                positions[key] = found.start()
    return min(positions, key=positions.__getitem__) if positions else None


def _origin(parts: Sequence[str], origins: Mapping[tuple[str, ...], str]) -> str | None:
    """The override that set this value (or a section holding it), else one that set a value inside it."""
    parts = tuple(parts)
    inside = [path for path in origins if parts[: len(path)] == path]
    if inside:
        return origins[max(inside, key=len)]
    return next((text for path, text in origins.items() if path[: len(parts)] == parts), None)


def validate_config(
    raw: Mapping[str, Any],
    registry: Registry,
    source: str = "<config>",
    overrides: Sequence[str] = (),
    switched: Mapping[tuple[str, ...], str] | None = None,
) -> RunConfig:
    """Validate a raw mapping against the run config built from ``registry`` and run the checks
    the fields cannot make alone (``config_checks``); resolve ``run.dir``."""
    model = build_run_config_model(registry)
    try:
        config = model.model_validate(raw)
        problems = config_checks(config)
        if problems:
            raise ValidationError.from_exception_data(model.__name__, problems)
    except ValidationError as err:
        raise format_validation_error(err, raw, source, overrides, registry, model, switched) from None
    return _resolve_run_dir(config, source)


def _resolve_run_dir(config: Any, source: str) -> Any:
    run_dir = Path(config.run.dir)
    if run_dir.is_absolute():
        return config
    try:
        cwd = Path.cwd().resolve()
        resolved = (cwd / run_dir).resolve()
    except (OSError, ValueError) as err:  # a NUL byte, a symlink loop
        reason = abbreviate(getattr(err, "strerror", None) or str(err), 100)
        raise ConfigError(
            f"invalid config {source}: run.dir = {_named(run_dir)} is not a usable path: {reason}"
        ) from None
    if not resolved.is_relative_to(cwd):
        raise ConfigError(
            f"invalid config {source}: run.dir = {_named(run_dir)} leaves the working directory {_named(cwd)}; "
            "give an absolute path to write there"
        )
    return config.model_copy(update={"run": config.run.model_copy(update={"dir": resolved})})


class _PluginsOnly(BaseModel):
    """The ``plugins`` section alone: read before the plugins it names are loaded."""

    model_config = ConfigDict(extra="ignore")
    plugins: PluginsSection = PluginsSection()


def plugin_dirs_of(raw: Mapping[str, Any], source: str, overrides: Sequence[str] = ()) -> tuple[Path, ...]:
    """The one-file plugin directories a raw config asks for."""
    try:
        return _PluginsOnly.model_validate(raw).plugins.dirs
    except ValidationError as err:
        raise format_validation_error(err, raw, source, overrides, model=_PluginsOnly) from None


def load_config(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), registry: Registry | None = None
) -> RunConfig:
    """Read ``path`` (a file or a shipped config name), apply overrides, load plugins, validate."""
    file = resolve_config_path(path)
    from_file = read_config_file(file)
    raw = apply_overrides(from_file, overrides)
    source = str(file)
    if registry is None:
        registry = load_registry(plugin_dirs_of(raw, source, overrides))
    return validate_config(raw, registry, source, overrides, switched_components(from_file, overrides))


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
