"""Errors raised by scanlib. All derive from :class:`ScanlibError`."""

from __future__ import annotations


class ScanlibError(Exception):
    """Base class of every scanlib error."""


class ScanInputError(ScanlibError, ValueError):
    """An argument has the wrong shape, dtype or device."""


class UnknownBackendError(ScanlibError, KeyError):
    """A backend name that no registered backend carries."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(ScanlibError, RuntimeError):
    """No selected backend can run this call; the message lists each one's reasons."""


class MissingDependencyError(ScanlibError, ImportError):
    """An optional package is needed; the message names the install command."""


def missing_dependency(module: str, extra: str, what: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"{what} needs the optional package '{module}', which is not installed: "
        f"pip install 'scanlib-vmamba[{extra}]'"
    )
