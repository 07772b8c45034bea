"""The launcher's move onto tcmalloc: when it re-executes, with what, and the opt-out."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from causalimg.tcmalloc import OPT_OUT, TRIED, loaded, preload_plan

ARGV = ["python", "-m", "causalimg.run", "--config", "tiny"]
LIB = "libtcmalloc_minimal.so.4"
HAS_TCMALLOC = ctypes.util.find_library("tcmalloc_minimal") is not None


def test_plan_preloads_the_library_and_keeps_the_command_line() -> None:
    argv, env = preload_plan(ARGV, {"PATH": "/bin"}, LIB, already_loaded=False)
    assert argv == ARGV
    assert env["LD_PRELOAD"] == LIB and env[TRIED] == "1" and env["PATH"] == "/bin"


def test_plan_keeps_an_existing_preload_after_the_library() -> None:
    _, env = preload_plan(ARGV, {"LD_PRELOAD": "libother.so"}, LIB, already_loaded=False)
    assert env["LD_PRELOAD"] == f"{LIB} libother.so"


@pytest.mark.parametrize(
    ("environ", "library", "already_loaded"),
    [
        ({OPT_OUT: "0"}, LIB, False),  # opted out
        ({OPT_OUT: "off"}, LIB, False),
        ({}, None, False),  # not installed
        ({}, LIB, True),  # already running on it
        ({TRIED: "1"}, LIB, False),  # re-executed once already: never loop
    ],
)
def test_plan_leaves_the_process_alone(environ, library, already_loaded) -> None:
    assert preload_plan(ARGV, environ, library, already_loaded) is None


def test_loaded_reads_the_memory_maps() -> None:
    assert loaded("7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.9\n")
    assert not loaded("7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")


def _child(env_extra: dict[str, str]) -> str:
    code = "from causalimg.tcmalloc import loaded, preload_tcmalloc; preload_tcmalloc(); print(loaded())"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", OPT_OUT, TRIED)} | env_extra
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not HAS_TCMALLOC, reason="libtcmalloc_minimal is not installed")
def test_a_process_moves_onto_tcmalloc_unless_opted_out() -> None:
    assert _child({}) == "True"
    assert _child({OPT_OUT: "0"}) == "False"


def _dry_run(tmp_path, env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", OPT_OUT, TRIED)} | env_extra
    cmd = [
        sys.executable,
        "-m",
        "causalimg.run",
        "--config",
        "tiny",
        "--set",
        f"run.dir={tmp_path / 'run'}",
        "--dry-run",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()[0]


@pytest.mark.skipif(not HAS_TCMALLOC, reason="libtcmalloc_minimal is not installed")
def test_the_run_command_runs_on_tcmalloc_without_being_asked(tmp_path) -> None:
    """`python -m causalimg.run` re-executes itself on tcmalloc before it parses its arguments."""
    assert _dry_run(tmp_path, {}).endswith(", tcmalloc)")
    assert _dry_run(tmp_path, {OPT_OUT: "0"}).endswith(", system malloc)")
