"""The Workers AI REST surface: run a model, and the finetune registry (the same one the CLI
uses). Answers are wrapped in Cloudflare's envelope; streams are Workers AI's SSE events.

    POST   /client/v4/accounts/{account_id}/ai/run/{model}
    GET    /client/v4/accounts/{account_id}/ai/finetunes
    GET    /client/v4/accounts/{account_id}/ai/finetunes/public
    POST   /client/v4/accounts/{account_id}/ai/finetunes                 {model, name, description, public}
    GET    /client/v4/accounts/{account_id}/ai/finetunes/{id_or_name}
    POST   /client/v4/accounts/{account_id}/ai/finetunes/{id_or_name}/finetune-assets   multipart
    DELETE /client/v4/accounts/{account_id}/ai/finetunes/{id_or_name}

The account id is accepted and ignored: there is one registry per $LOCALGEMMA_HOME.
"""

from __future__ import annotations

from typing import Annotated, Any, AsyncIterator, Optional

import anyio
from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from localgemma import contract, finetunes
from localgemma.contract import describe, parse_inputs
from localgemma.errors import IncompleteRequest, InvalidInput
from localgemma.generation import Chunk, Result

from .errors import envelope_body
from .jsonbody import StrictRoute, parse_json
from .queue import Job
from .served import check_model
from .sse import DONE, begin, event, event_response

PREFIX = "/client/v4/accounts/{account_id}/ai"
ASSETS_PATH = r"/ai/finetunes/[^/]+/finetune-assets$"  # uploads get the registry's size cap, not --max-body-mb


def success(result: Any, notes: tuple[str, ...] = ()) -> dict[str, Any]:
    messages = [{"code": 1000, "message": note} for note in notes]
    return {"result": result, "success": True, "errors": [], "messages": messages}


async def read_json(request: Request) -> Any:
    """The body as JSON, whatever the Content-Type says: Cloudflare's own curl examples send
    JSON with curl's default form Content-Type."""
    body = await request.body()
    if not body.strip():
        raise IncompleteRequest("request body is empty; send a JSON object, e.g. {\"prompt\": \"hello\"}")
    return parse_json(body)


def make_router() -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["Workers AI"], route_class=StrictRoute)
    router.add_api_route("/run/{model:path}", run_model, methods=["POST"])
    router.add_api_route("/finetunes", list_finetunes, methods=["GET"])
    router.add_api_route("/finetunes", create_finetune, methods=["POST"])
    router.add_api_route("/finetunes/public", list_public_finetunes, methods=["GET"])
    router.add_api_route("/finetunes/{id_or_name}", show_finetune, methods=["GET"])
    router.add_api_route("/finetunes/{id_or_name}", delete_finetune, methods=["DELETE"])
    router.add_api_route("/finetunes/{id_or_name}/finetune-assets", upload_asset, methods=["POST"])
    return router


# -- run ---------------------------------------------------------------------------------------

async def run_model(request: Request, account_id: str, model: str):
    """env.AI.run(model, inputs) over REST: the body is the inputs object."""
    check_model(model)
    inputs = parse_inputs(await read_json(request))  # invalid input never takes a place in line
    job, first = await begin(request, request.app.state.scheduler, model, inputs)
    if not inputs.stream:
        return success(contract.output(first))
    return event_response(_events(first, job), job, lambda error: event({"errors": envelope_body(error)["errors"]}))


async def _events(first: Chunk | Result, job: Job) -> AsyncIterator[dict[str, str]]:
    yield event(contract.event(first))
    async for item in job:
        yield event(contract.event(item))
    yield DONE


# -- finetunes ---------------------------------------------------------------------------------

class FinetuneCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "yes" is not a boolean

    model: str = Field(min_length=1, description="the base model id, e.g. @cf/google/gemma-2b-it-lora")
    name: str = Field(min_length=1, description="1-64 letters, digits, '.', '_' or '-'")
    description: Optional[str] = ""
    public: Optional[bool] = Field(False, description="listed by GET .../finetunes/public")


def public(entry: finetunes.Finetune) -> dict[str, Any]:
    """Cloudflare's finetune object (id, name, description, model, created_at, modified_at,
    public), and what is local besides (status, rank, alpha, targets, sha256, files, notes)."""
    data = entry.to_dict()
    for private in ("adapter_path", "version"):  # where things are on this machine is nobody's business
        data.pop(private, None)
    return data


async def list_finetunes(account_id: str):
    entries = await anyio.to_thread.run_sync(finetunes.list_finetunes)
    return success([public(e) for e in entries])


async def list_public_finetunes(account_id: str):
    """A local server has no public catalog of others' finetunes: its own marked public."""
    entries = await anyio.to_thread.run_sync(finetunes.list_finetunes)
    return success([public(e) for e in entries if e.public])


async def create_finetune(request: Request, account_id: str):
    try:
        spec = FinetuneCreate.model_validate(await read_json(request))
    except ValidationError as exc:
        raise InvalidInput(describe(exc, FinetuneCreate)) from None
    check_model(spec.model)
    entry = await anyio.to_thread.run_sync(finetunes.create_pending, spec.model, spec.name, spec.description or "",
                                           bool(spec.public))
    return success(public(entry))


async def show_finetune(account_id: str, id_or_name: str):
    return success(public(await anyio.to_thread.run_sync(finetunes.get, id_or_name)))


async def upload_asset(account_id: str, id_or_name: str,
                       file_name: Annotated[str, Form(description="adapter_config.json or adapter_model.safetensors")],
                       file: Annotated[UploadFile, File(description="the file's bytes")]):
    """Once per file; the finetune is converted and usable when both are in."""
    data = await file.read()
    entry = await anyio.to_thread.run_sync(finetunes.add_asset, id_or_name, file_name, data)
    return success(public(entry), entry.notes)


async def delete_finetune(account_id: str, id_or_name: str):
    return success(public(await anyio.to_thread.run_sync(finetunes.delete, id_or_name)))
