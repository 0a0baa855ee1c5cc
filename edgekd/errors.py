"""User-facing error families. The CLI renders each as one line and exits with code 2.

Every message names the file, field or value at fault and what to do about it.
"""


class EdgekdError(Exception):
    """Base of every error caused by user input or the environment (not by a bug)."""


class RecipeError(EdgekdError):
    """A recipe or CLI value is malformed, unknown or out of range."""


class DataError(EdgekdError):
    """A dataset file is missing, truncated or of the wrong format."""


class ModelError(EdgekdError):
    """A model name is unknown or a checkpoint does not match the model."""


class TrainingError(EdgekdError):
    """Training diverged: the loss or the weights went non-finite (lower the stage's learning rate)."""


class ExportError(EdgekdError):
    """ONNX export failed or its outputs disagree with PyTorch."""


class QuantizeError(EdgekdError):
    """Quantisation could not run (e.g. empty or too small calibration set)."""


class BackendUnavailable(EdgekdError):
    """A runtime or device a backend needs is not installed or not present."""


class DeviceError(EdgekdError):
    """A remote device is unreachable or a command on it failed."""


class BundleError(EdgekdError):
    """A deployable bundle is incomplete, or one of its files does not match its checksum."""


class OutputError(EdgekdError):
    """An output directory cannot be created or written."""


def first_line(error: BaseException | str, default: str | None = None) -> str:
    """The first non-blank line of an exception's (or a text's) message, stripped: runtimes raise
    multi-line messages, and an edgekd error is one line. ``default`` when there is none: the
    exception's type name unless given."""
    line = next((part.strip() for part in str(error).splitlines() if part.strip()), "")
    if line:
        return line
    if default is not None:
        return default
    return type(error).__name__ if isinstance(error, BaseException) else ""
