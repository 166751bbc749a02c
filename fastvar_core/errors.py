"""Exceptions raised by fastvar_core.

Every error a user can cause derives from :class:`FastVARError` and carries a message that names the
file or field, what was expected and what was found. Front ends (CLI, ComfyUI nodes) show the
message as is, without a traceback.
"""


class FastVARError(Exception):
    """Base class of every user-facing error of the pack."""


class CheckpointError(FastVARError):
    """A weight file or folder is missing, unreadable, unsafe or not the expected model."""


class ConfigError(FastVARError, ValueError):
    """A setting (pruning config, schedule, sampler option) is out of range or inconsistent."""


class IncompatibleModelsError(FastVARError):
    """Two loaded parts (transformer, VAE, text encoder) do not belong together."""


class InternalError(RuntimeError):
    """An invariant of fastvar_core itself does not hold: a bug to report, not a setting to change.

    Deliberately not a :class:`FastVARError`, so front ends show it with its traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"internal error (a bug in fastvar_core, please report it): {message}")
