"""The project's one error family.

Library code raises these with a message a user can act on; the CLI (:mod:`gsa_cli.cli.app`) turns
them into one red line and an exit code (2 for usage and configuration errors, 1 for failures at run
time).
"""

from __future__ import annotations

import warnings


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


class SpanWarning(GsaWarning):
    """A GSA module sees a map larger than its span, so its positional attention is no longer global: the
    net is used at a larger input than it was built for. Shown once per module and map size, from eager
    runs only; not for modules whose span a config set small on purpose (``model.span``)."""

    @classmethod
    def check(cls, span: int, size: int) -> None:
        """Warn if a map side of ``size`` pixels is beyond a GSA module's ``span``."""
        if size > span:
            message = (
                f"a GSA module of span {span} sees {size}-pixel maps: its positional attention is not "
                "global; give the net the image size it was built for, or build it for this size"
            )
            warnings.warn(cls(message), stacklevel=3)
