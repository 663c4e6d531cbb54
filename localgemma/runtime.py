"""`run(model, inputs)`: the Python mirror of `env.AI.run`.

contract (validate) -> template (pieces) -> tokens -> sampling -> engine -> output shape.
Everything that can fail on the request (validation, model resolution, context size) fails
when `run` is called, before any text is produced — also for streams.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from . import finetunes, template
from .adapters import AdapterRef
from .contract import Inputs, MessagesInputs, PromptInputs, parse_inputs
from .engine import Chunk, Engine
from .errors import InvalidInput, NotSupported
from .sampling import SamplingParams

Result = dict[str, Any]

_engines: dict[Path, Engine] = {}
_engines_lock = threading.Lock()


def get_engine(model: Optional[str] = None) -> Engine:
    """The engine for a model id or .gguf path, loaded once per process and kept."""
    from .models import CATALOG, resolve

    path = resolve(model).resolve()
    with _engines_lock:
        engine = _engines.get(path)
        if engine is None:
            spec = CATALOG.get(model or "")
            n_ctx = int(os.environ.get("LOCALGEMMA_N_CTX", 0)) or (spec.n_ctx if spec else None)
            n_threads = int(os.environ.get("LOCALGEMMA_THREADS", 0)) or None
            engine = _engines[path] = Engine(path, n_ctx=n_ctx, n_threads=n_threads)
        return engine


def unload_all() -> None:
    with _engines_lock:
        for engine in _engines.values():
            engine.close()
        _engines.clear()


def encode(engine: Engine, inputs: Inputs) -> list[int]:
    """The prompt's token ids. Templated text is tokenized with control parsing off, so
    '<start_of_turn>' typed by a user stays text; `raw` prompts are the caller's format."""
    if isinstance(inputs, PromptInputs) and inputs.raw:
        ids = engine.tokenize(inputs.prompt, special=True, add_bos=engine.add_bos)
        if len(ids) > 1 and ids[0] == ids[1] == engine.bos:
            ids = ids[1:]  # the caller wrote <bos> themselves; don't double it
        return ids
    if isinstance(inputs, MessagesInputs):
        if inputs.raw:
            # Raw with messages: the contents, as written, one after another.
            return engine.tokenize("".join(m.content for m in inputs.messages), special=True, add_bos=engine.add_bos)
        pieces = template.render_messages(inputs.messages)
    else:
        pieces = template.render_prompt(inputs.prompt)
    ids = [engine.bos] if engine.add_bos else []
    for piece in pieces:
        ids += [engine.control_token(piece.text)] if piece.control else engine.tokenize(piece.text)
    return ids


def stop_tokens(engine: Engine, inputs: Inputs) -> frozenset[int]:
    """Templated replies also end where the model starts a new turn (as Ollama's Gemma
    template does); in raw mode only the model's own end tokens stop it."""
    if inputs.raw:
        return frozenset()
    return frozenset({engine.control_token(template.START)})


def resolve_lora(model: Optional[str], lora: Optional[str]) -> tuple[AdapterRef, ...]:
    """`lora` -> the adapters to apply. A finetune name or id; or, as an extension, several
    with scales: "style:0.5,facts" (names cannot contain ':' or ',', so this is unambiguous)."""
    if lora is None:
        return ()
    refs = []
    for part in lora.split(","):
        name, _, scale = part.strip().partition(":")
        entry = finetunes.get(name, finetunes.normalize_model(model))
        _check_base(entry, model)
        if entry.status != "ready":
            raise finetunes.FinetuneIncomplete(
                f"lora: finetune {entry.name!r} is not usable yet: it still needs "
                f"{', '.join(f for f in finetunes.REQUIRED_FILES if f not in entry.files)}")
        refs.append(AdapterRef(str(entry.adapter_path), _scale(scale, part)))
    return tuple(refs)


def _check_base(entry: finetunes.Finetune, model: Optional[str]) -> None:
    """The finetune's model id must be the request's, or name the very same local file."""
    from .models import local_path

    wanted = finetunes.normalize_model(model)
    if entry.model == wanted:
        return
    mine, theirs = local_path(entry.model), local_path(wanted)  # never downloads
    if mine is None or theirs is None or mine.resolve() != theirs.resolve():
        raise InvalidInput(f"lora: finetune {entry.name!r} was made for {entry.model}, not {wanted}")


def _scale(text: str, part: str) -> float:
    if not text:
        return 1.0
    try:
        return float(text)
    except ValueError:
        raise InvalidInput(f"lora: {part!r} has scale {text!r}; write NAME or NAME:SCALE, e.g. style:0.5") from None


def _refuse_unbuilt(inputs: Inputs) -> None:
    # These fields are part of the contract but their machinery lands in later work; a
    # request that uses them is refused by name rather than silently answered without them.
    if inputs.response_format is not None:
        raise NotSupported("response_format: structured output is not available in this build yet")
    if isinstance(inputs, MessagesInputs) and (inputs.tools or inputs.functions):
        raise NotSupported("tools: tool calling is not available in this build yet")


def run(model: Optional[str] = None, inputs: Union[dict, Inputs, None] = None, **fields: Any):
    """Run one request. Returns {"response", "usage"} — or, with `stream: true`, an iterator
    of {"response": piece} dicts ending with {"response": "", "usage": {...}}.

    `run("@cf/google/gemma-2b-it-lora", {"prompt": "hi"})`, or keyword fields:
    `run(prompt="hi", temperature=0)`. `model=None` is the embedded Gemma 3 270M.
    """
    inputs = parse_inputs({**(inputs or {}), **fields} if not isinstance(inputs, (PromptInputs, MessagesInputs)) else inputs)
    _refuse_unbuilt(inputs)
    adapters = resolve_lora(model, inputs.lora)
    engine = get_engine(model)
    chunks = engine.generate(encode(engine, inputs), SamplingParams.from_inputs(inputs), inputs.max_tokens,
                             stop_tokens(engine, inputs), adapters)
    return _stream(chunks) if inputs.stream else _collect(chunks)


def usage(last: Chunk) -> dict[str, int]:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
    }


def _collect(chunks: Iterator[Chunk]) -> Result:
    parts = []
    for chunk in chunks:
        parts.append(chunk.text)
    return {"response": "".join(parts), "usage": usage(chunk)}


def _stream(chunks: Iterator[Chunk]) -> Iterator[Result]:
    for chunk in chunks:
        if chunk.finish_reason is None:
            yield {"response": chunk.text}
        else:
            yield {"response": "", "usage": usage(chunk)}
