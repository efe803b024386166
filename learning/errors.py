"""The learning package's errors: few, typed, each saying when it is raised.

Every error derives from :class:`LearningError`, so a caller that wants to
stop on any learning failure catches one class. Causes are kept with
``raise ... from``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "AggregationError",
    "BudgetExhaustedError",
    "ConfigError",
    "DataError",
    "DataWarning",
    "LearningError",
    "PayloadError",
    "PrivacyAccountingError",
]


class LearningError(Exception):
    """Base class of every error raised by ``fedchain.learning``."""


class DataError(LearningError):
    """A data file is missing, corrupt, truncated or fails its SHA-256 check.

    Raised by the MNIST loader. ``path`` names the offending file (or the
    folder that lacks it). It is *not* raised when the loader falls back to
    the shipped subset because nothing could be found or downloaded: that is
    a :class:`DataWarning`, since the data it returns is real, only smaller.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        super().__init__(message if path is None else f"{path}: {message}")


class ConfigError(LearningError, ValueError):
    """A hyperparameter is out of range (density outside (0, 1], negative clip,
    unknown tier or sampling scheme...). Raised when the object is built, not
    later inside a jitted call."""


class PayloadError(LearningError, ValueError):
    """Serialized model or sparse-update bytes are malformed: bad magic,
    unknown version, truncated, inconsistent lengths or shapes. Decoding is
    strict; it never guesses."""


class AggregationError(LearningError):
    """An aggregation rule cannot produce a result: no updates left after
    filtering, mismatched shapes, or too few updates for the rule's
    assumption (Krum needs n > 2f + 2)."""


class PrivacyAccountingError(LearningError):
    """The accountant cannot answer: an event the chosen method does not
    support (PLD with fixed-size sampling), or a calibration target that no
    noise multiplier in range reaches."""


class BudgetExhaustedError(LearningError):
    """A device asked to spend privacy budget it no longer has. The budget
    policy raises it rather than silently adding less noise."""

    def __init__(self, device: object, spent: float, budget: float):
        self.device = device
        self.spent = spent
        self.budget = budget
        super().__init__(
            f"device {device!r} has spent eps={spent:.3f} of its budget eps={budget:.3f}"
        )


class DataWarning(UserWarning):
    """Data was loaded, but not the full data set (the shipped subset)."""
