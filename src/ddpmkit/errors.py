"""The project's own exception types.

Every error a user can cause (a bad option, a missing file, a corrupt checkpoint) is one
of these, with a one-line message; the CLI prints it as ``ddpm: error: <message>`` and
exits with status 2, without a traceback. Anything else escaping is a bug, except
``Interrupted``: a stop asked for by a signal.
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


class Interrupted(KeyboardInterrupt):
    """Work stopped on SIGINT or SIGTERM after saving what it had; ``signal_number`` says
    which. A KeyboardInterrupt, so that no ``except Exception`` swallows it; the CLI exits
    with 128 + signal_number (130 for SIGINT, 143 for SIGTERM), the shell's convention for
    a process ended by a signal, so that ``ddpm train ... && ddpm fid ...`` stops after a ^C."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number
