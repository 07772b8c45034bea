"""One self-contained HTML report: tables, figures (base64 PNG), configs, timings, environment.

Everything is inline (no scripts, no external styles or images), so the file opens from disk in
any browser, can be mailed, and shows the same thing in ten years.
"""

from __future__ import annotations

import base64
import html
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from causalimg.io import atomic_write_text
from causalimg.report.tables import Table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
caption { font-weight: bold; text-align: left; padding: 0.3em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.intervened { background: #dce9f7; }
td.best { font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #555; font-size: 0.85em; }
"""


def environment() -> dict[str, str]:
    """Versions and machine facts that decide whether two runs are comparable."""
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu count": str(os.cpu_count()),
    }
    for package in ("causalimg", "torch", "accelerate", "timm", "zuko", "numpy"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = "not installed"
    try:
        import torch

        env["torch threads"] = str(torch.get_num_threads())
        env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return env


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _key_values(title: str, values: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in values.items())
    return f"<table><caption>{html.escape(title)}</caption><tbody>{rows}</tbody></table>"


def write_report(
    path: Path,
    *,
    title: str,
    intro: str,
    tables: Sequence[Table],
    figures: Sequence[tuple[Path, str]],
    timings: Mapping[str, Mapping[str, Any]],
    configs: Mapping[str, str],
    findings: Sequence[str] = (),
) -> Path:
    """Write the report.

    figures: (PNG path, caption); timings: stage -> {"seconds", "status", ...};
    configs: name -> text (YAML or JSON) shown verbatim.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>",
    ]
    if findings:
        parts.append("<h2>Findings</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in findings) + "</ul>")
    parts.append("<h2>Tables</h2>")
    parts.extend(table.html() for table in tables)
    parts.append("<h2>Figures</h2>")
    parts.extend(_image(png, caption) for png, caption in figures)
    stage_rows = {
        name: f"{info.get('status', '')}, {float(info.get('seconds', 0.0)):.1f} s" for name, info in timings.items()
    }
    parts.append("<h2>Timings</h2>" + _key_values("Stages (seconds of the run that produced each)", stage_rows))
    parts.append("<h2>Environment</h2>" + _key_values("Environment", environment()))
    parts.append("<h2>Configuration</h2>")
    for name, text in configs.items():
        parts.append(f"<h3>{html.escape(name)}</h3><pre>{html.escape(text)}</pre>")
    parts.append("</body></html>")
    atomic_write_text(Path(path), "\n".join(parts) + "\n")
    return Path(path)
