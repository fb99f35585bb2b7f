"""The project's own exception types.

Every error a user can cause (a bad option, a missing file, a corrupt checkpoint) is one
of these, with a one-line message; the CLI prints it as ``error: <message>`` and exits
with status 2, without a traceback. Anything else escaping is a bug.
"""


class DdpmError(Exception):
    """Base class of every error a user can cause."""


class ConfigError(DdpmError):
    """An option or config file is invalid (unknown key, wrong type, out of range)."""


class DataError(DdpmError):
    """A dataset is missing, corrupt, truncated or malformed."""


class CheckpointError(DdpmError):
    """A checkpoint or run directory is missing, corrupt or does not match the model."""


class TrainingError(DdpmError):
    """Training stopped on a numerical failure (non-finite loss or gradient)."""
