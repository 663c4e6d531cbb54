"""`run(model, inputs)`: the Python mirror of `env.AI.run`, and the runtime every door shares.

contract (validate) -> template (pieces) -> tokens -> GenerationRequest -> engine or batcher
-> Chunks -> one typed `Result`. Everything that can fail on the request (validation, model
resolution, context size, grammar) fails in `prepare`, before any text is produced -- also for
streams. A `Runtime` owns the loaded engines (and, unless exact, their batchers): the Python
API uses a default one; `localgemma serve` builds its own from its settings.

Doors turn what the runtime gives into their wire shapes: contract.output / contract.event
(Workers AI's, used by `run` and the Workers AI routes), server/openai_shim.py (OpenAI's) and
cli.py (a terminal's). None of them recomputes a finish reason: `Result.finish_reason` is
the engine's ("stop", "length") or, for a call, "tool_calls".
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

from . import finetunes, structured, template
from . import tools as tools_mod
from .contract import Inputs, MessagesInputs, PromptInputs, event, output, parse_inputs
from .errors import Aborted, InvalidInput
from .generation import Chunk, GenerationRequest, Result, Usage
from .sampling import SamplingParams
from .settings import Settings
from .settings import current as current_settings

if TYPE_CHECKING:
    from .batching import Batcher
    from .engine import Engine

# A prompt this short tokenizes in well under a millisecond (~0.5 ms per 1000 characters on a
# 2-core x86 box): see Runtime.quick.
QUICK_CHARS = 1024
TURN_CHARS = 32  # what the template adds per message ("<start_of_turn>user\n" ... "<end_of_turn>\n")


class Runtime:
    """The engines (and batchers) of one process or one server. `exact`: every request runs
    alone on its engine, bit-identical to a solo run; otherwise unseeded requests share decode
    steps (localgemma.batching; seeded ones still run alone)."""

    def __init__(self, settings: Optional[Settings] = None, *, exact: bool = True):
        self.settings = settings
        self.exact = exact
        self._engines: dict[Path, "Engine"] = {}
        self._batchers: dict[Path, "Batcher"] = {}
        self._lock = threading.Lock()

    def _settings(self) -> Settings:
        return self.settings or current_settings()

    def engine(self, model: Optional[str] = None) -> "Engine":
        """The engine for a model id or .gguf path, loaded once and kept."""
        from .engine import Engine
        from .models import resolve

        path = resolve(model).resolve()
        with self._lock:
            engine = self._engines.get(path)
            if engine is None:
                n_ctx, note = self.plan(model, path)
                if note:
                    import logging

                    logging.getLogger("localgemma").warning(note)
                settings = self._settings()
                engine = self._engines[path] = Engine(path, n_ctx=n_ctx, n_threads=settings.threads,
                                                      kv_type=settings.kv_type)
            return engine

    def plan(self, model: Optional[str], path: Optional[Path] = None) -> tuple[int, Optional[str]]:
        """The context `model` will load with: the one asked for or the catalog's when it fits in
        memory (with the batch context a server adds), else the largest that fits, with a note
        saying so; InsufficientMemory, naming what would fit, when what was asked for won't."""
        from . import memory
        from .models import CATALOG, resolve

        settings = self._settings()
        spec = CATALOG.get(model or "")
        batch = None if self.exact else memory.batch_context(settings.batch_ctx, settings.parallel)
        return memory.fit(path or resolve(model).resolve(), n_ctx=settings.n_ctx,
                          default_ctx=spec.n_ctx if spec else None, kv_type=settings.kv_type, batch=batch)

    def batcher(self, engine: "Engine") -> Optional["Batcher"]:
        """The engine's batch scheduler (None when exact), created on first use and kept."""
        if self.exact:
            return None
        from .batching import Batcher

        with self._lock:
            batcher = self._batchers.get(engine.path)
            if batcher is None:
                settings = self._settings()
                batcher = self._batchers[engine.path] = Batcher(engine, settings.parallel, settings.batch_ctx)
            return batcher

    def load(self, model: Optional[str] = None) -> None:
        """Load a model (and its batch context) now, so the first request does not wait."""
        self.batcher(self.engine(model))

    def prepare(self, model: Optional[str], inputs: Inputs, *, logprobs: Optional[int] = None) -> "Prepared":
        """Everything that can refuse a request, done before any token is generated.
        `logprobs` (the OpenAI doors'): each token's log probability and its top k."""
        grammar, tools, mode, preamble = None, [], "auto", None
        # With tools too, response_format is the shape of a reply that is not a call.
        schema = None if inputs.response_format is None else structured.schema_of(inputs.response_format)
        if isinstance(inputs, MessagesInputs) and (inputs.tools or inputs.functions):
            tools = tools_mod.tools_of(inputs)
            mode, name = tools_mod.choice_of(inputs.tool_choice, tools)
            grammar = tools_mod.grammar(tools, mode, name, schema)
            preamble = tools_mod.render(tools) if mode != "none" else None
        elif isinstance(inputs, MessagesInputs) and inputs.tool_choice not in (None, "none", "auto"):
            raise InvalidInput("tool_choice: asks for a tool call, but the request has no tools")
        if schema is not None and grammar is None:
            grammar = structured.grammar_for(schema)
        adapters = finetunes.adapters_for(model, inputs.lora)
        engine = self.engine(model)
        tokens = encode(engine, inputs, preamble)
        request = GenerationRequest(
            tokens=tuple(tokens), sampling=SamplingParams.from_inputs(inputs, grammar),
            max_tokens=min(inputs.max_tokens, engine.check_fits(len(tokens))),  # clamped: finish "length"
            stop_tokens=stop_tokens(engine, inputs), adapters=adapters, stop=tuple(inputs.stop or ()),
            logprobs=logprobs)
        return Prepared(self, engine, request, inputs.max_tokens, schema, tools, mode)

    def quick(self, model: Optional[str], inputs: Any) -> bool:
        """Whether `prepare(model, inputs)` is sure to be quick (well under a millisecond), so
        an event loop may call it itself: the model is loaded, and there is no finetune to look
        up (the registry is on disk), no grammar to build (a schema or tools) and no long text
        to tokenize. Anything else is prepared in a thread."""
        from .errors import LocalGemmaError
        from .models import resolve

        if not isinstance(inputs, (PromptInputs, MessagesInputs)) or inputs.lora or inputs.response_format:
            return False
        if isinstance(inputs, PromptInputs):
            size = len(inputs.prompt)
        else:
            if inputs.tools or inputs.functions or any(m.tool_calls for m in inputs.messages):
                return False
            size = sum(TURN_CHARS + (len(m.content) if isinstance(m.content, str)
                                     else sum(len(p.text) for p in m.content or ()))
                       for m in inputs.messages)
        if size > QUICK_CHARS:
            return False
        try:
            return resolve(model, download=False).resolve() in self._engines
        except (LocalGemmaError, OSError):
            return False

    def open(self, model: Optional[str], inputs: Union[dict, Inputs], **options: Any) -> "Prepared":
        """`prepare` for inputs as given (a dict is validated first)."""
        return self.prepare(model, parse_inputs(inputs), **options)

    def stream(self, model: Optional[str], inputs: Union[dict, Inputs], **options: Any) -> Iterator[Union[Chunk, Result]]:
        """Text chunks as they come, then the Result. Fails (at the call) before any text."""
        prepared = self.open(model, inputs, **options)
        return prepared.run(prepared.generate())

    def close(self) -> None:
        with self._lock:
            for batcher in self._batchers.values():  # first: they decode on the engines' models
                batcher.close()
            for engine in self._engines.values():
                engine.close()
            self._batchers.clear()
            self._engines.clear()


