"""Resident memory of processes read from /proc/<pid>/status (Linux), for the memory benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

RESIDENT = ("VmRSS", "RssAnon", "RssFile")  # total, anonymous (heap) and file-backed resident memory


def status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon and RssFile in bytes and PPid of one process (empty if it has exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in (*RESIDENT, "PPid"):
            out[key] = int(value.split()[0]) * (1 if key == "PPid" else 1024)
    return out


def resident(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of one process in bytes."""
    values = status(pid)
    return {key: values[key] for key in RESIDENT if key in values}


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (DataLoader workers)."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and status(int(entry)).get("PPid") == pid]
