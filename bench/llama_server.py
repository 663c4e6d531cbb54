"""llama-server, built from the llama.cpp that the installed llama-cpp-python vendors, so the
peer bench compares servers on the same kernels. For the bench only (`make test` never builds
it). The source comes from llama-cpp-python's sdist on PyPI; the binary is cached per version
and CMAKE_ARGS (the flags the Makefile builds llama-cpp-python with) under
~/.cache/localgemma/llama-server/. The first build takes a few minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "localgemma" / "llama-server"
SERVER_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF",
                "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF"]


def llama_server() -> str:
    """The path of a llama-server binary matching llama-cpp-python; built on first use."""
    pinned = version("llama-cpp-python")
    flags = shlex.split(os.environ.get("CMAKE_ARGS", ""))
    key = hashlib.sha256(f"{pinned} {flags} {SERVER_FLAGS}".encode()).hexdigest()[:12]
    binary = CACHE / f"{pinned}-{key}" / "llama-server"
    if binary.is_file():
        return str(binary)
    print(f"building llama-server from llama-cpp-python {pinned}'s llama.cpp (once; a few minutes)",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="llama-server-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={pinned}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = Path(tmp) / "build"
        log = Path(tmp) / "build.log"
        with open(log, "w") as out:
            steps = (["cmake", "-S", str(source), "-B", str(build), *SERVER_FLAGS, *flags],
                     ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1)])
            for step in steps:
                if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    raise RuntimeError(f"building llama-server failed:\n{log.read_text()[-3000:]}")
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", binary)
    return str(binary)


if __name__ == "__main__":
    print(llama_server())
