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


@pytest.fixture(scope="session")
def fake_gguf(tmp_path_factory) -> Path:
    """The embedded model's header over sparse zero weights (tests/fake_base.py)."""
    from fake_base import write_fake_base

    return write_fake_base(tmp_path_factory.mktemp("fake-base") / "gemma-3-270m-like.gguf")


@pytest.fixture(autouse=True)
def _fast_tests_load_no_model(request, monkeypatch):
    """The fast layer (neither e2e nor install) must never have llama.cpp load a model."""
    if request.node.get_closest_marker("e2e") or request.node.get_closest_marker("install"):
        return

    def refuse(*args, **kwargs):
        raise AssertionError("a fast test loaded a model: mark it e2e, or use a fake")

    from localgemma import engine, weights

    monkeypatch.setattr(engine.Engine, "__init__", refuse)
    monkeypatch.setattr(weights, "load", refuse)


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
