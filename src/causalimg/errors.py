"""Errors that are the user's to fix: printed as one clear message, never as a traceback.

Exit statuses of every causalimg command: 2 for a user's mistake in the config, the data or the
environment (every ``CausalImgError``), 130 for an interruption (Ctrl-C, SIGTERM), 1 with a
traceback for anything else, which is a bug.
"""

from __future__ import annotations


class CausalImgError(Exception):
    """Base of every user-facing error. ``exit_code`` is what the command line exits with."""

    exit_code = 2


class ConfigError(CausalImgError):
    """A config file, override or plugin selection is invalid."""


class PluginError(CausalImgError):
    """A plugin failed to import or register, or two plugins claim the same name."""


class DataError(CausalImgError):
    """An input file or data folder is unusable; the message names the file and the problem."""


class InterventionError(CausalImgError, ValueError):
    """An intervention names an unknown variable, the image, or a value outside the support."""


class TrainingError(CausalImgError):
    """Training cannot go on (for example too many skipped steps); the last good checkpoint is kept."""


class DiskFullError(CausalImgError):
    """The disk filled up while writing; the message names the file and the free space."""


class RunLockedError(CausalImgError):
    """Another run holds the run folder; the message names its host and process."""
