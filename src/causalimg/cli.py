"""The ``causalimg`` command: inspect plugins, validate configs, print the config schema, use a trained model.

Subcommands live in the ``COMMANDS`` table. Adding one is a function that adds its arguments, a
function that runs it and one ``Command(...)`` line; a long-running command imports its heavy
modules inside ``run`` so that ``causalimg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """A trained model: a run folder or an exported model folder, one of its strategies, a device."""
    parser.add_argument("model", metavar="RUN", help="a run folder (run.dir) or an exported model folder")
    parser.add_argument(
        "--strategy",
        default=None,
        help="fine-tuning strategy label (default: positional-segmentor, or the only one; an exported model's own)",
    )
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    parser.add_argument(
        "--ignore-versions",
        action="store_true",
        help="load an exported model written by another causalimg or torch version (with a warning)",
    )


def _counterfactual_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="an image (.npz, or .png with optional _mask.png) or a folder of them")
    source.add_argument("--split", choices=("train", "val", "test"), help="images of the run's own data set")
    parser.add_argument("-n", "--limit", type=int, default=None, help="only the first N images")
    parser.add_argument(
        "--do",
        action="append",
        required=True,
        metavar="VAR=VALUE",
        help="intervention (repeatable): cpa_mid=35 sets, cpa_mid=+20 / -5 changes, cpa_mid=U(10,40) draws per image",
    )
    parser.add_argument("--out", required=True, help="folder for images/, differences/, contact_sheet.png, areas.*")
    parser.add_argument("--clamp", action="store_true", help="clamp targets outside a variable's support to it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the abduction noise and of U(...) draws")
    parser.add_argument("--batch-size", type=int, default=32)


def _counterfactual(args: argparse.Namespace) -> int:
    from causalimg.api.apply import counterfactual_command

    with _one_line_warnings():
        return counterfactual_command(
            args.model,
            args.strategy,
            args.input,
            args.split,
            args.limit,
            args.do,
            args.out,
            clamp=args.clamp,
            seed=args.seed,
            batch_size=_positive(args.batch_size, "--batch-size"),
            device=args.device or "cpu",
            check_versions=not args.ignore_versions,
        )


def _augment_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--split", default="train", help="split(s) of the run's data, comma-separated (default train)")
    parser.add_argument(
        "--interventions",
        action="append",
        required=True,
        metavar="SPEC",
        help="cpa_mid=+20 or cpa_mid=+20,la_mid=U(60,90) (one intervention), or a YAML file listing them; repeatable",
    )
    parser.add_argument("--out", required=True, help="folder data set to write (rerun to resume)")
    parser.add_argument(
        "--out-of-support",
        choices=("error", "clamp", "skip"),
        default="error",
        help="a target outside its support: refuse before writing (default), clamp it, or leave the image out",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="source images per chunk (default 64)")
    parser.add_argument("-n", "--limit", type=int, default=None, help="only the first N images of each split")


def _augment(args: argparse.Namespace) -> int:
    from causalimg.api.augment import augment_command

    with _one_line_warnings():
        return augment_command(
            args.model,
            args.strategy,
            args.split,
            args.interventions,
            args.out,
            policy=args.out_of_support,
            seed=args.seed,
            batch_size=_positive(args.batch_size, "--batch-size"),
            limit=args.limit,
            device=args.device,
            check_versions=not args.ignore_versions,
        )


def _export_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="RUN", help="a run folder (run.dir)")
    parser.add_argument("--strategy", default=None, help="strategy label (default: positional-segmentor)")
    parser.add_argument("--out", required=True, help="new or empty folder to write the model into")


def _export_model(args: argparse.Namespace) -> int:
    from causalimg.api.bundle import export_model

    print(export_model(args.model, args.strategy, args.out))
    return 0


def _explore_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--images", default=None, help="a folder of images (default: the run's test images)")
    parser.add_argument("-n", "--limit", type=int, default=32, help="images to offer (default 32)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")


def _explore(args: argparse.Namespace) -> int:
    from causalimg.explore.server import explore_command

    with _one_line_warnings():
        return explore_command(
            args.model,
            args.strategy,
            args.images,
            args.limit,
            args.host,
            args.port,
            device=args.device or "cpu",
            check_versions=not args.ignore_versions,
        )


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings of a command as ``causalimg: warning: ...`` lines, without the source line they came from."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"causalimg: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _positive(value: int, flag: str) -> int:
    if value < 1:
        from causalimg.errors import ConfigError

        raise ConfigError(f"{flag} must be at least 1, got {value}")
    return value


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
    Command(
        "counterfactual",
        "apply an intervention to images with a trained model",
        _counterfactual_arguments,
        _counterfactual,
    ),
    Command("augment", "write counterfactuals of a split as a folder data set", _augment_arguments, _augment),
    Command(
        "export-model", "package a trained strategy as one loadable folder", _export_model_arguments, _export_model
    ),
    Command("explore", "serve a local page to explore counterfactuals with sliders", _explore_arguments, _explore),
)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="causalimg",
        description="Inspect plugins, validate configs, print the config schema and use trained models.",
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
