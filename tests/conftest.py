import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _session_home(tmp_path_factory):
    """Every test run gets its own $LOCALGEMMA_HOME; the embedded GGUF is assembled there once."""
    home = tmp_path_factory.mktemp("localgemma-home")
    old = os.environ.get("LOCALGEMMA_HOME")
    os.environ["LOCALGEMMA_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the network, even by mistake
    yield home
    if old is None:
        os.environ.pop("LOCALGEMMA_HOME", None)
    else:
        os.environ["LOCALGEMMA_HOME"] = old


@pytest.fixture(scope="session")
def embedded_gguf(_session_home) -> Path:
    from localgemma.models import embedded_path

    return embedded_path()
