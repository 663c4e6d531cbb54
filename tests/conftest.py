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


def pytest_addoption(parser):
    parser.addoption("--skip-install", action="store_true",
                     help="skip the wheel-install test (tests/test_install.py); never allowed in CI")


def pytest_configure(config):
    if config.getoption("--skip-install") and os.environ.get("CI", "").lower() not in ("", "0", "false"):
        raise pytest.UsageError("--skip-install is for local runs only: CI always runs the install test")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--skip-install"):
        skip = pytest.mark.skip(reason="--skip-install")
        for item in items:
            if "install" in item.keywords:
                item.add_marker(skip)
