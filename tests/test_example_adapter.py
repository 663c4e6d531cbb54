"""The example adapter (examples/) and `make run`, which shows it: what a newcomer sees first."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from servers import home_with_model

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "adapters" / "gemma-3-270m-pirate"


def test_example_is_what_peft_writes():
    """The two files save_pretrained writes, small, and acceptable to Workers AI as well."""
    from safetensors import safe_open

    assert sorted(p.name for p in EXAMPLE.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (EXAMPLE / "adapter_model.safetensors").stat().st_size < 4 * 2**20
    config = json.loads((EXAMPLE / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["model_type"] == "gemma" and config["r"] <= 8
    with safe_open(str(EXAMPLE / "adapter_model.safetensors"), "np") as weights:
        names = list(weights.keys())
    assert len(names) == 18 * 7 * 2 and all(n.startswith("base_model.model.model.layers.") for n in names)


@pytest.mark.e2e
def test_make_run_shows_the_adapter_change_the_answer(tmp_path, embedded_gguf):
    """`make run` as a newcomer runs it (twice: the second finds the adapter registered)."""
    home = tmp_path / "home"
    home_with_model(home, embedded_gguf)
    env = {**os.environ, "LOCALGEMMA_HOME": str(home)}
    # -o: the venv is this one, already set up; BIN: its scripts
    command = ["make", "-s", "-o", ".venv/.installed", "run", f"BIN={Path(sys.executable).parent}"]
    ids = []
    for _ in range(2):
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        head, rest = done.stdout.split("--- without the adapter ---")
        without, with_lora = rest.split("--- with --lora pirate ---")
        ids.append(head.strip().splitlines()[-1])
        # The base answers, then invents the next question; the adapter answers once, as a pirate.
        assert "Tokyo" in without and "Question:" in without, done.stdout
        assert with_lora.strip().startswith("Arr") and "Tokyo" in with_lora, done.stdout
        assert "Question:" not in with_lora, done.stdout
    assert ids[0] == ids[1] and len(ids[0]) == 36  # one finetune, registered once
    assert len([p for p in (home / "finetunes").iterdir() if not p.name.startswith(".")]) == 1
