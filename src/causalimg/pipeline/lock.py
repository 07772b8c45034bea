"""A run folder belongs to one run at a time: an OS-level lock held for the whole run.

The main process takes an exclusive ``flock`` on ``<run.dir>/run.lock`` before it writes anything
there, and writes its host, process id, start time and command into the file. A second run on the
same folder is refused at once with a message naming the holder. The kernel drops the lock when
the holding process dies (kill -9 included), so a stale lock file never blocks the next run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from causalimg.errors import ConfigError, RunLockedError

LOCK_FILE = "run.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        return f"process {info['pid']} on host {info['host']} since {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its details are unreadable)"


@contextmanager
def hold_run_folder(run_dir: Path) -> Iterator[None]:
    """Hold the lock of ``run_dir`` (created if needed) for the duration of the block."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(f"run.dir {str(run_dir)!r} is not writable: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"run folder {run_dir} is in use by {_holder(run_dir / LOCK_FILE)}; wait for that run to end, "
                "or give this one another run.dir"
            ) from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
