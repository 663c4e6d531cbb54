"""localgemma: Workers AI's LoRA-serving Gemma contract, offline on a CPU.

Importing the package loads nothing heavy -- not llama.cpp, not even pydantic: the names below
are imported on first use, so the contract, template, sampling, structured-output and
conversion modules, and the fast tests, work without llama.cpp loading a model, and a cold
`run` can start reading the model's weights before the rest is imported (localgemma.preload).
"""

__version__ = "0.1.0"

__all__ = ["run", "parse_inputs", "PromptInputs", "MessagesInputs", "LocalGemmaError", "__version__"]

_HOMES = {"parse_inputs": "contract", "PromptInputs": "contract", "MessagesInputs": "contract",
          "LocalGemmaError": "errors"}


def run(model=None, inputs=None, **fields):
    """localgemma.runtime.run (its docstring says it all), with a cold process's model
    weights read while the runtime is imported."""
    from . import preload

    with preload.cold(model):
        from .runtime import run as run_request

        return run_request(model, inputs, **fields)


def __getattr__(name: str):
    """The contract's names, and submodules such as `localgemma.runtime`, on first use."""
    import importlib

    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError:
        raise AttributeError(f"module 'localgemma' has no attribute {name!r}") from None
