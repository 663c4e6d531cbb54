"""The finetune registry: PEFT adapters stored under $LOCALGEMMA_HOME/finetunes, converted to
GGUF once, and looked up by name or id per request.

    finetunes/<id>/meta.json            name, model, status, the version in use, ...
    finetunes/<id>/v-<hex>/             one version: the PEFT files as uploaded + adapter.gguf

There is no index file to corrupt: the registry is the set of folders with a `meta.json`, and
`meta.json` (written atomically) is the only commit point. A version folder is never changed
once meta.json names it: a new upload builds a new version beside it, converts it, and only
then points meta.json at it. So a refused upload leaves the entry exactly as it was, a running
server keeps no stale adapter (each version's adapter.gguf is a new path), and a process killed
at any point leaves the old entry or the new one, never half of one. A create builds the whole
entry in a hidden staging folder and renames it into place last. Leftovers of killed processes
(staging folders, unreferenced versions, temp files) are swept by the next write.

Workers AI's REST flow creates an entry first and uploads the two files after: such an entry
is `pending` until both files are in, then converted and `ready`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

from .errors import (ConversionError, FinetuneExists, FinetuneIncomplete, InvalidInput, LocalGemmaError,
                     UnknownFinetune)
from .files import write_atomic
from .generation import AdapterRef
from .settings import current as settings

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER = "adapter.gguf"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_SCALE = 10.0  # |scale| in "lora": "name:scale"; ten times what it learned is already far out


@dataclass(frozen=True)
class Finetune:
    id: str
    name: str
    model: str
    description: str = ""
    public: bool = False
    created_at: str = ""
    modified_at: str = ""
    status: str = "ready"  # "pending" until both PEFT files are in
    rank: Optional[int] = None
    alpha: Optional[float] = None
    targets: tuple[str, ...] = ()
    sha256: Optional[str] = None  # of adapter.gguf
    files: tuple[str, ...] = ()
    version: Optional[str] = None  # the folder holding this entry's files ("" in the first layout)
    notes: tuple[str, ...] = ()  # what the conversion left out, and why
    folder: Optional[Path] = field(default=None, compare=False)

    @property
    def files_dir(self) -> Optional[Path]:
        """Where the PEFT files and adapter.gguf of the version in use are."""
        return None if self.version is None or self.folder is None else self.folder / self.version

    @property
    def adapter_path(self) -> Optional[Path]:
        return self.files_dir / ADAPTER if self.status == "ready" and self.files_dir else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["targets"], out["files"], out["notes"] = list(self.targets), list(self.files), list(self.notes)
        out.pop("folder")
        out["adapter_path"] = str(self.adapter_path) if self.adapter_path else None
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
    return sorted(entries, key=lambda e: (e.created_at, e.name))


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


_FIELDS = {f for f in Finetune.__dataclass_fields__ if f != "folder"}


def _read(folder: Path) -> Optional[Finetune]:
    try:
        data = json.loads((folder / "meta.json").read_text())
        if "created" in data:  # the first layout: one timestamp, files beside meta.json
            data.setdefault("created_at", data["created"])
            data.setdefault("modified_at", data["created"])
            data.setdefault("version", "" if data.get("status") == "ready" else None)
        data = {k: v for k, v in data.items() if k in _FIELDS}
        for key in ("targets", "files", "notes"):
            data[key] = tuple(data.get(key) or ())
        entry = Finetune(**data, folder=folder)
        if entry.alpha is not None and not math.isfinite(entry.alpha):
            return None  # written by an older version that let a NaN alpha through
        return entry
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
        value = _scale(scale, part)
        entry = get(name, normalize_model(model))
        _check_base(entry, model)
        if entry.status != "ready":
            raise FinetuneIncomplete(
                f"lora: finetune {entry.name!r} is not usable yet: it still needs "
                f"{', '.join(f for f in REQUIRED_FILES if f not in entry.files)}")
        refs.append(AdapterRef(str(entry.adapter_path), value))
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
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and abs(value) <= MAX_SCALE):
        raise InvalidInput(f"lora: {part.strip()!r} has scale {text!r}; write NAME or NAME:SCALE with SCALE a number "
                           f"from -{MAX_SCALE:g} to {MAX_SCALE:g}, e.g. style:0.5")
    return value


# -- writing -----------------------------------------------------------------------------------

def create(model: Optional[str], name: str, folder: str | os.PathLike, description: str = "", *,
           public: bool = False, max_rank: Optional[int] = None, max_bytes: Optional[int] = None,
           exist_ok: bool = False) -> Finetune:
    """Validate and convert a PEFT folder, then register it (all or nothing). The limits
    default to the settings' max_lora_rank and max_lora_mb. `exist_ok`: a ready finetune of
    that name and model made from byte-identical files is returned as it is (a script can
    run the same create twice); one made from other files is still refused."""
    max_rank, max_bytes = _limits(max_rank, max_bytes)
    model = normalize_model(model)
    check_name(name)
    source = Path(folder)
    if not source.is_dir():
        raise ConversionError(f"{source} is not a folder; give the folder holding {' and '.join(REQUIRED_FILES)}")
    if exist_ok:
        same = _registered_from(model, name, source)
        if same is not None:
            return same
    with _staging() as stage:
        entry = _replace(_new_entry(model, name, description, public), version=_version_name())
        files = stage / entry.version
        files.mkdir()
        # Convert from the user's own folder, so refusals can name what is really there.
        entry = _convert(entry, source, files, max_rank=max_rank, max_bytes=max_bytes)
        for file_name in REQUIRED_FILES:  # kept: nothing the user gave is lost
            shutil.copyfile(source / file_name, files / file_name)
        return _commit(entry, stage)


def _registered_from(model: str, name: str, source: Path) -> Optional[Finetune]:
    """The ready finetune `name` of `model` when its stored PEFT files equal those in `source`;
    None when there is no such name; FinetuneExists when the name holds other files."""
    entry = next((e for e in list_finetunes(model) if e.name == name), None)
    if entry is None:
        return None
    stored = entry.files_dir
    same = entry.status == "ready" and stored is not None and all(
        (source / f).is_file() and (stored / f).is_file() and _same_bytes(source / f, stored / f)
        for f in REQUIRED_FILES)
    if not same:
        raise FinetuneExists(f"name: a finetune named {name!r} already exists for {model} (id {entry.id}) "
                             f"from other files than those in {source}; delete it first "
                             f"(localgemma finetune delete {entry.id}) or choose another name")
    return entry


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as x, open(b, "rb") as y:
        while True:
            left, right = x.read(1 << 20), y.read(1 << 20)
            if left != right:
                return False
            if not left:
                return True


def create_pending(model: Optional[str], name: str, description: str = "", public: bool = False) -> Finetune:
    """The REST flow's first step: an entry that waits for its two files."""
    model = normalize_model(model)
    check_name(name)
    with _staging() as stage:
        return _commit(_new_entry(model, name, description, public, status="pending"), stage)


