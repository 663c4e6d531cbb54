"""The finetune registry: PEFT adapters stored under $LOCALGEMMA_HOME/finetunes, converted to
GGUF once, and looked up by name or id per request.

One folder per finetune, named by its UUID, holding the original PEFT files, the converted
`adapter.gguf` and `meta.json`. There is no index file to corrupt: the registry is the set of
folders with a `meta.json`. A create builds everything in a hidden staging folder and renames
it into place as its last step, so a create interrupted at any point leaves no entry, and a
reader never sees half of one.

Workers AI's REST flow creates an entry first and uploads the two files after: such an entry
is `pending` until both files are in, then converted and `ready`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

from .adapters import AdapterRef
from .errors import ConversionError, InvalidInput, LocalGemmaError

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_RANK = int(os.environ.get("LOCALGEMMA_MAX_LORA_RANK", 64))
MAX_BYTES = int(os.environ.get("LOCALGEMMA_MAX_LORA_MB", 500)) * 2**20


class UnknownFinetune(LocalGemmaError):
    code = 3037  # what Workers AI answers: "Finetune <id> not found"
    status = 404


class FinetuneExists(LocalGemmaError):
    code = 3003
    status = 409


class FinetuneIncomplete(LocalGemmaError):
    code = 3039  # "finetune missing required files"
    status = 400


@dataclass(frozen=True)
class Finetune:
    id: str
    name: str
    model: str
    description: str = ""
    created: str = ""
    status: str = "ready"  # "pending" until both PEFT files are in
    rank: Optional[int] = None
    alpha: Optional[float] = None
    targets: tuple[str, ...] = ()
    sha256: Optional[str] = None  # of adapter.gguf
    files: tuple[str, ...] = field(default=())
    folder: Optional[Path] = field(default=None, compare=False)

    @property
    def adapter_path(self) -> Path:
        return self.folder / "adapter.gguf"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["targets"], out["files"] = list(self.targets), list(self.files)
        out.pop("folder")
        out["adapter_path"] = str(self.adapter_path) if self.status == "ready" and self.folder else None
        return out


def root() -> Path:
    from .models import home

    return home() / "finetunes"


def normalize_model(model: Optional[str]) -> str:
    from .models import EMBEDDED_ID

    return model or EMBEDDED_ID


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidInput(
            f"name: {name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit (no path separators, no '..')"
        )
    if _is_uuid(name):
        raise InvalidInput(f"name: {name!r} looks like an id; choose a name that is not a UUID")
    return name


# -- reading -----------------------------------------------------------------------------------

def list_finetunes(model: Optional[str] = None) -> list[Finetune]:
    entries = []
    base = root()
    if base.is_dir():
        for folder in sorted(base.iterdir()):
            if folder.name.startswith(".") or not (folder / "meta.json").is_file():
                continue  # staging folders and anything half-made are not entries
            entry = _read(folder)
            if entry is not None and (model is None or entry.model == model):
                entries.append(entry)
    return sorted(entries, key=lambda e: (e.created, e.name))


def get(name_or_id: str, model: Optional[str] = None) -> Finetune:
    """By id, or by name (within `model` when given)."""
    matches = [e for e in list_finetunes() if e.id == name_or_id]
    if not matches:
        matches = [e for e in list_finetunes(model) if e.name == name_or_id]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InvalidInput(f"lora: {len(matches)} finetunes are named {name_or_id!r} (for "
                           f"{', '.join(sorted(e.model for e in matches))}); use its id instead")
    raise UnknownFinetune(f"Finetune {name_or_id} not found" + (f" for {model}" if model else "")
                          + "; `localgemma finetune list` shows what exists")


def _read(folder: Path) -> Optional[Finetune]:
    try:
        data = json.loads((folder / "meta.json").read_text())
        data["targets"], data["files"] = tuple(data.get("targets", ())), tuple(data.get("files", ()))
        return Finetune(**data, folder=folder)
    except (OSError, ValueError, TypeError):
        return None  # one damaged entry must not make the registry unreadable


# -- use ------------------------------------------------------------------------------------

def adapters_for(model: Optional[str], lora: Optional[str]) -> tuple[AdapterRef, ...]:
    """`lora` -> the adapters to apply. A finetune name or id; or, as an extension, several
    with scales: "style:0.5,facts" (names cannot contain ':' or ',', so this is unambiguous)."""
    if lora is None:
        return ()
    refs = []
    for part in lora.split(","):
        name, _, scale = part.strip().partition(":")
        entry = get(name, normalize_model(model))
        _check_base(entry, model)
        if entry.status != "ready":
            raise FinetuneIncomplete(
                f"lora: finetune {entry.name!r} is not usable yet: it still needs "
                f"{', '.join(f for f in REQUIRED_FILES if f not in entry.files)}")
        refs.append(AdapterRef(str(entry.adapter_path), _scale(scale, part)))
    return tuple(refs)


def _check_base(entry: Finetune, model: Optional[str]) -> None:
    """The finetune's model id must be the request's, or name the very same local file."""
    from .models import local_path

    wanted = normalize_model(model)
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


# -- writing -----------------------------------------------------------------------------------

def create(model: Optional[str], name: str, folder: str | os.PathLike, description: str = "", *,
           max_rank: int = MAX_RANK, max_bytes: int = MAX_BYTES) -> Finetune:
    """Validate and convert a PEFT folder, then register it (all or nothing)."""
    model = normalize_model(model)
    check_name(name)
    source = Path(folder)
    if not source.is_dir():
        raise ConversionError(f"{source} is not a folder; give the folder holding {' and '.join(REQUIRED_FILES)}")
    with _staging() as stage:
        # Convert from the user's own folder, so refusals can name what is really there.
        entry = _convert(_new_entry(model, name, description), source, stage, max_rank=max_rank, max_bytes=max_bytes)
        for file_name in REQUIRED_FILES:  # kept: nothing the user gave is lost
            shutil.copyfile(source / file_name, stage / file_name)
        return _commit(entry, stage)


def create_pending(model: Optional[str], name: str, description: str = "") -> Finetune:
    """The REST flow's first step: an entry that waits for its two files."""
    model = normalize_model(model)
    check_name(name)
    with _staging() as stage:
        entry = _new_entry(model, name, description, status="pending")
        return _commit(entry, stage)


