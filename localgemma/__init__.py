"""localgemma: Workers AI's LoRA-serving Gemma contract, offline on a CPU.

Importing the package loads nothing heavy: `run` (and llama.cpp with it) is imported on first
use, so the contract, template, sampling, structured-output and conversion modules, and the
fast tests, work without llama.cpp loading a model.
"""

__version__ = "0.1.0"

from .contract import MessagesInputs, PromptInputs, parse_inputs  # noqa: E402
from .errors import LocalGemmaError  # noqa: E402

__all__ = ["run", "parse_inputs", "PromptInputs", "MessagesInputs", "LocalGemmaError", "__version__"]


def __getattr__(name: str):
    """`localgemma.run`, and submodules such as `localgemma.runtime`, on first use."""
    import importlib

    if name == "run":
        return importlib.import_module(".runtime", __name__).run
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError:
        raise AttributeError(f"module 'localgemma' has no attribute {name!r}") from None
