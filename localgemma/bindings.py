"""llama-cpp-python's C bindings, without its Python half until someone asks for it.

`import llama_cpp` runs the package's `__init__`: `from .llama_cpp import *` (the ctypes
bindings to libllama: ~25 ms) and then `from .llama import *` (the `Llama` class and what it
brings: numpy, jinja2, diskcache, the chat formats: ~125 ms). localgemma calls the C API
only, so on a cold `localgemma run` those 125 ms sat between process start and the start of
the weights load (localgemma.preload), which is the longest step on the way to the first
token.

`llama_cpp` here is the real package, imported in two halves: its module is created and
given the bindings' names (what its first line would do) and `llama_cpp._logger` is
imported (it installs llama-cpp-python's log handler: it must run before ours, as it would
in a plain import). The rest of its `__init__` runs, unchanged, the first time anyone asks
the package for a name the bindings do not have (`llama_cpp.Llama`, `from llama_cpp import
LlamaGrammar`, `llama_cpp.__version__`): code that uses llama-cpp-python's Python API in
the same process sees no difference. A process that imported `llama_cpp` before localgemma
keeps it as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType

_lock = threading.RLock()


def _install() -> ModuleType:
    with _lock:
        present = sys.modules.get("llama_cpp")
        if present is not None:
            return present
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            import llama_cpp  # not the package this expects: a plain import says what is wrong

            return llama_cpp
        package = importlib.util.module_from_spec(spec)
        finished = False

        def rest(name: str):
            """The package's own `__init__`, run once, on the first name it lacks."""
            nonlocal finished
            with _lock:
                if not finished:
                    finished = True  # a name looked up while it runs is simply missing
                    try:
                        spec.loader.exec_module(package)
                    except BaseException:
                        finished = False
                        raise
            try:
                return package.__dict__[name]
            except KeyError:
                raise AttributeError(f"module 'llama_cpp' has no attribute {name!r}") from None

        package.__getattr__ = rest
        sys.modules["llama_cpp"] = package
        try:
            c_api = importlib.import_module("llama_cpp.llama_cpp")
            public = getattr(c_api, "__all__", None) or [n for n in vars(c_api) if not n.startswith("_")]
            for name in public:
                setattr(package, name, getattr(c_api, name))
            importlib.import_module("llama_cpp._logger")
        except BaseException as exc:
            for name in [n for n in sys.modules if n == "llama_cpp" or n.startswith("llama_cpp.")]:
                del sys.modules[name]
            if not isinstance(exc, ImportError):
                raise
            import llama_cpp  # a layout this does not know (a future llama-cpp-python): import it whole

            return llama_cpp
        return package


llama_cpp = _install()
