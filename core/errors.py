"""Errors users see as one line: what was expected and what was found."""


class LStreamError(Exception):
    """Base of every error lstream raises on purpose; the CLI prints it as one line."""


class ModelFormatError(LStreamError):
    """A model file that is missing, malformed, truncated or of a kind lstream does not run."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class OutOfMemory(LStreamError):
    """Device (or host) memory ran out during a run; the model object stays usable."""


class NonFiniteError(LStreamError, FloatingPointError):
    """A NaN or an infinity appeared in the activations; names where it was first seen."""
