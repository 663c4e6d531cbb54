"""When one machine is not enough: a finetune moves, as the PEFT files it was made from.

- `push`: to Workers AI, through the same REST routes `localgemma serve` answers (create the
  finetune, then upload its two files), after checking Workers AI's documented limits so a
  refusal comes before anything is sent and names the limit.
- `export`: the original PEFT folder, ready for a GPU server (vLLM's `--lora-modules`, LoRAX).

Nothing local changes either way: the registry is only read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import InvalidInput, OverLimit, RemoteError
from .finetunes import REQUIRED_FILES, Finetune, get

WORKERS_AI_API = "https://api.cloudflare.com/client/v4"
# The models Workers AI serves LoRA adapters on that a Gemma adapter can go to. Its other LoRA
# models (Mistral, Llama 2) are other architectures: a Gemma adapter cannot run there.
WORKERS_AI_LORA_MODELS = ("@cf/google/gemma-2b-it-lora", "@cf/google/gemma-7b-it-lora")
CONFIG, WEIGHTS = REQUIRED_FILES

Progress = Callable[[str, int, int], None]  # (file name, bytes sent, bytes in all)


@dataclass(frozen=True)
class Limits:
    """Workers AI's documented LoRA limits (developers.cloudflare.com/workers-ai/fine-tunes/loras).
    They have grown over time (rank 8 → 32, 100 → 300 MB, 30 → 100 adapters): older accounts
    can pass the old ones (`finetune push --max-rank 8 --max-mb 100`)."""

    max_rank: int = 32
    max_mb: float = 300.0  # the safetensors file, in MB (10^6 bytes)
    max_adapters: int = 100  # per account


def check(entry: Finetune, limits: Limits = Limits()) -> list[str]:
    """Refuse (OverLimit, naming the limit) what Workers AI would refuse; else the notes on
    what the upload will change (the config's `model_type`)."""
    if entry.model not in WORKERS_AI_LORA_MODELS:
        raise OverLimit(f"model: {entry.name} is a finetune of {entry.model}, which Workers AI does not serve; "
                        f"Workers AI runs Gemma LoRA adapters on {' and '.join(WORKERS_AI_LORA_MODELS)} "
                        "(create the finetune for one of those, with an adapter trained on that Gemma)")
    files = entry.files_dir
    if entry.status != "ready" or files is None or not all((files / f).is_file() for f in REQUIRED_FILES):
        raise OverLimit(f"{entry.name} is {entry.status}: it needs both {CONFIG} and {WEIGHTS} before it can be pushed")
    config = _config(files / CONFIG)
    ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
    rank = max(int(r) for r in ranks if isinstance(r, (int, float)))
    if rank > limits.max_rank:
        raise OverLimit(f"rank: {entry.name} has rank {rank}; Workers AI takes adapters of rank {limits.max_rank} "
                        "at most (retrain with a smaller r, or pass --max-rank if your account allows more)")
    size = (files / WEIGHTS).stat().st_size
    if size > limits.max_mb * 1e6:
        raise OverLimit(f"size: {WEIGHTS} is {size / 1e6:.1f} MB; Workers AI takes {limits.max_mb:g} MB at most "
                        "(retrain with a smaller rank or fewer target modules, or save it in bf16)")
    model_type = config.get("model_type")
    if model_type is None:
        return [f'{CONFIG} gets "model_type": "gemma" on the way (Workers AI requires it; the local copy is unchanged)']
    if model_type != "gemma":
        raise OverLimit(f'model_type: {CONFIG} says "model_type": {model_type!r}; Workers AI needs "gemma" for '
                        f"{entry.model}")
    return []


def push(name_or_id: str, *, account: str, token: str, api_base: str = WORKERS_AI_API,
         model: Optional[str] = None, remote_name: Optional[str] = None, public: bool = False,
         limits: Limits = Limits(), resume: bool = False, progress: Optional[Progress] = None,
         notes: Optional[Callable[[str], None]] = None, transport: Any = None) -> dict[str, Any]:
    """Create the finetune on Workers AI and upload its PEFT files; returns the remote finetune
    object. `resume`: upload into the remote finetune of that name (a push that failed midway).
    `transport`: an httpx transport (tests)."""
    import httpx

    if not account:
        raise InvalidInput("account: give your Cloudflare account id (--account or CLOUDFLARE_ACCOUNT_ID)")
    if not token:
        raise InvalidInput("token: give a Cloudflare API token with Workers AI write access "
                           "(--token or CLOUDFLARE_API_TOKEN)")
    entry = get(name_or_id, model)
    for note in check(entry, limits):
        if notes:
            notes(note)
    name = remote_name or entry.name
    base = f"{api_base.rstrip('/')}/accounts/{account}/ai/finetunes"
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=httpx.Timeout(60.0, connect=15.0),
                      transport=transport) as http:
        existing = _call(http, "GET", base, api_base)
        if not isinstance(existing, list):
            raise RemoteError(f"{api_base} answered the finetune list with {type(existing).__name__}, not a list")
        same = [f for f in existing if isinstance(f, dict) and f.get("name") == name and f.get("model") == entry.model]
        if same and not resume:
            raise OverLimit(f"name: a finetune named {name!r} already exists on Workers AI for {entry.model} "
                            f"(id {same[0].get('id')}); push under another name with --name, or with --resume "
                            "to upload the files into it")
        if resume and not same:
            raise InvalidInput(f"--resume: there is no finetune named {name!r} for {entry.model} on Workers AI to "
                               "resume; push without --resume")
        if not same and len(existing) >= limits.max_adapters:
            raise OverLimit(f"adapters: the account already has {len(existing)} finetunes; Workers AI allows "
                            f"{limits.max_adapters} per account (pass --max-adapters if yours allows more)")
        remote = same[0] if same else _call(http, "POST", base, api_base, json={
            "model": entry.model, "name": name, "description": entry.description, "public": public})
        target = remote.get("id") or name
        with tempfile.TemporaryDirectory(prefix="localgemma-push-") as tmp:
            config = Path(tmp) / CONFIG
            data = _config(entry.files_dir / CONFIG)
            data.setdefault("model_type", "gemma")
            config.write_text(json.dumps(data, indent=2))
            for path in (config, entry.files_dir / WEIGHTS):
                try:
                    _upload(http, f"{base}/{target}/finetune-assets", api_base, path, progress)
                except RemoteError as exc:
                    raise RemoteError(f"{exc.message} -- the finetune {name!r} was created on Workers AI (id "
                                      f"{remote.get('id')}) but its files are not all in: run the same push with "
                                      "--resume") from None
    return remote


