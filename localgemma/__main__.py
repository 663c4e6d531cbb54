"""`localgemma ...` and `python -m localgemma ...`: the CLI (localgemma.cli), started so that
`run` and `chat` begin reading the model's weights before the CLI itself is imported
(localgemma.preload): click, pydantic and the contract load while llama.cpp reads the file."""

from __future__ import annotations

import sys
from typing import Optional

_LOADS_A_MODEL = ("run", "chat")


def model_flag(args: list[str]) -> tuple[bool, Optional[str]]:
    """(whether the command loads a model, the --model/-m it names) from the raw arguments,
    before click has parsed them. A guess that is wrong costs nothing but the preload: the
    command's own parsing decides what runs, and weights nobody takes are freed."""
    if not args or args[0] not in _LOADS_A_MODEL or "--help" in args:
        return False, None
    model = None
    rest = iter(args[1:])
    for arg in rest:
        if arg == "--":
            break
        if arg in ("--model", "-m"):
            model = next(rest, None)
        elif arg.startswith("--model="):
            model = arg.split("=", 1)[1]
        elif arg.startswith("-m") and not arg.startswith("--"):
            model = arg[2:]
    return True, model


def main() -> None:
    from . import preload

    loads, model = model_flag(sys.argv[1:])
    try:
        with preload.cold(model, enabled=loads):
            from .cli import main as cli

            cli(prog_name="localgemma")
    except SystemExit as done:
        if loads:
            exit_now(done.code)
        raise


def exit_now(code) -> None:
    """End a finished `run` or `chat` as sys.exit would -- the atexit handlers, the streams
    flushed, the same status -- without the interpreter's teardown of every module and
    object (~50 ms after a model ran: pydantic, the contract, the runtime). Returns, for the
    normal exit, while a thread that is not a daemon still runs: Python would wait for it."""
    import threading

    if any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    import atexit
    import os

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): nothing more can be written
            pass
    os._exit(status)


if __name__ == "__main__":
    main()
