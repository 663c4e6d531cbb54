"""localgemma: Workers AI's LoRA-serving Gemma contract, offline on a CPU.

Importing the package loads nothing heavy -- not llama.cpp, not even pydantic: the names below
are imported on first use, so the contract, template, sampling, structured-output and
conversion modules, and the fast tests, work without llama.cpp loading a model, and a cold
`run` can start reading the model's weights before the rest is imported (localgemma.preload).
"""

from .lazy import names as _names

__version__ = "0.1.0"

__all__ = ["run", "parse_inputs", "PromptInputs", "MessagesInputs", "LocalGemmaError", "__version__"]

_HOMES = {"parse_inputs": "contract", "PromptInputs": "contract", "MessagesInputs": "contract",
          "LocalGemmaError": "errors"}
__getattr__ = _names(__name__, _HOMES, submodules=True)  # and submodules such as localgemma.runtime


def run(model=None, inputs=None, **fields):
    """localgemma.runtime.run (its docstring says it all), with a cold process's model
    weights read while the runtime is imported."""
    from . import preload

    with preload.cold(model):
        from .runtime import run as run_request

        return run_request(model, inputs, **fields)

