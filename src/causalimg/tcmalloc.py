"""Run causalimg on gperftools' tcmalloc when the system has it, without a line users must remember.

Training on a CPU spends a noticeable share of each step allocating and freeing activation buffers;
tcmalloc serves them faster than glibc malloc (docs/training.md#cpu-speed). An allocator must be
chosen before the process starts, so ``python -m causalimg.run`` (every rank of ``accelerate launch
-m causalimg.run`` too) re-executes itself once, at its very start, with the library in
``LD_PRELOAD`` when the library exists and is not loaded yet. ``CAUSALIMG_TCMALLOC=0`` opts out.

Only the standard library is imported here: the re-execution happens before torch is loaded.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

OPT_OUT = "CAUSALIMG_TCMALLOC"  # "0", "no", "false" or "off": stay on the system allocator
TRIED = "CAUSALIMG_TCMALLOC_TRIED"  # set in the re-executed process: never re-execute twice
LIBRARY = "tcmalloc_minimal"


def find_library() -> str | None:
    """The loadable name of tcmalloc (``libtcmalloc_minimal.so.4``), or None where it is not installed."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.util.find_library(LIBRARY)


def loaded(maps: str | None = None) -> bool:
    """Whether this process runs on tcmalloc, read from its memory maps (``/proc/self/maps``)."""
    if maps is None:
        path = Path("/proc/self/maps")
        maps = path.read_text() if path.exists() else ""
    return "libtcmalloc" in maps


def preload_plan(
    argv: Sequence[str], environ: Mapping[str, str], library: str | None, already_loaded: bool
) -> tuple[list[str], dict[str, str]] | None:
    """The (argv, environment) to re-execute this interpreter with, or None to carry on as it is.

    ``argv`` is the interpreter's original command line (``sys.orig_argv``); an existing
    ``LD_PRELOAD`` is kept after the library.
    """
    if environ.get(OPT_OUT, "").strip().lower() in ("0", "no", "false", "off"):
        return None
    if already_loaded or library is None or environ.get(TRIED) or not argv:
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join(p for p in (library, environ.get("LD_PRELOAD", "")) if p)
    env[TRIED] = "1"
    return list(argv), env


def preload_tcmalloc() -> None:
    """Re-execute the running interpreter on tcmalloc if that is possible and not done yet.

    Does nothing (the run continues on the system allocator) when opted out, when the library is
    missing, when it is already loaded or when the re-execution fails.
    """
    plan = preload_plan(sys.orig_argv, os.environ, find_library(), loaded())
    if plan is None:
        return
    argv, env = plan
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return
