"""`finetune push` and `finetune export`: a finetune leaves as the PEFT files it came from.

Fast tests (no model): Workers AI's limits refused by name before anything is sent, the REST
conversation against a fake Workers AI (httpx's MockTransport: create, two uploads, an existing
name, --resume, the account's adapter cap, its own error words), export's all-or-nothing folder.
End to end: a push into a second real `localgemma serve` playing Workers AI, then the pushed
adapter runs there and answers as it does here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from peft_util import make_peft_adapter
from servers import TWO_B, Server

from localgemma import finetunes, models
from localgemma.errors import InvalidInput, OverLimit, RemoteError, UnknownFinetune
from localgemma.remote import Limits, check, export, push

ACCOUNT, TOKEN = "acct-1", "tok-123"


@pytest.fixture
def home(tmp_path, monkeypatch, fake_gguf):
    """A registry of its own, with TWO_B bound (this process only) to the 270M-like file."""
    monkeypatch.setenv("LOCALGEMMA_HOME", str(tmp_path / "home"))
    models.bind(TWO_B, fake_gguf, persist=False)
    yield tmp_path / "home"
    models.unbind(TWO_B)


def adapter(tmp_path: Path, base: Path, name: str = "peft", **kw) -> Path:
    kw.setdefault("extra_config", {"model_type": "gemma"})
    return make_peft_adapter(tmp_path / name, base, **kw)


@pytest.fixture
def ready(home, tmp_path, fake_gguf):
    return finetunes.create(TWO_B, "style", adapter(tmp_path, fake_gguf), description="a style")


# -- limits, before anything is sent ------------------------------------------------------------

def test_a_finetune_within_the_limits_passes(ready):
    assert check(ready) == []


def test_the_rank_limit_is_named(home, tmp_path, fake_gguf):
    entry = finetunes.create(TWO_B, "wide", adapter(tmp_path, fake_gguf, rank=40))
    with pytest.raises(OverLimit, match=r"rank: wide has rank 40; Workers AI takes adapters of rank 32 at most"):
        check(entry)
    assert check(entry, Limits(max_rank=64)) == []


def test_a_rank_pattern_above_the_limit_is_refused(home, tmp_path, fake_gguf):
    folder = adapter(tmp_path, fake_gguf, rank=8, rank_pattern={"layers.3.self_attn.q_proj": 16})
    entry = finetunes.create(TWO_B, "patterned", folder)
    with pytest.raises(OverLimit, match="has rank 16; Workers AI takes adapters of rank 8"):
        check(entry, Limits(max_rank=8))


def test_the_size_limit_is_named(ready):
    size = (ready.files_dir / "adapter_model.safetensors").stat().st_size
    with pytest.raises(OverLimit, match=rf"size: adapter_model.safetensors is {size / 1e6:.1f} MB; Workers AI takes "
                                        r"0.01 MB at most"):
        check(ready, Limits(max_mb=0.01))


def test_a_model_workers_ai_does_not_serve_is_refused(home, tmp_path, fake_gguf):
    models.bind(models.EMBEDDED_ID, fake_gguf, persist=False)
    try:
        entry = finetunes.create(None, "local-only", adapter(tmp_path, fake_gguf))
    finally:
        models.unbind(models.EMBEDDED_ID)
    with pytest.raises(OverLimit, match="which Workers AI does not serve; Workers AI runs Gemma LoRA adapters on "
                                        "@cf/google/gemma-2b-it-lora and @cf/google/gemma-7b-it-lora"):
        check(entry)


def test_model_type_is_added_on_the_way_or_refused_when_wrong(home, tmp_path, fake_gguf):
    plain = finetunes.create(TWO_B, "plain", adapter(tmp_path, fake_gguf, "a", extra_config={}))
    cfg = json.loads((plain.files_dir / "adapter_config.json").read_text())
    cfg.pop("model_type", None)
    (plain.files_dir / "adapter_config.json").write_text(json.dumps(cfg))
    assert check(plain) == ['adapter_config.json gets "model_type": "gemma" on the way (Workers AI requires it; '
                            'the local copy is unchanged)']
    other = finetunes.create(TWO_B, "g3", adapter(tmp_path, fake_gguf, "b", extra_config={"model_type": "gemma3"}))
    with pytest.raises(OverLimit, match="Workers AI needs \"gemma\""):
        check(other)


# -- the REST conversation, against a fake Workers AI -------------------------------------------

class FakeWorkersAI:
    """Workers AI's finetune routes, as much as push uses, recording every request."""

    def __init__(self, existing=(), fail_upload: str | None = None, status: int = 200):
        self.finetunes = [dict(f) for f in existing]
        self.assets: dict[str, dict[str, bytes]] = {}
        self.seen: list[str] = []
        self.fail_upload, self.status = fail_upload, status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(f"{request.method} {request.url.path}")
        if request.headers.get("authorization") != f"Bearer {TOKEN}" or self.status == 401:
            return self.envelope(None, 401, [{"code": 10000, "message": "Authentication error"}])
        prefix = f"/client/v4/accounts/{ACCOUNT}/ai/finetunes"
        path = request.url.path
        if path == prefix and request.method == "GET":
            return self.envelope(self.finetunes)
        if path == prefix and request.method == "POST":
            body = json.loads(request.content)
            made = {"id": f"id-{len(self.finetunes)}", "created_at": "2026-11-21T00:00:00Z",
                    "modified_at": "2026-11-21T00:00:00Z", **body}
            self.finetunes.append(made)
            return self.envelope(made)
        if path.startswith(prefix + "/") and path.endswith("/finetune-assets"):
            target = path[len(prefix) + 1:-len("/finetune-assets")]
            form = request.read().decode("latin-1")
            name = "adapter_config.json" if 'filename="adapter_config.json"' in form else "adapter_model.safetensors"
            if name == self.fail_upload:
                return self.envelope(None, 500, [{"code": 3043, "message": "Internal server error"}])
            self.assets.setdefault(target, {})[name] = request.content
            return self.envelope(None)
        return self.envelope(None, 404, [{"code": 7000, "message": "No route for that URI"}])

    @staticmethod
    def envelope(result, status=200, errors=()):
        return httpx.Response(status, json={"result": result, "success": status < 400, "errors": list(errors),
                                            "messages": []})


