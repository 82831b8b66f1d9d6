"""The project's own error types. A user's mistake (a bad config or option, a missing or corrupt
file, a run or policy that does not fit) raises an `EsperError`; the command line prints those as
one line. Anything else is a bug in Esper and keeps its traceback."""

from __future__ import annotations


class EsperError(Exception):
    """Base of every error that reports a problem with the user's input, not a bug."""


class ConfigError(EsperError, ValueError):
    """A config file, option or value that cannot be used."""


class BackendUnavailable(EsperError, ImportError):
    """A backend's optional dependency (Ray: the `ray` extra) is not installed."""
