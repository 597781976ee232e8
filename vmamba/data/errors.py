"""Errors a user can fix (bad data, bad options, bad checkpoint).

The ``vmamba`` command prints them as one line and exits nonzero instead of a stack trace.
"""

from __future__ import annotations


class UsageError(Exception):
    """Base class: a problem with what the user gave us, not a bug in the library."""


class DataError(UsageError, ValueError):
    """A dataset folder or file is missing, empty or unreadable; the message names it."""


class ConfigError(UsageError, ValueError):
    """An option, a config file or a combination of options is invalid."""


class CheckpointError(UsageError, ValueError):
    """A checkpoint file is missing, unreadable or does not match what was asked."""
