"""Typed errors. Every failure a user can cause is a QswapError subclass whose message says
what to change; the CLI turns them into a one-line message and exit code 2."""
from __future__ import annotations


class QswapWarning(UserWarning):
    """Something asked for did not happen as asked (a recipe rule matched nothing, a tie conflict,
    an fbank backend that failed and was replaced)."""


class QswapError(Exception):
    """Base class of every error qswap raises on purpose."""


def expect_module(value, what: str, error: type) -> None:
    """``error`` (a QswapError subclass) where ``value``, the model an API function takes, is not a
    ``torch.nn.Module``: ``what`` names the function (``calibrate()``)."""
    from torch import nn

    if not isinstance(value, nn.Module):
        raise error(f"{what} takes a torch.nn.Module, got {type(value).__name__}")


class SpecError(QswapError, ValueError):
    """A QuantSpec field is out of range or inconsistent."""


class RecipeError(QswapError, ValueError):
    """A recipe file or dict is malformed. Carries the file, line and key when known."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None,
                 key: str | None = None):
        self.source, self.line, self.key = source, line, key
        where = ":".join(str(p) for p in (source, line) if p is not None)
        prefix = f"{where}: " if where else ""
        keypart = f"key '{key}': " if key else ""
        super().__init__(f"{prefix}{keypart}{message}")


class RegistryError(QswapError, KeyError):
    """A class is registered twice, or a lookup names a class that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class ConvertError(QswapError):
    """The model cannot be converted as asked (strict mode findings, bad inputs)."""


class CalibrationError(QswapError):
    """Calibration got no data, or data that cannot give finite quantization parameters."""


class AuditError(QswapError):
    """The honesty audit could not run on the given model and inputs."""


class CheckpointError(QswapError):
    """A checkpoint is missing, corrupt, not a fairseq/qswap checkpoint, or unsafe to load.
    ``kind``: "build" where fairseq could not build the model from a checkpoint that loaded (its
    state does not fit the model its cfg and task build, e.g. another dictionary's embedding
    size); None otherwise. ``checkpoint``: the checkpoint the message names, where it was raised
    by code that knew it (the fairseq loader names the checkpoint in one raised without it)."""

    def __init__(self, message: str, *, kind: str | None = None, checkpoint: object = None):
        super().__init__(message)
        self.kind = kind
        self.checkpoint = checkpoint


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs a pickle global outside the allowlist; opt in with trust_checkpoint."""


class DataError(QswapError):
    """A data directory, manifest or batch is missing or malformed."""


class AudioError(DataError):
    """An audio file is unreadable, empty, non-finite or at the wrong sample rate."""


class OutputError(QswapError, OSError):
    """An output file (checkpoint, recipe, report) cannot be written where it was asked for."""


class BudgetError(QswapError, ValueError):
    """A mixed-precision search budget that no recipe can meet (names the reachable range)."""


class DependencyError(QswapError, ImportError):
    """An optional package a requested feature needs is not installed (names the pip install)."""


class ExportError(QswapError):
    """A model cannot be exported as asked (uncalibrated, or a grid the target format cannot
    express), or an exported graph file is missing or unreadable (names the site or the file)."""


class IntegerizeError(QswapError, ValueError):
    """A model or op cannot run in integer arithmetic as asked (a module without an integer form,
    an uncalibrated grid, a value beyond an integer op's stated overflow bound)."""


class LoadError(ExportError):
    """An exported integer model cannot be read: ``kind`` says why ("missing", "truncated",
    "corrupted", "version", "edited"), the message names the file and the field."""

    def __init__(self, message: str, *, kind: str):
        super().__init__(message)
        self.kind = kind


class CommandError(QswapError):
    """A command a documentation tool runs (fairseq-train, fairseq-generate, ``qswap``) exited with
    an error; the message names it and carries the end of its output."""


class TrainingError(QswapError, ValueError):
    """A training option qswap adds to fairseq-train (the distillation criterion's teacher,
    weight or temperature) is missing or out of range, or a fairseq option the plugin's quantized
    model cannot run with (half precision, an EMA of its state) is given (names the option and what
    to pass)."""
