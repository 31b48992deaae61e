"""Errors Prescient raises on purpose.

    PrescientError
    ├── ConfigError        a flag, scenario file or preset is wrong
    └── WorkloadError      a trace or workload row is malformed (names file and line)
"""

from __future__ import annotations


class PrescientError(Exception):
    """Base of every error Prescient raises deliberately."""


class ConfigError(PrescientError):
    """A configuration value is invalid; the message names the flag or key."""


class WorkloadError(PrescientError):
    """A workload or trace cannot be read; the message names the file and line."""
