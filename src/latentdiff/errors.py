"""Exceptions that carry a message meant for the user.

The CLI prints ``str(err)`` of any :class:`LatentDiffError` as one line and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class LatentDiffError(Exception):
    """Base class: a user-facing problem (bad input, missing file, invalid config)."""


class DataError(LatentDiffError):
    """A data set, image or sample file is missing, truncated, corrupt or of the wrong shape."""


class ConfigError(LatentDiffError):
    """A config value or CLI option is invalid."""


class ModelError(LatentDiffError):
    """A model directory or checkpoint is missing, incomplete or corrupt."""


class TrainingError(LatentDiffError):
    """Training cannot go on (a non-finite loss or gradient); the last good checkpoint is kept."""


class WriteError(DataError):
    """An output file could not be written (disk full, no permission); any previous version is intact."""