@dataclass
class Prepared:
    """A validated request, ready for the engine, and what turns its text into the Result."""

    runtime: Runtime
    engine: "Engine"
    request: GenerationRequest
    asked: int  # max_tokens as asked (the request's may be clamped to the context)
    schema: Optional[dict] = None
    tools: list = field(default_factory=list)
    tool_mode: str = "auto"

    def generate(self) -> Iterator[Chunk]:
        batcher = self.runtime.batcher(self.engine)
        return (batcher or self.engine).generate(self.request)

    def run(self, chunks: Iterator[Chunk]) -> Iterator[Union[Chunk, Result]]:
        """The text chunks, then the Result made from all of them (see `Assembly`)."""
        assembly = Assembly(self)
        try:
            for chunk in chunks:
                yield from assembly.feed(chunk)
        finally:
            chunks.close()  # in this thread: frees the engine at once

    def push(self, emit: Callable[[Any], Optional[Callable[[], None]]]) -> Optional[Callable[[], None]]:
        """`run`, pushed instead of pulled, for a request the batcher takes: its thread calls
        `emit(item)` with each text Chunk and then the Result; with an exception if it failed;
        with None if it ended cancelled. Returns the function that cancels it. No thread of the
        caller's waits on it, and it waits on nothing -- but what `emit` returns, a function,
        which the batch thread calls before its next step (see batching._Sequence). None: the
        request is not batched (an exact runtime, a seed, too big for the pool); run
        `run(generate())` in a thread instead."""
        batcher = self.runtime.batcher(self.engine)
        if batcher is None:
            return None
        assembly = Assembly(self)

        def take(chunk: Union[Chunk, BaseException, None]) -> Optional[Callable[[], None]]:
            if chunk is None or isinstance(chunk, BaseException):
                return emit(chunk)
            try:
                items = assembly.feed(chunk)
            except Exception as exc:  # noqa: BLE001 - e.g. a schema the text did not meet: the answer
                return emit(exc)
            after = None
            for item in items:
                after = emit(item) or after
            return after

        return batcher.submit(self.request, take)

    def finish(self, text: str, last: Chunk, logprobs: tuple = ()) -> Result:
        usage = Usage(last.prompt_tokens, last.completion_tokens)
        if self.tools:
            cut = self.asked if last.finish_reason == "length" else None
            call = tools_mod.parse_call(text, self.tools, self.tool_mode, cut, answer=self.schema is not None)
            if call is not None:
                return Result(text, "tool_calls", usage, tool_calls=(call,))
        if self.schema is not None:
            value = structured.parse(text, self.schema, last.finish_reason, self.asked)
            return Result(text, last.finish_reason, usage, value=value, logprobs=logprobs)
        return Result(text, last.finish_reason, usage, logprobs=logprobs)