def export(name_or_id: str, dest: str | os.PathLike, model: Optional[str] = None) -> Path:
    """The finetune's PEFT files as uploaded, in `dest` (created; must not hold anything yet).
    Written beside it and renamed into place: `dest` is the whole folder or nothing."""
    entry = get(name_or_id, model)
    files = entry.files_dir
    if files is None or not all((files / f).is_file() for f in REQUIRED_FILES):
        raise OverLimit(f"{entry.name} is {entry.status}: it does not have both {CONFIG} and {WEIGHTS} yet")
    dest = Path(dest).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise OverLimit(f"{dest} already exists and is not an empty folder; give a new folder (nothing is overwritten)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for f in REQUIRED_FILES:
            shutil.copyfile(files / f, stage / f)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.replace(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return dest


def _config(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise OverLimit(f"{CONFIG} is not a JSON object")
    return data


def _call(http, method: str, url: str, api_base: str, **kw) -> Any:
    """One Workers AI REST call: its `result`, or RemoteError with its own words."""
    import httpx

    try:
        r = http.request(method, url, **kw)
    except httpx.HTTPError as exc:
        raise RemoteError(f"cannot reach {api_base}: {type(exc).__name__}: {exc}") from None
    return _result(r, api_base)


def _result(r, api_base: str) -> Any:
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code >= 400 or not isinstance(body, dict) or body.get("success") is False:
        errors = body.get("errors") if isinstance(body, dict) else None
        said = "; ".join(f"{e.get('message')} (code {e.get('code')})" for e in errors if isinstance(e, dict)) \
            if isinstance(errors, list) and errors else (r.text[:300] or "no body")
        hint = " -- check the token (it needs Workers AI write access) and the account id" \
            if r.status_code in (401, 403) else ""
        raise RemoteError(f"{api_base} answered {r.request.method} {r.request.url.path} with "
                          f"{r.status_code}: {said}{hint}")
    return body.get("result")


class _Counted:
    """A file whose reads report progress (httpx streams multipart files in chunks)."""

    def __init__(self, path: Path, progress: Optional[Progress]):
        self._file = open(path, "rb")
        self._name, self._total, self._sent, self._progress = path.name, path.stat().st_size, 0, progress

    def read(self, n: int = -1) -> bytes:
        chunk = self._file.read(n)
        self._sent += len(chunk)
        if self._progress and chunk:
            self._progress(self._name, self._sent, self._total)
        return chunk

    def seek(self, *args) -> int:
        self._sent = 0 if args and args[0] == 0 else self._sent
        return self._file.seek(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def close(self) -> None:
        self._file.close()


def _upload(http, url: str, api_base: str, path: Path, progress: Optional[Progress]) -> None:
    import httpx

    counted = _Counted(path, progress)
    try:
        r = http.post(url, data={"file_name": path.name}, files={"file": (path.name, counted)})
    except httpx.HTTPError as exc:
        raise RemoteError(f"cannot reach {api_base}: {type(exc).__name__}: {exc}") from None
    finally:
        counted.close()
    _result(r, api_base)
