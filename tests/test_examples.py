"""The examples run as a user runs them, and do what they say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(name: str) -> tuple[str, list[float]]:
    """Run examples/`name` as a user does: (its stdout, the losses it printed)."""
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return run.stdout, [float(x) for x in re.findall(r"loss (\d+\.\d+)", run.stdout)]


def test_a_method_registered_from_outside_trains_saves_and_merges():
    """examples/custom_method.py registers SSF from outside the package: the registry then
    drives init, the train step, save/load and merge."""
    stdout, losses = run_example("custom_method.py")
    assert "'ssf'" in stdout, stdout
    assert losses[-1] < losses[0] - 0.2, losses
    difference = float(re.search(r"max \|merged - adapted\| logit (\S+)", stdout).group(1))
    assert difference < 1e-4


@pytest.mark.slow  # 30 s
def test_own_flax_model_example_trains_linen_and_nnx_and_saves():
    """examples/own_flax_model.py: LoRA on a linen and an NNX model jpeft did not write."""
    stdout, losses = run_example("own_flax_model.py")
    first, last = losses[::2], losses[1::2]
    assert len(losses) == 6 and all(b < a - 1.0 for a, b in zip(first, last, strict=True)), losses
    difference = float(re.search(r"max difference (\S+)", stdout).group(1))
    assert difference < 1e-4
    assert "saved in PEFT's format: 8 modules" in stdout