def add_asset(name_or_id: str, file_name: str, data: bytes, *, max_rank: int = MAX_RANK,
              max_bytes: int = MAX_BYTES) -> Finetune:
    """The REST flow's second step, once per file; converts when both files are in."""
    if file_name not in REQUIRED_FILES:
        raise InvalidInput(f"file_name: {file_name!r} is not accepted; upload {' and '.join(REQUIRED_FILES)}")
    entry = get(name_or_id)
    if len(data) > max_bytes:
        raise ConversionError(f"{file_name} is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
    with _lock():
        _atomic_bytes(entry.folder / file_name, data)
        files = tuple(f for f in REQUIRED_FILES if (entry.folder / f).is_file())
        entry = _replace(entry, files=files, status="pending", sha256=None)
        if len(files) == len(REQUIRED_FILES):
            try:
                entry = _convert(entry, entry.folder, entry.folder, max_rank=max_rank, max_bytes=max_bytes)
            except LocalGemmaError:
                (entry.folder / file_name).unlink(missing_ok=True)  # refused: as if never uploaded
                _write_meta(_replace(entry, files=tuple(f for f in files if f != file_name)), entry.folder)
                raise
        _write_meta(entry, entry.folder)
        return entry


def delete(name_or_id: str, model: Optional[str] = None) -> Finetune:
    entry = get(name_or_id, model)
    with _lock():
        graveyard = root() / f".deleting-{entry.id}"
        os.replace(entry.folder, graveyard)  # one rename: the entry is gone, atomically
        shutil.rmtree(graveyard, ignore_errors=True)
    return entry


def _new_entry(model: str, name: str, description: str, status: str = "ready") -> Finetune:
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return Finetune(id=str(uuid.uuid4()), name=name, model=model, description=description or "",
                    created=created, status=status)


def _convert(entry: Finetune, source: Path, out: Path, *, max_rank: int, max_bytes: int) -> Finetune:
    """PEFT files in `source` -> out/adapter.gguf, checked against the entry's base model."""
    from .convert import peft_to_gguf
    from .models import resolve

    info = peft_to_gguf(source, resolve(entry.model), out / "adapter.gguf", max_rank=max_rank, max_bytes=max_bytes)
    return _replace(entry, status="ready", rank=info.rank, alpha=info.alpha, targets=tuple(info.targets),
                    sha256=info.sha256, files=REQUIRED_FILES)


def _commit(entry: Finetune, stage: Path) -> Finetune:
    """Write meta.json, check the name is free, and rename the staging folder into place."""
    _write_meta(entry, stage)
    with _lock():
        clash = [e for e in list_finetunes(entry.model) if e.name == entry.name]
        if clash:
            raise FinetuneExists(f"name: a finetune named {entry.name!r} already exists for {entry.model} "
                                 f"(id {clash[0].id}); choose another name or delete it first")
        final = root() / entry.id
        os.replace(stage, final)
    return _replace(entry, folder=final)


def _replace(entry: Finetune, **changes) -> Finetune:
    return Finetune(**{**asdict(entry), "folder": entry.folder, **changes})


def _write_meta(entry: Finetune, folder: Path) -> None:
    data = entry.to_dict()
    data.pop("adapter_path")
    _atomic_bytes(folder / "meta.json", json.dumps(data, indent=2).encode())


def _atomic_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _staging() -> Iterator[Path]:
    root().mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=root(), prefix=".staging-"))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone after a commit (renamed); cleaned after a failure


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Serialise registry writes across processes (CLI and server may run at once)."""
    root().mkdir(parents=True, exist_ok=True)
    with open(root() / ".lock", "a") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: single-process use only
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
        return True
    except ValueError:
        return False
