"""Errors that are the user's to fix: printed as one clear message, never as a traceback."""

from __future__ import annotations


class CausalImgError(Exception):
    """Base of every user-facing error. ``exit_code`` is what the command line exits with."""

    exit_code = 1


class ConfigError(CausalImgError):
    """A config file, override or plugin selection is invalid (exit status 2)."""

    exit_code = 2


class PluginError(CausalImgError):
    """A plugin failed to import or register, or two plugins claim the same name."""

    exit_code = 2


class DataError(CausalImgError):
    """An input file or data folder is unusable; the message names the file and the problem."""


class InterventionError(CausalImgError, ValueError):
    """An intervention names an unknown variable, the image, or a value outside the support."""


class TrainingError(CausalImgError):
    """Training cannot go on (for example too many skipped steps); the last good checkpoint is kept."""
