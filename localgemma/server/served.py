"""Which model ids this server answers for: the ones it can run without downloading anything.

    the ids bound to a file (`serve --model ID=PATH`, `localgemma models bind`), the embedded
    model (assembled from its package), and catalog ids already downloaded

A catalog id that is not here is refused at once, saying how to serve it: a request never
starts a multi-GB download. `/v1/models`, `/api/tags` and every route use this one list.
"""

from __future__ import annotations

from localgemma.errors import ModelUnavailable, UnknownModel


def servable() -> list[str]:
    from localgemma.models import CATALOG, EMBEDDED_ID, bindings, local_path

    ids = list(bindings())
    for model_id in [EMBEDDED_ID, *CATALOG]:
        if model_id not in ids and (model_id == EMBEDDED_ID or local_path(model_id) is not None):
            ids.append(model_id)
    return ids


def check_model(model: str) -> str:
    """`model` if this server answers for it; else why not, and what to do. File paths are not
    models over HTTP (they would let any client load any file on this machine)."""
    from localgemma.models import CATALOG, EMBEDDED_ID, served_here

    if model == EMBEDDED_ID or served_here(model):
        return model  # in servable() whatever else is bound or downloaded: no files read
    ids = servable()
    if model in ids:
        return model
    if model in CATALOG:
        raise ModelUnavailable(f"{model} is not served here: start the server with --model {model}=/path/to/model.gguf, "
                               f"or download it first with `localgemma models pull {model}` (then restart)")
    raise UnknownModel(f"model {model!r} is unknown; this server answers for {', '.join(ids)} "
                       f"(serve another with localgemma serve --model ID=PATH)")
