"""The `localgemma` command: a thin door onto the runtime. Only this module knows terminals."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import __version__
from .contract import PromptInputs
from .jsontext import strict_json
from .errors import LocalGemmaError

# Sampling options are generated from the contract, so bounds and help live in one place.
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed",
             "repetition_penalty", "frequency_penalty", "presence_penalty")


def load_options(fn):
    """--n-ctx and --kv-type: how the model is loaded (settings.py declares them)."""
    from .settings import option

    fn = option("kv_type", "--kv-type", type=click.Choice(["f16", "q8_0", "q4_0"]))(fn)
    return option("n_ctx", "--n-ctx")(fn)


def _configure(n_ctx, kv_type) -> None:
    """Flags win over LOCALGEMMA_* variables: the default runtime loads with them."""
    if n_ctx is not None or kv_type is not None:
        from .runtime import configure
        from .settings import current

        configure(exact=True, settings=current(n_ctx=n_ctx, kv_type=kv_type))


def sampling_options(fn):
    schema = PromptInputs.model_json_schema()["properties"]
    for name in reversed(_SAMPLING):
        field, prop = PromptInputs.model_fields[name], schema[name]
        kind = int if "integer" in json.dumps(prop) else float
        bounds = [f"{word} {prop[key]}" for key, word in (("minimum", "min"), ("maximum", "max")) if key in prop]
        for alt in prop.get("anyOf", []):
            bounds += [f"{word} {alt[key]}" for key, word in (("minimum", "min"), ("maximum", "max")) if key in alt]
        default = f"default {field.default}" if field.default is not None else "default unset"
        help_text = "; ".join(x for x in (field.description, ", ".join(bounds), default) if x)
        fn = click.option(f"--{name.replace('_', '-')}", name, type=kind, default=None, help=help_text)(fn)
    return fn


class _Group(click.Group):
    """Every LocalGemmaError becomes one readable line and exit status 1; so does anything
    unforeseen (never a traceback), marked as the bug it is."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LocalGemmaError as exc:
            raise click.ClickException(exc.message) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            raise click.ClickException(f"internal error ({type(exc).__name__}: {exc}); this is a bug in localgemma, "
                                       "please report it with the command that caused it") from None


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="localgemma")
def main() -> None:
    """Workers AI's LoRA Gemma models, offline on this machine."""


@main.command()
@click.argument("prompt", required=False)
@click.option("--model", "-m", default=None, help="Model id or .gguf path (default: the embedded Gemma 3 270M).")
@click.option("--input", "input_file", type=click.File("r"), default=None,
              help="A full contract inputs object as JSON (a file, or - for stdin).")
@click.option("--lora", default=None, help="Finetune name or id.")
@click.option("--raw", is_flag=True, default=None, help="Send the prompt as written, no chat template.")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result object (one JSON line per chunk with --stream).")
@sampling_options
@load_options
def run(prompt, model, input_file, lora, raw, stream, as_json, n_ctx, kv_type, **sampling):
    """Run one request, like env.AI.run(MODEL, INPUTS)."""
    from .runtime import run as run_request

    _configure(n_ctx, kv_type)
    inputs = _read_inputs(input_file)
    if prompt is not None:
        inputs["prompt"] = prompt
    overrides = {"lora": lora, "raw": raw, **sampling}
    inputs.update({k: v for k, v in overrides.items() if v is not None})
    if stream:
        inputs["stream"] = True
    if "prompt" not in inputs and "messages" not in inputs:
        raise click.UsageError("give a PROMPT, or --input with a prompt or messages")
    result = run_request(model, inputs)
    if not inputs.get("stream"):
        click.echo(json.dumps(result, ensure_ascii=False) if as_json else result["response"])
        return
    for chunk in result:
        if as_json:
            click.echo(json.dumps(chunk, ensure_ascii=False))
        else:
            click.echo(chunk["response"], nl=False)
            sys.stdout.flush()
    if not as_json:
        click.echo()


def _read_inputs(fh) -> dict[str, Any]:
    if fh is None:
        return {}
    try:
        data = strict_json(fh.read())
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON ({exc})", param_hint="--input") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"must be a JSON object, got {type(data).__name__}", param_hint="--input")
    return data


