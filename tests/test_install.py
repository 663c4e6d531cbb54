"""A real install, the way a user makes one, not the Makefile's editable one.

`python -m build` makes the sdist and then the wheel *from the sdist* (so both are checked);
the wheel goes into a fresh venv without `-e`; every command then runs from a folder outside
the source tree: --help, `python -m localgemma`, info, run on the embedded model, finetune
create with a generated PEFT adapter, and serve until /health is 200 and a request is answered.
Every file of the source packages must be in the installed package.

Marked `install`; `pytest --skip-install` skips it locally (refused when CI is set). The
llama-cpp-python wheel comes from $LOCALGEMMA_WHEELHOUSE when set (the Makefile sets it to
the wheel it built), so this test never compiles llama.cpp a second time.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parent.parent
# installed package path -> source folder (setup.py's package roots)
SOURCES = {"localgemma": ROOT / "localgemma", "localgemma/convert": ROOT / "convert",
           "localgemma/models": ROOT / "models"}
EMBEDDED = "@localgemma/google/gemma-3-270m"


def sh(*args, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(venv folder, site-packages, environment for running its commands outside the tree)."""
    work = tmp_path_factory.mktemp("install")
    sh(sys.executable, "-m", "build", "--outdir", work / "dist", ROOT)
    wheels = list((work / "dist").glob("localgemma-*.whl"))
    assert len(wheels) == 1 and list((work / "dist").glob("localgemma-*.tar.gz")), os.listdir(work / "dist")
    env_dir = work / "venv"
    sh(sys.executable, "-m", "venv", env_dir)
    python = env_dir / "bin" / "python"
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    wheelhouse = os.environ.get("LOCALGEMMA_WHEELHOUSE")
    if wheelhouse:
        sh(*pip, "--no-deps", "--no-index", "--find-links", wheelhouse, "llama-cpp-python")
    sh(*pip, f"{wheels[0]}[server]")
    site = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    outside = work / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}", LOCALGEMMA_HOME=str(work / "home"),
               HF_HUB_OFFLINE="1")
    return env_dir, site, {"cwd": outside, "env": env}


def test_every_source_file_is_installed(venv):
    _, site, _ = venv
    missing = []
    for package, folder in SOURCES.items():
        for path in folder.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                if not (site / package / path.relative_to(folder)).is_file():
                    missing.append(f"{package}/{path.relative_to(folder)}")
    assert not missing, f"the wheel leaves out: {', '.join(sorted(missing))}"
    assert not (site / "convert").exists() and not (site / "models").exists()  # no generic top-level names


def test_commands_run_from_outside_the_source_tree(venv, tmp_path):
    env_dir, site, where = venv
    where_from = sh("python", "-c", "import localgemma; print(localgemma.__file__)", **where).stdout
    assert where_from.startswith(str(site)), where_from

    helped = sh("localgemma", "--help", **where).stdout
    for command in ("run", "chat", "models", "finetune", "convert", "serve", "info"):
        assert f"  {command}" in helped
    assert sh("python", "-m", "localgemma", "--help", **where).stdout == helped

    facts = json.loads(sh("localgemma", "info", "--json", **where).stdout)
    assert facts["llama_cpp_python"] and facts["threads"] >= 1

    out = json.loads(sh("localgemma", "run", "--raw", "The capital of France is", "--temperature", "0",
                        "--max-tokens", "6", "--json", **where).stdout)
    assert out["response"].strip() and out["usage"]["completion_tokens"] == 6

    sys.path.insert(0, str(ROOT / "tests"))
    from peft_util import make_peft_adapter

    base = Path(sh("localgemma", "models", "path", **where).stdout.strip())
    folder = make_peft_adapter(tmp_path / "peft", base, targets=("q_proj", "v_proj"), seed=5)
    ident = sh("localgemma", "finetune", "create", EMBEDDED, "demo", folder, **where).stdout.strip()
    assert len(ident) == 36
    assert "demo" in sh("localgemma", "finetune", "list", **where).stdout
    adapted = json.loads(sh("localgemma", "run", "--raw", "The capital of France is", "--temperature", "0",
                            "--max-tokens", "6", "--lora", "demo", "--json", **where).stdout)
    assert adapted["response"] != out["response"]


def test_serve_answers_a_request(venv):
    _, _, where = venv
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["localgemma", "serve", "--port", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, **where)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "serve did not become healthy in 120 s"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        r = httpx.post(f"{base}/client/v4/accounts/local/ai/run/{EMBEDDED}", timeout=60,
                       json={"prompt": "The capital of France is", "raw": True, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["success"] is True and body["result"]["usage"]["completion_tokens"] == 4
    finally:
        server.terminate()
        server.wait(15)
