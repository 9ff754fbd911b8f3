"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class SelfExtendError(Exception):
    """Base class: the message alone must tell the user what is wrong and what to do."""


class UnsupportedModelError(SelfExtendError, ValueError):
    """The architecture or its rotary embedding cannot take SelfExtend."""


class CacheMismatchError(SelfExtendError, ValueError):
    """A saved prompt cache is corrupt or was made for another model, G or W."""


class ModelNotFoundError(SelfExtendError):
    """A model reference that names nothing loadable."""


class InputTooLongError(SelfExtendError):
    """The input plus the answer budget is beyond what the configuration can reach."""


class DocumentError(SelfExtendError):
    """A document that cannot be read as text: missing, empty, binary, undecodable."""


class EvaluationError(SelfExtendError, ValueError):
    """Evaluation settings or inputs that cannot be run: bad lengths, depths, buckets, too short a text."""


class InsufficientMemoryError(SelfExtendError):
    """The estimated memory for a run is beyond what the machine has."""


class SettingsError(SelfExtendError, ValueError):
    """SelfExtend settings (G, W) or a dtype that do not fit the model."""