def do_push(fake, name="style", **kw):
    kw.setdefault("account", ACCOUNT)
    kw.setdefault("token", TOKEN)
    return push(name, api_base="https://api.example/client/v4", transport=httpx.MockTransport(fake), **kw)


def test_push_creates_then_uploads_both_files_with_progress(ready):
    fake, seen = FakeWorkersAI(), []
    remote = do_push(fake, progress=lambda f, sent, total: seen.append((f, sent, total)))
    assert remote["name"] == "style" and remote["model"] == TWO_B and remote["description"] == "a style"
    base = f"/client/v4/accounts/{ACCOUNT}/ai/finetunes"
    assert fake.seen == [f"GET {base}", f"POST {base}", f"POST {base}/id-0/finetune-assets",
                         f"POST {base}/id-0/finetune-assets"]
    assert set(fake.assets["id-0"]) == {"adapter_config.json", "adapter_model.safetensors"}
    weights = (ready.files_dir / "adapter_model.safetensors").read_bytes()
    assert weights in fake.assets["id-0"]["adapter_model.safetensors"]  # the file itself, in the multipart body
    last = [s for s in seen if s[0] == "adapter_model.safetensors"][-1]
    assert last == ("adapter_model.safetensors", len(weights), len(weights))


def test_an_existing_name_is_refused_and_resume_uploads_into_it(ready):
    fake = FakeWorkersAI(existing=[{"id": "old", "name": "style", "model": TWO_B}])
    with pytest.raises(OverLimit, match="already exists on Workers AI .* --name, or with --resume"):
        do_push(fake)
    assert len(fake.finetunes) == 1 and not fake.assets
    assert do_push(fake, resume=True)["id"] == "old"
    assert set(fake.assets["old"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert do_push(fake, remote_name="style-2")["name"] == "style-2"


def test_resume_without_a_remote_finetune_is_refused(ready):
    with pytest.raises(InvalidInput, match="no finetune named 'style'"):
        do_push(FakeWorkersAI(), resume=True)


def test_the_accounts_adapter_cap_is_checked(ready):
    full = FakeWorkersAI(existing=[{"id": str(i), "name": f"n{i}", "model": TWO_B} for i in range(3)])
    with pytest.raises(OverLimit, match="already has 3 finetunes; Workers AI allows 3 per account"):
        do_push(full, limits=Limits(max_adapters=3))
    assert len(full.finetunes) == 3


def test_workers_ais_own_words_are_shown(ready):
    with pytest.raises(RemoteError, match=r"answered GET .* with 401: Authentication error \(code 10000\) -- check "
                                          "the token"):
        do_push(FakeWorkersAI(status=401))


def test_a_failed_upload_says_how_to_resume(ready):
    fake = FakeWorkersAI(fail_upload="adapter_model.safetensors")
    with pytest.raises(RemoteError, match="500: Internal server error .* was created on Workers AI .* --resume"):
        do_push(fake)
    fake.fail_upload = None
    do_push(fake, resume=True)
    assert set(fake.assets["id-0"]) == {"adapter_config.json", "adapter_model.safetensors"}


def test_unreachable_and_missing_credentials(ready):
    def down(request):
        raise httpx.ConnectError("connection refused")

    with pytest.raises(RemoteError, match="cannot reach https://api.example/client/v4: ConnectError"):
        do_push(down)
    with pytest.raises(InvalidInput, match="CLOUDFLARE_API_TOKEN"):
        do_push(FakeWorkersAI(), token="")
    with pytest.raises(InvalidInput, match="CLOUDFLARE_ACCOUNT_ID"):
        do_push(FakeWorkersAI(), account="")
    with pytest.raises(UnknownFinetune):
        do_push(FakeWorkersAI(), name="nope")


# -- export ------------------------------------------------------------------------------------

def test_export_writes_the_peft_files_as_uploaded(ready, tmp_path):
    out = export("style", tmp_path / "out" / "style")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / f).read_bytes() == (tmp_path / "peft" / f).read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["style"]  # no staging folder left


def test_export_never_overwrites(ready, tmp_path):
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    with pytest.raises(OverLimit, match="already exists and is not an empty folder"):
        export("style", dest)
    assert [p.name for p in dest.iterdir()] == ["mine.txt"] and (dest / "mine.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export("style", empty) == empty and len(list(empty.iterdir())) == 2


def test_export_of_a_pending_finetune_is_refused(home):
    finetunes.create_pending(TWO_B, "half")
    with pytest.raises(OverLimit, match="half is pending"):
        export("half", "/tmp/never-written")
    assert not Path("/tmp/never-written").exists()


# -- end to end: push into a second localgemma serve ---------------------------------------------

def cli(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localgemma", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LOCALGEMMA_HOME": str(home), "LOCALGEMMA_THREADS": "1", **(env or {})})


@pytest.mark.e2e
def test_push_round_trips_through_a_second_server(embedded_gguf, tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    for home in (here, there):
        (home / "models").mkdir(parents=True)
    assert cli(here, "models", "bind", TWO_B, str(embedded_gguf)).returncode == 0
    folder = make_peft_adapter(tmp_path / "peft", embedded_gguf, targets=("q_proj", "v_proj", "o_proj"), seed=5,
                               extra_config={"model_type": "gemma"})
    wide = make_peft_adapter(tmp_path / "wide", embedded_gguf, rank=48, seed=6, extra_config={"model_type": "gemma"})
    for name, f in (("style", folder), ("wide", wide)):
        made = cli(here, "finetune", "create", TWO_B, name, str(f), "--description", "pushed")
        assert made.returncode == 0, made.stderr
    server = Server(there, "--model", f"{TWO_B}={embedded_gguf}", "--api-key", TOKEN, "--exact")
    try:
        env = {"CLOUDFLARE_API_TOKEN": TOKEN, "CLOUDFLARE_ACCOUNT_ID": ACCOUNT}
        api = ("--api-base", f"{server.base}/client/v4")
        listed = lambda: httpx.get(server.finetunes(), headers={"Authorization": f"Bearer {TOKEN}"}).json()["result"]  # noqa: E731

        refused = cli(here, "finetune", "push", "wide", *api, env=env)
        assert refused.returncode == 1 and "rank: wide has rank 48; Workers AI takes adapters of rank 32" in \
            refused.stderr and listed() == []

        pushed = cli(here, "finetune", "push", "style", *api, env=env)
        assert pushed.returncode == 0, pushed.stderr
        assert "upload adapter_model.safetensors" in pushed.stderr and "(100%)" in pushed.stderr
        [remote] = listed()
        assert (remote["name"], remote["model"], remote["description"], remote["status"]) == \
            ("style", TWO_B, "pushed", "ready")

        again = cli(here, "finetune", "push", "style", *api, env=env)
        assert again.returncode == 1 and "already exists on Workers AI" in again.stderr and len(listed()) == 1

        ask = {"prompt": "The capital of France is", "raw": True, "temperature": 0, "max_tokens": 12}
        there_with = httpx.post(server.url(), json={**ask, "lora": "style"}, headers={"Authorization": f"Bearer {TOKEN}"},
                                timeout=120).json()["result"]["response"]
        there_without = httpx.post(server.url(), json=ask, headers={"Authorization": f"Bearer {TOKEN}"},
                                   timeout=120).json()["result"]["response"]
        here_with = cli(here, "run", "--raw", "--temperature", "0", "--max-tokens", "12", "--lora", "style",
                        "--model", TWO_B, ask["prompt"])
        assert here_with.returncode == 0, here_with.stderr
        assert there_with == here_with.stdout.rstrip("\n") and there_with != there_without
    finally:
        server.stop()
