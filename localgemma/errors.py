"""Every error a user can see, in one table: each class carries Cloudflare's error code, the
HTTP status, and OpenAI's error type (and code, where OpenAI has one). The CLI prints the
message on one line, the Python API raises the class, and the server renders it in the shape
of the API the request came in on; nobody translates codes anywhere else. README's error
table is checked against `ERRORS` (tests/test_errors.py).
"""

from __future__ import annotations

from typing import Optional


class LocalGemmaError(Exception):
    """A message meant for a person; `param` names the request field at fault, when one is."""

    code = 5004  # Cloudflare's "invalid data"
    status = 400
    openai_status: Optional[int] = None  # where OpenAI answers with another status
    openai_type = "invalid_request_error"
    openai_code: Optional[str] = None  # None: Cloudflare's code is sent instead

    def __init__(self, message: str, *, param: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.param = param


# -- the request -------------------------------------------------------------------------------

class InvalidInput(LocalGemmaError):
    """The inputs break the contract: names the field, the value and what is allowed."""

    code = 3010  # "Invalid or incomplete input for the model"


class Unsupported(InvalidInput):
    """A parameter this server cannot honour (an OpenAI one the contract has no way to do)."""

    code = 5004


class ContextOverflow(InvalidInput):
    """The prompt does not fit the model's context window."""

    code = 5004
    openai_code = "context_length_exceeded"


class MalformedBody(LocalGemmaError):
    """The body is not JSON (or not UTF-8)."""


class IncompleteRequest(LocalGemmaError):
    """A body or a required field is missing."""

    code = 3003


class StructuredOutputError(LocalGemmaError):
    """Constrained output could not be completed (e.g. max_tokens ran out inside the JSON)."""


# -- models ------------------------------------------------------------------------------------

class UnknownModel(LocalGemmaError):
    """A model id this process does not serve."""

    code = 5007
    openai_status = 404
    openai_code = "model_not_found"


class ModelUnavailable(LocalGemmaError):
    """The model is known but its weights cannot be had (download failed, file missing)."""

    code = 5007


class BadGGUF(ModelUnavailable):
    """The file is not a GGUF llama.cpp could safely load."""


class InsufficientMemory(LocalGemmaError):
    """Loading the model would need more memory than this machine has available."""

    code = 3040  # "out of capacity"
    status = 429
    openai_type = "rate_limit_error"


# -- finetunes ---------------------------------------------------------------------------------

class UnknownFinetune(LocalGemmaError):
    code = 3037  # what Workers AI answers: "Finetune <id> not found"
    status = 404


class AdapterGone(UnknownFinetune):
    """The adapter's file disappeared between lookup and load (deleted or replaced meanwhile)."""


class FinetuneExists(LocalGemmaError):
    code = 3003
    status = 409


class FinetuneIncomplete(LocalGemmaError):
    code = 3039  # "finetune missing required files"


class ConversionError(LocalGemmaError):
    """A PEFT adapter (or a merge/quantize request) that cannot be converted, and why."""


class AdapterMismatch(LocalGemmaError):
    """The adapter was made for another base model (llama.cpp refused its tensors)."""


# -- moving a finetune elsewhere (finetune push / export) -----------------------------------------

class OverLimit(LocalGemmaError):
    """The finetune breaks a limit of where it is going (Workers AI's rank, file size, models,
    adapters per account), named with its value; or the export folder is not empty."""


class RemoteError(LocalGemmaError):
    """Workers AI (or the --api-base given) refused the push or could not be reached: its words."""

    code = 3043
    status = 502
    openai_type = "api_error"


# -- serving -----------------------------------------------------------------------------------

class Unauthorized(LocalGemmaError):
    code = 10000  # what api.cloudflare.com answers for a missing or wrong token
    status = 401
    openai_code = "invalid_api_key"


class Forbidden(LocalGemmaError):
    """A request a browser was made to send: from a web page this server does not trust, or
    to a host name it does not answer to (DNS rebinding)."""

    code = 9109  # Cloudflare's "Unauthorized to access requested resource"
    status = 403
    openai_type = "permission_error"


class QueueFull(LocalGemmaError):
    code = 3040  # "out of capacity"
    status = 429
    openai_type = "rate_limit_error"
    openai_code = "rate_limit_exceeded"


class TooManyConnections(QueueFull):
    status = 503


class BodyTooLarge(LocalGemmaError):
    code = 3006  # "request too large"
    status = 413


class RequestTimeout(LocalGemmaError):
    """The request line, headers or body stopped arriving."""

    code = 3007  # "timeout"
    status = 408


class Aborted(LocalGemmaError):
    """The request was cancelled (its client left) before the answer was ready."""

    code = 3008  # "aborted"
    status = 408


class NoRoute(LocalGemmaError):
    code = 7000  # "No route for that URI"
    status = 404


class MethodNotAllowed(LocalGemmaError):
    code = 7001
    status = 405


class NotOffered(LocalGemmaError):
    """An Ollama endpoint with no equivalent over HTTP here (pull, create, embed, ...): the
    message names the localgemma command that does it, or says it is not offered."""

    code = 7000
    status = 501


class InternalError(LocalGemmaError):
    """A bug: the message says so, the log has the traceback."""

    code = 3043
    status = 500
    openai_type = "server_error"


ERRORS: tuple[type[LocalGemmaError], ...] = (
    InvalidInput, Unsupported, ContextOverflow, MalformedBody, IncompleteRequest, StructuredOutputError,
    UnknownModel, ModelUnavailable, BadGGUF, InsufficientMemory,
    UnknownFinetune, AdapterGone, FinetuneExists, FinetuneIncomplete, ConversionError, AdapterMismatch,
    OverLimit, RemoteError,
    Unauthorized, Forbidden, QueueFull, TooManyConnections, BodyTooLarge, RequestTimeout, Aborted, NoRoute, MethodNotAllowed,
    NotOffered, InternalError,
)
