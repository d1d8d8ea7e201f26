"""The project's one error family.

Library code raises these with a message a user can act on; the CLI (:mod:`gsa_cli.cli.app`) turns
them into one red line and an exit code (2 for usage and configuration errors, 1 for failures at run
time).
"""

from __future__ import annotations


class GsaError(Exception):
    """A failure the user can act on; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(GsaError):
    """A preset, override or option that cannot be accepted as given."""

    exit_code = 2


class DataError(GsaError):
    """A data set that is missing, malformed, or holds an unreadable file."""


class DeprecatedKeyWarning(FutureWarning):
    """A preset or override uses a key's old name; the CLI shows it as one line."""


class GsaWarning(UserWarning):
    """Something the user should know before a run goes on; the CLI shows it as one yellow line."""


class ScheduleWarning(GsaWarning):
    """A recipe whose learning-rate schedule cannot complete (its warm-up does not end before training)."""


class BusyCpuWarning(GsaWarning):
    """A CPU that other work keeps busy, on which torch's default threads would wait on each other."""