def add_asset(name_or_id: str, file_name: str, data: bytes, *, max_rank: Optional[int] = None,
              max_bytes: Optional[int] = None) -> Finetune:
    """The REST flow's second step, once per file; converts when both are in. A new version
    is built beside the one in use and committed only if it converts: a refusal changes nothing."""
    max_rank, max_bytes = _limits(max_rank, max_bytes)
    if file_name not in REQUIRED_FILES:
        raise InvalidInput(f"file_name: {file_name!r} is not accepted; upload {' and '.join(REQUIRED_FILES)}")
    if len(data) > max_bytes:
        raise ConversionError(f"{file_name} is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
    with _lock():
        _sweep()
        entry = get(name_or_id)
        old = entry.files_dir
        version = _version_name()
        new = entry.folder / version
        new.mkdir()
        try:
            for other in REQUIRED_FILES:
                if other != file_name and old is not None and (old / other).is_file():
                    shutil.copyfile(old / other, new / other)
            write_atomic(new / file_name, data)
            files = tuple(f for f in REQUIRED_FILES if (new / f).is_file())
            updated = _replace(entry, files=files, status="pending", sha256=None, rank=None, alpha=None, targets=(),
                               notes=(), version=version, modified_at=_now())
            try:
                if len(files) == len(REQUIRED_FILES):
                    updated = _convert(updated, new, new, max_rank=max_rank, max_bytes=max_bytes)
                else:  # the other file comes later: refuse now what is wrong with this one alone
                    from .convert import check_one

                    check_one(new / file_name)
            except LocalGemmaError as exc:  # the message must not show where the registry lives
                exc.message = exc.message.replace(f"{new}{os.sep}", "").replace(str(new), "the uploaded files")
                exc.args = (exc.message,)
                raise
            _write_meta(updated, entry.folder)  # the commit point
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        if old is not None and old != entry.folder:
            shutil.rmtree(old, ignore_errors=True)
        return updated


def delete(name_or_id: str, model: Optional[str] = None) -> Finetune:
    entry = get(name_or_id, model)
    with _lock():
        _sweep()
        graveyard = root() / f".deleting-{entry.id}"
        os.replace(entry.folder, graveyard)  # one rename: the entry is gone, atomically
        shutil.rmtree(graveyard, ignore_errors=True)
    return entry


def _limits(max_rank: Optional[int], max_bytes: Optional[int]) -> tuple[int, int]:
    current = settings()
    return (current.max_lora_rank if max_rank is None else max_rank,
            current.max_lora_bytes if max_bytes is None else max_bytes)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _version_name() -> str:
    return f"v-{secrets.token_hex(6)}"


def _new_entry(model: str, name: str, description: str, public: bool, status: str = "ready") -> Finetune:
    now = _now()
    return Finetune(id=str(uuid.uuid4()), name=name, model=model, description=description or "",
                    public=bool(public), created_at=now, modified_at=now, status=status)


def _convert(entry: Finetune, source: Path, folder: Path, *, max_rank: int, max_bytes: int) -> Finetune:
    """PEFT files in `source` -> folder/adapter.gguf, checked against the entry's base model."""
    from .convert import peft_to_gguf
    from .models import resolve

    info = peft_to_gguf(source, resolve(entry.model), folder / ADAPTER, max_rank=max_rank, max_bytes=max_bytes)
    return _replace(entry, status="ready", rank=info.rank, alpha=info.alpha, targets=tuple(info.targets),
                    sha256=info.sha256, files=REQUIRED_FILES, notes=tuple(info.notes()))


def _commit(entry: Finetune, stage: Path) -> Finetune:
    """Write meta.json, check the name is free, and rename the staging folder into place."""
    _write_meta(entry, stage)
    with _lock():
        _sweep()
        clash = [e for e in list_finetunes(entry.model) if e.name == entry.name]
        if clash:
            raise FinetuneExists(f"name: a finetune named {entry.name!r} already exists for {entry.model} "
                                 f"(id {clash[0].id}); choose another name or delete it first")
        final = root() / entry.id
        (stage / ".lock").unlink(missing_ok=True)
        os.replace(stage, final)
    return _replace(entry, folder=final)


def _replace(entry: Finetune, **changes) -> Finetune:
    return Finetune(**{**asdict(entry), "folder": entry.folder, **changes})


def _write_meta(entry: Finetune, folder: Path) -> None:
    data = entry.to_dict()
    data.pop("adapter_path")
    write_atomic(folder / "meta.json", json.dumps(data, indent=2, allow_nan=False))


@contextlib.contextmanager
def _staging() -> Iterator[Path]:
    """A hidden folder, locked while this process builds in it (so a sweep leaves it alone)."""
    root().mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=root(), prefix=".staging-"))
    try:
        with _flock(stage / ".lock", blocking=True):
            yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone after a commit (renamed); cleaned after a failure