class Assembly:
    """Turns one generation's chunks into what a request gives: its text chunks as they come,
    then the Result made from all of them. A tool call never streams as text: with tools
    offered, the reply's first character says whether it is a call (then nothing streams; the
    Result carries it) or text (then it streams as it comes). With a response_format as well,
    a call and an answer both start with "{": the reply is held to its end, and an answer then
    goes out as one chunk before its Result."""

    def __init__(self, prepared: Prepared):
        self.prepared = prepared
        self.parts: list[str] = []
        self.logprobs: list = []
        self.calling: Optional[bool] = False  # None: not known yet
        self.holding = False  # everything held until the end (see above)
        if prepared.tools and prepared.tool_mode != "none":
            self.calling = True if prepared.tool_mode in ("required", "function") else None
            if self.calling is None and prepared.schema is not None:
                self.calling = self.holding = True

    def feed(self, chunk: Chunk) -> tuple[Union[Chunk, Result], ...]:
        """What `chunk` lets out: nothing, a text chunk, or (for the last chunk) the Result."""
        if chunk.finish_reason is not None:
            text = "".join(self.parts)
            result = self.prepared.finish(text, chunk, tuple(self.logprobs))
            if self.holding and not result.tool_calls and text:
                return Chunk(text, logprobs=tuple(self.logprobs)), result
            return (result,)
        self.parts.append(chunk.text)
        if chunk.logprobs:
            self.logprobs += chunk.logprobs
        if self.calling is None:  # still undecided: held until the first character decides
            text = "".join(self.parts)
            if not text:
                return ()
            self.calling = tools_mod.is_call(text)
            chunk = Chunk(text, logprobs=tuple(self.logprobs))
        return () if self.calling else (chunk,)


def encode(engine: "Engine", inputs: Inputs, preamble: Optional[str] = None) -> list[int]:
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


def stop_tokens(engine: "Engine", inputs: Inputs) -> frozenset[int]:
    """Templated replies also end where the model starts a new turn (as Ollama's Gemma
    template does); in raw mode only the model's own end tokens stop it."""
    if inputs.raw:
        return frozenset()
    return frozenset({engine.control_token(template.START)})


# -- the Python API: a default runtime, exact ----------------------------------------------------

_default = Runtime(exact=True)


def configure(*, exact: bool, settings: Optional[Settings] = None) -> Runtime:
    """`configure(exact=False)`: from now on the Python API batches concurrent unseeded
    requests (as `localgemma serve` does); exact=True (the default) runs each alone.
    `settings`: fixed settings (e.g. the CLI's flags) instead of the environment's at each load."""
    global _default
    if exact != _default.exact or settings is not None:
        old, _default = _default, Runtime(settings, exact=exact)
        old.close()
    return _default


def get_engine(model: Optional[str] = None) -> "Engine":
    return _default.engine(model)


def get_batcher(model: Optional[str] = None) -> Optional["Batcher"]:
    return _default.batcher(_default.engine(model))


def run(model: Optional[str] = None, inputs: Union[dict, Inputs, None] = None, *,
        cancel: Optional[threading.Event] = None, **fields: Any):
    """Run one request. Returns {"response", "usage"} (plus "tool_calls" when the model called
    a tool) -- or, with `stream: true`, an iterator of {"response": piece} dicts ending with
    {"response": "", "usage": {...}} (plus "tool_calls", or with a schema "parsed").

    `run("@cf/google/gemma-2b-it-lora", {"prompt": "hi"})`, or keyword fields:
    `run(prompt="hi", temperature=0)`. `model=None` is the embedded Gemma 3 270M.
    `cancel`, when set (from another thread), stops a non-streamed generation between tokens
    with `Aborted`; a stream is stopped by no longer iterating it (and closing it).
    """
    if not isinstance(inputs, (PromptInputs, MessagesInputs)):
        inputs = {**(inputs or {}), **fields}
    inputs = parse_inputs(inputs)
    items = _default.stream(model, inputs)
    if inputs.stream:
        return (event(item) for item in items)
    with contextlib.closing(items):
        for item in items:
            if cancel is not None and cancel.is_set():
                raise Aborted("the request was cancelled before it finished")
            if isinstance(item, Result):
                return output(item)
    raise AssertionError("a generation ends with its Result")  # pragma: no cover
