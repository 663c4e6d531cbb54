"""localgemma: Workers AI's LoRA-serving Gemma contract, offline on a CPU."""

__version__ = "0.1.0"

from .contract import MessagesInputs, PromptInputs, parse_inputs  # noqa: E402
from .errors import LocalGemmaError  # noqa: E402
from .runtime import run  # noqa: E402

__all__ = ["run", "parse_inputs", "PromptInputs", "MessagesInputs", "LocalGemmaError", "__version__"]
