"""A real `localgemma serve` process on a free loopback port, for the end-to-end server tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TWO_B, SEVEN_B = "@cf/google/gemma-2b-it-lora", "@cf/google/gemma-7b-it-lora"
N_CTX = 256  # llama.cpp pads a context to a multiple of 256: ask for what we get


def home_with_model(home: Path, gguf: Path) -> Path:
    """A LOCALGEMMA_HOME whose models/ holds `gguf` (a symlink: nothing is copied)."""
    (home / "models").mkdir(parents=True, exist_ok=True)
    os.symlink(gguf, home / "models" / gguf.name)
    return home


def wait_for(predicate, timeout: float = 10, what: str = "condition", every: float = 0.02):
    """`predicate()`'s first truthy value, polled every `every` s; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} not reached in {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, *flags: str, env: dict | None = None, wait_ok: bool = True):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(home / f"server-{self.port}.log", "w+")
        # One llama.cpp thread: on a shared 2-core box, spinning worker threads that lose their
        # core to a neighbour make decoding 5-50x slower; one thread keeps the file's time steady.
        environ = {**os.environ, "LOCALGEMMA_HOME": str(home), "LOCALGEMMA_SERVER_DEBUG": "1",
                   "LOCALGEMMA_THREADS": "1", "LOCALGEMMA_N_CTX": str(N_CTX), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "localgemma.server", "--port", str(self.port), *flags],
                                     env=environ, stdout=self.log, stderr=subprocess.STDOUT)
        self.health_seen: list[tuple[int, dict]] = []
        if wait_ok:
            self.wait_health(lambda r: r.status_code == 200)

    def wait_health(self, done, timeout: float = 90) -> httpx.Response:
        """Poll /health until `done(response)`; every answer seen is kept in health_seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                r = httpx.get(self.base + "/health", timeout=2)
                self.health_seen.append((r.status_code, r.json()))
                if done(r):
                    return r
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"/health did not get there in {timeout}s:\n{self.output()}")

    def healthy(self) -> bool:
        """The process is alive and /health answers 200 within a second."""
        return self.proc.poll() is None and httpx.get(self.base + "/health", timeout=1).status_code == 200

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def url(self, model: str = TWO_B, account: str = "acct") -> str:
        return f"{self.base}/client/v4/accounts/{account}/ai/run/{model}"

    def finetunes(self, suffix: str = "") -> str:
        return f"{self.base}/client/v4/accounts/acct/ai/finetunes{suffix}"

    def upload(self, name: str, folder: Path, model: str = TWO_B, **fields: str) -> httpx.Response:
        """The REST flow: create the finetune, then send both files; the first refusal, else
        the last answer (its result is the finetune, with its id)."""
        created = httpx.post(self.finetunes(), json={"model": model, "name": name, **fields})
        if created.status_code != 200:
            return created
        ident = created.json()["result"]["id"]
        for file_name in ("adapter_config.json", "adapter_model.safetensors"):
            r = httpx.post(self.finetunes(f"/{ident}/finetune-assets"), data={"file_name": file_name},
                           files={"file": (file_name, (folder / file_name).read_bytes())}, timeout=60)
            if r.status_code != 200:
                return r
        return r

    def jobs(self, **headers) -> list[dict]:
        return httpx.get(self.base + "/debug/jobs", headers=headers).json()["jobs"]
