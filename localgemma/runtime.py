"""`run(model, inputs)`: the Python mirror of `env.AI.run`.

contract (validate) -> template (pieces) -> tokens -> sampling -> engine -> output shape.
Everything that can fail on the request (validation, model resolution, context size) fails
when `run` is called, before any text is produced — also for streams.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

from . import finetunes, structured, template
from . import tools as tools_mod
from .adapters import AdapterRef
from .contract import Inputs, MessagesInputs, PromptInputs, parse_inputs
from .engine import Chunk, Engine
from .errors import InvalidInput, LocalGemmaError
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .batching import Batcher

Result = dict[str, Any]

_engines: dict[Path, Engine] = {}
_engines_lock = threading.Lock()
_batchers: dict[Path, "Batcher"] = {}


@dataclass
class Config:
    """How this process generates. Off by default for the Python API: every answer is exact
    (bit-identical to a solo run). `localgemma serve` turns batching on unless --exact."""

    batching: bool = False  # concurrent unseeded requests share decode steps (localgemma.batching)
    exact: bool = False  # with batching on: every request runs alone, exactly
    parallel: Optional[int] = None  # sequences per batch (None: LOCALGEMMA_PARALLEL or 4)
    ctx: Optional[int] = None  # KV cells shared by them (None: LOCALGEMMA_BATCH_CTX or 4096)


config = Config()


def configure(**fields: Any) -> Config:
    """`configure(batching=True, parallel=8)`: applies to batchers created afterwards."""
    global config
    config = replace(config, **fields)
    return config


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


def get_batcher(model: Optional[str] = None) -> "Batcher":
    """The batch scheduler over a model's engine, created on first use and kept."""
    return batcher_for(get_engine(model))


def batcher_for(engine: Engine) -> "Batcher":
    from .batching import Batcher

    with _engines_lock:
        batcher = _batchers.get(engine.path)
        if batcher is None:
            batcher = _batchers[engine.path] = Batcher(engine, config.parallel, config.ctx)
        return batcher


def unload_all() -> None:
    with _engines_lock:
        for batcher in _batchers.values():  # first: they decode on the engines' models
            batcher.close()
        _batchers.clear()
        for engine in _engines.values():
            engine.close()
        _engines.clear()


def encode(engine: Engine, inputs: Inputs, preamble: Optional[str] = None) -> list[int]:
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
        pieces = template.render_messages(inputs.messages, preamble)
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


@dataclass
class Prepared:
    """A validated request, ready for the engine, and what turns its text into the result."""

    engine: Engine
    tokens: list[int]
    params: SamplingParams
    max_tokens: int
    stop: frozenset[int]
    adapters: tuple[AdapterRef, ...]
    schema: Optional[dict] = None
    tools: list = field(default_factory=list)
    tool_mode: str = "auto"

    def generate(self) -> Iterator[Chunk]:
        if not config.batching:
            return self.engine.generate(self.tokens, self.params, self.max_tokens, self.stop, self.adapters)
        batcher = batcher_for(self.engine)  # exact/seeded requests pause it and run alone
        return batcher.generate(self.tokens, self.params, self.max_tokens, self.stop, self.adapters,
                                exact=config.exact)

    def finish(self, text: str, last: Chunk) -> Result:
        """The result's fields beyond usage: response (parsed JSON with a schema), tool_calls."""
        if self.schema is not None:
            return {"response": structured.parse(text, self.schema, last.finish_reason, self.max_tokens)}
        if self.tools:
            call = tools_mod.parse_call(text, self.tools, self.tool_mode)
            if call is not None:
                return {"response": "", "tool_calls": [call]}
        return {"response": text}


def prepare(model: Optional[str], inputs: Inputs) -> Prepared:
    """Everything that can refuse a request, done before any token is generated."""
    schema, grammar, tools, mode, preamble = None, None, [], "auto", None
    if isinstance(inputs, MessagesInputs) and (inputs.tools or inputs.functions):
        if inputs.response_format is not None:
            raise InvalidInput("response_format: cannot be combined with tools; use one or the other")
        tools = tools_mod.tools_of(inputs)
        mode, name = tools_mod.choice_of(inputs.tool_choice, tools)
        grammar = tools_mod.grammar(tools, mode, name)
        preamble = tools_mod.render(tools) if mode != "none" else None
    elif isinstance(inputs, MessagesInputs) and inputs.tool_choice not in (None, "none", "auto"):
        raise InvalidInput("tool_choice: asks for a tool call, but the request has no tools")
    if inputs.response_format is not None:
        schema = structured.schema_of(inputs.response_format)
        grammar = structured.grammar_for(schema)
    adapters = finetunes.adapters_for(model, inputs.lora)
    engine = get_engine(model)
    params = replace(SamplingParams.from_inputs(inputs), grammar=grammar)
    return Prepared(engine, encode(engine, inputs, preamble), params, inputs.max_tokens,
                    stop_tokens(engine, inputs), adapters, schema, tools, mode)


class Cancelled(LocalGemmaError):
    code = 3008  # Cloudflare's "aborted"
    status = 408


def run(model: Optional[str] = None, inputs: Union[dict, Inputs, None] = None, *,
        cancel: Optional[threading.Event] = None, **fields: Any):
    """Run one request. Returns {"response", "usage"} (plus "tool_calls" when the model called
    a tool) -- or, with `stream: true`, an iterator of {"response": piece} dicts ending with
    {"response": "", "usage": {...}} (plus "tool_calls", or with a schema "parsed").

    `run("@cf/google/gemma-2b-it-lora", {"prompt": "hi"})`, or keyword fields:
    `run(prompt="hi", temperature=0)`. `model=None` is the embedded Gemma 3 270M.
    `cancel`, when set (from another thread), stops a non-streamed generation between tokens
    with `Cancelled`; a stream is stopped by no longer iterating it (and closing it).
    """
    if not isinstance(inputs, (PromptInputs, MessagesInputs)):
        inputs = {**(inputs or {}), **fields}
    inputs = parse_inputs(inputs)
    prepared = prepare(model, inputs)
    chunks = prepared.generate()
    return _stream(chunks, prepared) if inputs.stream else _collect(chunks, prepared, cancel)


def usage(last: Chunk) -> dict[str, int]:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
    }


def _collect(chunks: Iterator[Chunk], prepared: Prepared, cancel: Optional[threading.Event] = None) -> Result:
    parts = []
    try:
        for chunk in chunks:
            parts.append(chunk.text)
            if cancel is not None and cancel.is_set():
                raise Cancelled("the request was cancelled before it finished")
    finally:
        chunks.close()  # in this thread: frees the engine at once
    return {**prepared.finish("".join(parts), chunk), "usage": usage(chunk)}


def _stream(chunks: Iterator[Chunk], prepared: Prepared) -> Iterator[Result]:
    parts = []
    for chunk in chunks:
        if chunk.finish_reason is None:
            parts.append(chunk.text)
            yield {"response": chunk.text}
    final: Result = {"response": "", "usage": usage(chunk)}
    if prepared.schema is not None or prepared.tools:
        done = prepared.finish("".join(parts), chunk)
        if "tool_calls" in done:
            final["tool_calls"] = done["tool_calls"]
        elif prepared.schema is not None:
            final["parsed"] = done["response"]
    yield final
