"""`convert`: the command-line door onto localgemma.convert (lora, merge, quantize).

Only this module prints. Library refusals (ConversionError) and model-resolution errors become
one-line click errors with a non-zero exit status.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import click

from ..errors import LocalGemmaError
from ..settings import option
from .llama_quant import QUANT_TYPES


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except LocalGemmaError as exc:
        raise click.ClickException(exc.message) from None


def _resolve_base(base: Optional[str]) -> Path:
    """A .gguf path, or a model id (None: the embedded Gemma 3 270M), as a local GGUF path."""
    from localgemma.models import resolve

    return Path(resolve(base))


def _parse_adapter(spec: str) -> tuple[str, float]:
    """"path:0.5" -> ("path", 0.5); a trailing ":" part that is not a number belongs to the path."""
    path, sep, scale = spec.rpartition(":")
    if sep and path:
        try:
            value = float(scale)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(value):
            raise click.BadParameter(f"scale {scale!r} in {spec!r} is not a finite number", param_hint="ADAPTER")
        return path, value
    return spec, 1.0


def _quant_type(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    if value is None or value.upper() in QUANT_TYPES:
        return value and value.upper()
    raise click.BadParameter(f"{value!r} is not a quantization type; choose one of {', '.join(QUANT_TYPES)}")


_TYPES_HELP = ", ".join(QUANT_TYPES)


@click.group("convert")
def convert() -> None:
    """Convert PEFT LoRA adapters to GGUF, merge them into a base, quantize GGUF models."""


@convert.command("lora")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@click.option("--base", "base", metavar="BASE", default=None,
              help="Base model: a .gguf path or a model id (default: the embedded Gemma 3 270M).")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the GGUF adapter (OUT.gguf).")
@option("max_lora_rank", "--max-rank")
def lora_command(adapter_dir: Path, base: Optional[str], out: Path, max_lora_rank: Optional[int]) -> None:
    """Convert a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) to GGUF."""
    from .lora import peft_to_gguf

    with _user_errors():
        info = peft_to_gguf(adapter_dir, _resolve_base(base), out, max_rank=max_lora_rank)
    for note in info.notes():
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {info.out_path}: LoRA for {info.architecture}, rank {info.rank}, alpha {info.alpha:g}, "
               f"{', '.join(info.targets)} on {len(info.layers)} layers ({info.n_tensors} tensors), "
               f"sha256 {info.sha256}")


@convert.command("merge")
@click.argument("base")
@click.argument("adapters", metavar="ADAPTER[:SCALE]...", nargs=-1, required=True)
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the merged model (OUT.gguf).")
@click.option("--type", "out_type", default=None, callback=_quant_type, metavar="T",
              help=f"Output type: {_TYPES_HELP} (default: every tensor keeps the base's type).")
def merge_command(base: str, adapters: tuple[str, ...], out: Path, out_type: Optional[str]) -> None:
    """Merge LoRA adapters (GGUF files or PEFT folders, each with an optional :SCALE) into BASE."""
    from .merging import merge

    pairs = [_parse_adapter(spec) for spec in adapters]
    with _user_errors():
        base_path = _resolve_base(base)
        with click.progressbar(length=1, label="merging", file=sys.stderr) as bar:
            def progress(done: int, total: int) -> None:
                bar.length = total
                bar.update(done - bar.pos)

            info = merge(base_path, pairs, out, out_type=out_type, progress=progress)
    click.echo(f"wrote {info.out_path}: {info.out_type}, {len(info.merged)} weights merged")


@convert.command("quantize")
@click.argument("in_path", metavar="IN")
@click.argument("out", metavar="OUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--type", "out_type", required=True, callback=_quant_type, metavar="T",
              help=f"Quantization type: {_TYPES_HELP}.")
def quantize_command(in_path: str, out: Path, out_type: str) -> None:
    """Quantize a GGUF model (a .gguf path or a model id) with llama.cpp's quantizer."""
    from .llama_quant import quantize

    with _user_errors():
        source = _resolve_base(in_path)
        click.echo(f"quantizing {source} to {out_type} ...", err=True)
        written = quantize(source, out, out_type)
    click.echo(f"wrote {written}")
