"""The ``causalimg`` command: inspect plugins, validate configs, print the config schema.

Subcommands live in the ``COMMANDS`` table. Adding one is a function that adds its arguments, a
function that runs it and one ``Command(...)`` line; a long-running command imports its heavy
modules inside ``run`` so that ``causalimg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from causalimg import __version__
from causalimg.errors import CausalImgError


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares it, ``run(args) -> exit status`` runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_config_arguments(parser: argparse.ArgumentParser, *, flag: bool = False) -> None:
    """The config file (or shipped config name) and repeatable ``--set a.b=value`` overrides."""
    from causalimg.config.loader import shipped_configs

    config_help = f"a YAML/TOML file or the name of a shipped config ({', '.join(shipped_configs()) or 'none'})"
    if flag:
        parser.add_argument("--config", required=True, help=config_help)
    else:
        parser.add_argument("config", help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="A.B=VALUE",
        help="override one field, value read as YAML (repeatable), e.g. --set finetune.train.steps=10",
    )


def add_plugin_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugins-dir",
        dest="plugin_dirs",
        action="append",
        default=[],
        metavar="DIR",
        help="also load the one-file plugins in DIR (repeatable), as the config's plugins.dirs does",
    )


def _plugins_arguments(parser: argparse.ArgumentParser) -> None:
    add_plugin_dir_argument(parser)
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")


def _plugins(args: argparse.Namespace) -> int:
    from causalimg.plugins.manager import load_registry

    registry = load_registry(args.plugin_dirs)
    rows = []
    for spec in registry:
        origin = registry.origin(spec.kind, spec.name)
        rows.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "summary": spec.summary,
                "plugin": origin.plugin,
                "distribution": origin.distribution,
                "version": origin.version,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_table(rows, ("name", "kind", "distribution", "version", "summary")) if rows else "no plugins loaded")
    return 0


def _table(rows: list[dict[str, str]], columns: Sequence[str]) -> str:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


def _validate_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--show", action="store_true", help="print the resolved config as YAML")


def _validate(args: argparse.Namespace) -> int:
    from causalimg.config.loader import dump_config, load_config

    config = load_config(args.config, args.overrides)
    from causalimg.plugins.manager import load_registry  # torch and the plugins: only for a config that parsed
    from causalimg.preflight import preflight

    for note in preflight(config, load_registry(config.plugins.dirs)):  # what the run would refuse before its stages
        print(f"note: {note}", file=sys.stderr)
    if args.show:
        print(dump_config(config), end="")
    print(f"{args.config}: valid", file=sys.stderr)
    return 0


def _schema_arguments(parser: argparse.ArgumentParser) -> None:
    add_plugin_dir_argument(parser)
    parser.add_argument("--markdown", action="store_true", help="print the config reference as markdown")
    parser.add_argument(
        "--builtin-only",
        action="store_true",
        help="only the built-in plugins' sections (how docs/config.md is generated)",
    )


def _schema(args: argparse.Namespace) -> int:
    from causalimg.config.reference import config_markdown
    from causalimg.config.run import build_run_config_model
    from causalimg.plugins.manager import Registry, get_plugin_manager

    registry = Registry.from_manager(get_plugin_manager(args.plugin_dirs, builtin_only=args.builtin_only))
    model = build_run_config_model(registry)
    if args.markdown:
        print(config_markdown(model), end="")
    else:
        print(json.dumps(model.model_json_schema(), indent=2))
    return 0


def _contact_sheet_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    parser.add_argument("-n", type=int, default=6, help="number of samples (default 6)")
    parser.add_argument("--out", default="contact_sheet.png", help="PNG to write (default contact_sheet.png)")


def _contact_sheet(args: argparse.Namespace) -> int:
    from pathlib import Path

    from causalimg.builder import Builder
    from causalimg.config.loader import load_config
    from causalimg.plugins.manager import load_registry
    from causalimg.report.contact_sheet import render_contact_sheet

    config = load_config(args.config, args.overrides)
    source = Builder(config, load_registry(config.plugins.dirs)).data_source(Path(config.run.dir) / "data")
    print(render_contact_sheet(source, args.split, args.n, args.out))
    return 0


def _export_phantom_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="folder to write (DIR/<split>/*.npz and DIR/dataset.json)")
    parser.add_argument("--splits", default="train,val,test", help="comma-separated splits (default train,val,test)")


def _export_phantom(args: argparse.Namespace) -> int:
    from pathlib import Path

    from causalimg.builder import Builder
    from causalimg.config.loader import load_config
    from causalimg.data.phantom import PhantomSource
    from causalimg.data.phantom_export import export_phantom
    from causalimg.errors import ConfigError
    from causalimg.plugins.manager import load_registry

    config = load_config(args.config, args.overrides)
    source = Builder(config, load_registry(config.plugins.dirs)).data_source(Path(config.run.dir) / "data")
    if not isinstance(source, PhantomSource):
        raise ConfigError(f"export-phantom exports the phantom; data.name is {config.data.name!r}")
    for folder in export_phantom(source, Path(args.out), [s.strip() for s in args.splits.split(",") if s.strip()]):
        print(folder)
    return 0


COMMANDS: tuple[Command, ...] = (
    Command("plugins", "list registered components with their distribution", _plugins_arguments, _plugins),
    Command("validate", "check a config and its overrides", _validate_arguments, _validate),
    Command("schema", "print the JSON schema of the run config", _schema_arguments, _schema),
    Command(
        "contact-sheet",
        "render data-set samples with masks and regions to a PNG",
        _contact_sheet_arguments,
        _contact_sheet,
    ),
    Command("export-phantom", "write the phantom as a folder data set", _export_phantom_arguments, _export_phantom),
)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="causalimg", description="Inspect plugins, validate configs and print the config schema."
    )
    parser.add_argument("--version", action="version", version=f"causalimg {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


MAX_MESSAGE = 2000  # characters of one error message: a message never echoes a whole input


def report_errors(run: Callable[[], int], prog: str = "causalimg") -> int:
    """Run ``run``; a CausalImgError becomes one message on stderr (at most MAX_MESSAGE characters)
    and its exit status."""
    try:
        return run()
    except CausalImgError as err:
        message = str(err)
        if len(message) > MAX_MESSAGE:
            message = f"{message[:MAX_MESSAGE]}... ({len(message) - MAX_MESSAGE:,} more characters)"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``causalimg`` console script; argparse usage errors exit 2."""
    args = build_parser().parse_args(argv)
    return report_errors(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
