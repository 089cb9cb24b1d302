"""Typed errors. Every error raised for bad input derives from :class:`KnowEditError`
and its message says what to do about it.

When one of these is raised by a public call, the model's weights, hooks and
edit stack are exactly as they were before the call.
"""

from __future__ import annotations


class KnowEditError(Exception):
    """Base class of every hf_knowedit error."""


class UnsupportedArchitectureError(KnowEditError, KeyError):
    """The model's ``config.model_type`` has no entry in the architecture table."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MissingTokenizerError(KnowEditError, ValueError):
    """A call needs a tokenizer and none was given or attached."""


class SubjectNotFoundError(KnowEditError, ValueError):
    """The subject string does not occur in the prompt (or is empty)."""


class InvalidRequestError(KnowEditError, ValueError):
    """An edit request is malformed (no ``{}`` in the prompt, empty target, ...)."""


class InvalidConfigError(KnowEditError, ValueError):
    """A method config or call argument is out of range."""


class UnknownMethodError(KnowEditError, ValueError):
    """``method=`` names no registered editing method."""


class LayerOutOfRangeError(KnowEditError, IndexError):
    """A layer index is outside ``[0, num_layers)``."""


class EditConflictError(KnowEditError, ValueError):
    """Two requests (in one batch, or against an active edit set) rewrite the same
    subject and relation to different targets."""


class NonFiniteUpdateError(KnowEditError, ArithmeticError):
    """A computed weight update contains NaN or Inf; nothing was written."""


class EditSetNotFoundError(KnowEditError, KeyError):
    """No active edit set has the given name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StatisticsMismatchError(KnowEditError, ValueError):
    """A second-moment statistics file belongs to another model, layer or module."""


class BaseModelMismatchError(KnowEditError, ValueError):
    """An edit set was computed on other base weights (fingerprint or shape mismatch)."""


class AdapterFormatError(KnowEditError, ValueError):
    """A directory or file is not a valid hf_knowedit / PEFT adapter."""


class SingularSystemError(KnowEditError, ArithmeticError):
    """A linear system in an editing method is singular even after regularisation."""


class BatchTooLargeError(KnowEditError, ValueError):
    """A batch exceeds a stated limit and chunking was not enabled."""


class InvalidDataError(KnowEditError, ValueError):
    """A benchmark record is missing a field or has an unknown schema."""


class TraceError(KnowEditError, ValueError):
    """Bad arguments to causal tracing (``samples < 1``, unknown kind, ...)."""


class EditsDisabledError(KnowEditError, RuntimeError):
    """Edit state was to change inside ``disable_edits()``, where the model must stay the base model."""


class InvalidArgumentError(KnowEditError, TypeError):
    """An argument of the wrong type (a flag that is not a bool, a name that is not a string, ...)."""


class OutputPathError(KnowEditError, ValueError):
    """A file or directory to write cannot be used (a non-empty directory of something else, a file
    where a directory is needed, no write permission); nothing was written."""


class DeviceMapError(KnowEditError, ValueError):
    """A dispatched model (``device_map``, accelerate offload) places a module where the library cannot
    read or update it; nothing was computed or written."""


class NotPicklableError(KnowEditError, TypeError):
    """A model carrying hf_knowedit state was pickled (``pickle``, ``torch.save(model)``); detach it or save
    it with ``save_pretrained`` instead (``copy.deepcopy`` works)."""
