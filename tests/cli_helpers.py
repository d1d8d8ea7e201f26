"""Helpers shared by the CLI tests."""

from __future__ import annotations


def one_error_line(result: object) -> str:
    """The single ``error: ...`` line a failed command printed on stderr."""
    stderr = getattr(result, "stderr", "")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]
