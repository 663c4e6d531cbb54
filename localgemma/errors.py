"""Errors a user can see. Each carries Cloudflare's error code and HTTP status, so the CLI
prints one line, the Python API raises something catchable, and the server (later) answers in
the Workers AI envelope without a translation table of its own."""

from __future__ import annotations


class LocalGemmaError(Exception):
    """Base class: a message meant for a person, plus Cloudflare's code and HTTP status."""

    code = 5004  # "invalid data"
    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(LocalGemmaError):
    """The inputs object breaks the contract (a field, its value, what is allowed)."""

    code = 3010  # "Invalid or incomplete input for the model"


class ContextOverflow(InvalidInput):
    """The prompt does not fit the model's context window."""

    code = 5004


class UnknownModel(LocalGemmaError):
    """A model id that is neither in the catalog, bound to a file, nor a .gguf path."""

    code = 5007
    status = 400


class ModelUnavailable(LocalGemmaError):
    """The model is known but its weights cannot be had (download failed, file missing)."""

    code = 5007
    status = 400


class InsufficientMemory(LocalGemmaError):
    """Loading the model would need more memory than this machine has available."""

    code = 3040  # "out of capacity"
    status = 429


class NotSupported(LocalGemmaError):
    """A valid request for something this model or this build cannot do."""

    code = 5004


class ConversionError(LocalGemmaError):
    """A PEFT adapter (or a merge/quantize request) that cannot be converted, and why."""

    code = 5004