def sweep() -> None:
    """Clean up after killed processes now (`localgemma serve` does at start)."""
    if root().is_dir():
        with _lock():
            _sweep()


def _sweep() -> None:
    """Remove what killed processes left behind (call holding _lock): staging folders nobody
    holds, half-deleted entries, temp files, and versions no meta.json names."""
    for path in root().iterdir():
        if path.name.startswith(".staging-"):
            with _flock(path / ".lock", blocking=False) as mine:
                if mine:
                    shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(".deleting-"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
        elif path.is_dir() and not path.name.startswith("."):
            entry = _read(path) if (path / "meta.json").is_file() else None
            if entry is None:
                continue  # not ours to judge
            for item in path.iterdir():
                stale_version = item.name.startswith("v-") and item.name != entry.version
                if stale_version or item.name.endswith(".tmp"):
                    shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)


@contextlib.contextmanager
def _flock(path: Path, *, blocking: bool) -> Iterator[bool]:
    """An exclusive lock on `path` (created); yields whether it was had. Released when the
    holder's process dies, however it dies: that is how a sweep tells live work from leftovers."""
    try:
        import fcntl
    except ImportError:  # Windows: single-process use only
        yield blocking
        return
    try:
        fh = open(path, "a")
    except OSError:
        yield False
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Serialise registry writes across processes (CLI and server may run at once)."""
    root().mkdir(parents=True, exist_ok=True)
    with _flock(root() / ".lock", blocking=True):
        yield


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
        return True
    except ValueError:
        return False