@main.command()
@click.option("--model", "-m", default=None, help="Model id or .gguf path (default: the embedded Gemma 3 270M).")
@click.option("--system", default=None, help="A system message to start the conversation with.")
@click.option("--lora", default=None, help="Finetune name or id.")
@sampling_options
@load_options
def chat(model, system, lora, n_ctx, kv_type, **sampling):
    """Talk to the model: streaming, keeps history. /reset forgets it, /exit leaves."""
    from .runtime import get_engine, run as run_request

    _configure(n_ctx, kv_type)
    get_engine(model)  # load (and fail) before the first prompt, not after it
    options = {k: v for k, v in {"lora": lora, **sampling}.items() if v is not None}
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    click.echo("Type a message; /reset forgets the conversation, /exit leaves.")
    while True:
        try:
            line = click.prompt(">", prompt_suffix=" ", default="", show_default=False)
        except (EOFError, click.Abort):
            click.echo()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = list(start)
            click.echo("(conversation reset)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        for chunk in run_request(model, {"messages": history, "stream": True, **options}):
            reply.append(chunk["response"])
            click.echo(chunk["response"], nl=False)
            sys.stdout.flush()
        click.echo()
        history.append({"role": "assistant", "content": "".join(reply)})


@main.group()
def models() -> None:
    """The model catalog and local model files."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_list(as_json):
    """Known model ids, bindings, and whether their file is here."""
    from .models import CATALOG, EMBEDDED_ID, bindings, local_path

    rows = []
    bound = bindings()
    for model_id in list(CATALOG) + [b for b in bound if b not in CATALOG]:
        path = local_path(model_id)
        spec = CATALOG.get(model_id)
        rows.append({
            "id": model_id,
            "default": model_id == EMBEDDED_ID,
            "description": spec.description if spec else "bound to a local file",
            "path": str(path) if path else None,
            "bound": model_id in bound,
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        where = row["path"] or "(not downloaded: localgemma models pull ID)"
        mark = "*" if row["default"] else " "
        click.echo(f"{mark} {row['id']}\n    {row['description']}\n    {where}")


@models.command("pull")
@click.argument("model_id")
def models_pull(model_id):
    """Download a catalog model (or assemble the embedded one)."""
    from .models import pull

    click.echo(pull(model_id))


@models.command("path")
@click.argument("model_id", required=False)
def models_path(model_id):
    """Print the local GGUF path of a model (assembling the embedded one on first use)."""
    from .models import resolve

    click.echo(resolve(model_id))


@models.command("bind")
@click.argument("model_id")
@click.argument("path", type=click.Path(dir_okay=False))
def models_bind(model_id, path):
    """Make MODEL_ID run on a local GGUF file (e.g. @cf/google/gemma-2b-it-lora)."""
    from .models import bind

    click.echo(f"{model_id} -> {bind(model_id, path)}")


@models.command("unbind")
@click.argument("model_id")
def models_unbind(model_id):
    """Forget a binding made with `models bind`."""
    from .models import unbind

    unbind(model_id)
    click.echo(f"{model_id} unbound")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(as_json):
    """llama.cpp build, SIMD features, backend, threads, and what each model needs in memory."""
    from . import memory, system
    from .bindings import llama_cpp
    from .environment import variables
    from .models import CATALOG, home, local_path
    from .settings import current

    settings = current()
    available = system.available_memory()
    facts = {
        "localgemma": __version__,
        "llama_cpp_python": llama_cpp.__version__,
        "backend": system.backend(),
        "simd": system.simd_features(),
        "threads": system.physical_cores(),
        "available_memory_mib": available // 2**20 if available is not None else "unknown",
        "home": str(home()),
        "llama_cpp_system_info": system.system_info(),
    }
    estimates = {}
    for model_id, spec in CATALOG.items():  # a file here: its own header; else the catalog's shape
        path = local_path(model_id)
        try:
            shape = memory.shape_of(path) if path else spec.shape
        except LocalGemmaError:  # a damaged file: `run` names what is wrong; here, the catalog's numbers
            shape = spec.shape
        if shape is None:
            continue
        n_ctx = settings.n_ctx or spec.n_ctx
        batch = memory.batch_context(settings.batch_ctx, settings.parallel)
        run = memory.estimate(shape, [memory.Context(n_ctx)], settings.kv_type)
        serve = memory.estimate(shape, [memory.Context(n_ctx), batch], settings.kv_type)
        largest = lambda *others: (memory.largest_context(shape, available, settings.kv_type, others)  # noqa: E731
                                   if available else None)
        estimates[model_id] = {"run": run.to_dict(), "serve": serve.to_dict(), "here": path is not None,
                               "n_ctx_train": shape.n_ctx_train,
                               "fits_run": available is None or run.total <= available,
                               "fits_serve": available is None or serve.total <= available,
                               "largest_context_that_fits": largest(),
                               "largest_context_that_fits_serve": largest(batch)}
    if as_json:
        click.echo(json.dumps({**facts, "memory": estimates}, indent=2))
        return
    for key, value in facts.items():
        click.echo(f"{key:22} {', '.join(value) if isinstance(value, list) else value}")
    context = settings.n_ctx or "the catalog's"
    changed = sorted(f"{name}={value}" for name, value in variables().items()
                     if name.removeprefix("LOCALGEMMA_").lower() in ("n_ctx", "kv_type", "batch_ctx", "parallel"))
    given = ", ".join(changed) + "; " if changed else ""
    click.echo(f"\nmemory needed at {'these' if changed else 'the default'} settings ({given}context {context}, "
               f"KV {settings.kv_type}; serve adds a batch context of {settings.batch_ctx} tokens for "
               f"{settings.parallel} requests):")
    for model_id, e in estimates.items():
        verdict = lambda ok: "fits" if ok else "does NOT fit"  # noqa: E731
        largest = ", ".join(f"{door} {e[key] or 'none' + beside}" for door, key, fits, beside in (
            ("run", "largest_context_that_fits", e["fits_run"], ""),
            ("serve", "largest_context_that_fits_serve", e["fits_serve"],
             " beside its batch context: `serve` names what would fit")) if not fits)
        trained = (f"; more than the {e['n_ctx_train']} tokens it was trained on (refused)"
                   if e["n_ctx_train"] and e["run"]["contexts"][0] > e["n_ctx_train"] else "")
        click.echo(f"  {model_id:32} run {e['run']['total_mib']:>6,} MiB ({verdict(e['fits_run'])}), serve "
                   f"{e['serve']['total_mib']:>6,} MiB ({verdict(e['fits_serve'])})"
                   + (f"; largest context that fits: {largest}" if largest else "") + trained)


from .convert.cli import convert  # noqa: E402  (PEFT -> GGUF, merge, quantize)
from .server.cli import serve  # noqa: E402  (the HTTP server; its imports are lazy)

main.add_command(convert)
main.add_command(serve)


@main.group()
def finetune() -> None:
    """LoRA finetunes (PEFT adapters), like `wrangler ai finetune`."""


@finetune.command("create")
@click.argument("model")
@click.argument("name")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--description", default="", help="Free text stored with the finetune.")
@click.option("--exist-ok", is_flag=True,
              help="If NAME already exists for MODEL from the same files, print its id instead of failing.")
def finetune_create(model, name, folder, description, exist_ok):
    """Validate and convert the PEFT adapter in FOLDER for MODEL; prints the new id."""
    from . import finetunes

    entry = finetunes.create(model, name, folder, description, exist_ok=exist_ok)
    for note in entry.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(entry.id)


@finetune.command("list")
@click.option("--model", "-m", default=None, help="Only this model's finetunes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def finetune_list(model, as_json):
    """Every finetune: id, name, model, description."""
    from . import finetunes

    entries = finetunes.list_finetunes(model)
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    if not entries:
        click.echo("no finetunes yet: localgemma finetune create MODEL NAME FOLDER")
    for e in entries:
        click.echo(f"{e.id}  {e.name:24} {e.model}  {e.status}  {e.description}")


@finetune.command("show")
@click.argument("name_or_id")
@click.option("--model", "-m", default=None, help="The model, when a name is used for several.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def finetune_show(name_or_id, model, as_json):
    """One finetune, with the path of its GGUF adapter."""
    from . import finetunes

    data = finetunes.get(name_or_id, model).to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        click.echo(f"{key:13} {', '.join(value) if isinstance(value, list) else value}")


@finetune.command("delete")
@click.argument("name_or_id")
@click.option("--model", "-m", default=None, help="The model, when a name is used for several.")
def finetune_delete(name_or_id, model):
    """Remove a finetune and its files."""
    from . import finetunes

    entry = finetunes.delete(name_or_id, model)
    click.echo(f"deleted {entry.name} ({entry.id})")


@finetune.command("verify")
@click.argument("name_or_id")
@click.option("--model", "-m", default=None, help="The model, when a name is used for several.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def finetune_verify(name_or_id, model, as_json):
    """Compare the runtime's logits with the adapter against the adapter merged in numpy."""
    from .verify import verify

    report = verify(name_or_id, model)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(f"finetune {report.finetune}")
    rows = [("runtime adapter vs merged", report.adapter_vs_merged),
            ("noise floor (no adapter)", report.noise_floor),
            ("bare base vs merged", report.base_vs_merged)]
    if report.adapter_vs_peft is not None:
        rows += [("runtime adapter vs PEFT", report.adapter_vs_peft),
                 ("llama.cpp vs torch, no adapter", report.peft_noise_floor)]
    for label, a in rows:
        click.echo(f"  {label:30} top-1 agreement {a.top1:7.2%}   KL mean {a.kl_mean:.5f}  max {a.kl_max:.5f}"
                   f"  ({a.positions} positions)")
    click.echo(f"  PEFT: {report.peft}")
    click.echo("  OK: the runtime applies this adapter as merged" if report.ok else
               "  MISMATCH: the runtime's adapter does not match its PEFT source")
    if not report.ok:
        raise SystemExit(1)


@finetune.command("push")
@click.argument("name_or_id")
@click.option("--account", envvar="CLOUDFLARE_ACCOUNT_ID", help="Cloudflare account id (env CLOUDFLARE_ACCOUNT_ID).")
@click.option("--token", envvar="CLOUDFLARE_API_TOKEN", help="API token with Workers AI write access "
              "(env CLOUDFLARE_API_TOKEN; prefer the variable: a flag shows in the process list).")
@click.option("--api-base", envvar="CLOUDFLARE_BASE_URL", default="https://api.cloudflare.com/client/v4",
              show_default=True, help="The REST API's base (env CLOUDFLARE_BASE_URL); another localgemma serve "
              "answers at http://HOST:PORT/client/v4.")
@click.option("--model", "-m", default=None, help="The model, when a name is used for several.")
@click.option("--name", "remote_name", default=None, help="Name on Workers AI (default: the same).")
@click.option("--public", is_flag=True, help="Make the finetune public on Workers AI.")
@click.option("--resume", is_flag=True, help="Upload into the remote finetune of that name (after a push failed).")
@click.option("--max-rank", type=click.IntRange(1), default=32, show_default=True, help="Workers AI's rank limit.")
@click.option("--max-mb", type=click.FloatRange(0, min_open=True), default=300.0, show_default=True,
              help="Workers AI's adapter file limit, MB.")
@click.option("--max-adapters", type=click.IntRange(1), default=100, show_default=True,
              help="Workers AI's finetunes per account.")
def finetune_push(name_or_id, account, token, api_base, model, remote_name, public, resume, max_rank, max_mb,
                  max_adapters):
    """Create the finetune on Workers AI (or another localgemma) and upload its PEFT files.

    Workers AI's limits (model, rank, file size, adapters per account) are checked first, and a
    refusal names the one that fails. Then `"lora": "NAME"` works there as it does here."""
    from .remote import Limits, push

    def progress(file_name: str, sent: int, total: int) -> None:
        end = "\n" if sent >= total else ""
        click.echo(f"\rupload {file_name}: {sent / 1e6:7.1f} / {total / 1e6:.1f} MB ({sent / max(total, 1):4.0%})",
                   nl=bool(end), err=True)

    remote = push(name_or_id, account=account or "", token=token or "", api_base=api_base, model=model,
                  remote_name=remote_name, public=public, resume=resume, progress=progress,
                  limits=Limits(max_rank=max_rank, max_mb=max_mb, max_adapters=max_adapters),
                  notes=lambda note: click.echo(f"note: {note}", err=True))
    click.echo(f"pushed {remote.get('name')} ({remote.get('id')}) for {remote.get('model')}: "
               f"use \"lora\": \"{remote.get('name')}\" with {remote.get('model')}")


@finetune.command("export")
@click.argument("name_or_id")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--model", "-m", default=None, help="The model, when a name is used for several.")
def finetune_export(name_or_id, folder, model):
    """Write the finetune's PEFT files (as uploaded) to a new FOLDER, for vLLM or LoRAX."""
    from .remote import export

    dest = export(name_or_id, folder, model)
    click.echo(f"{dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}")
