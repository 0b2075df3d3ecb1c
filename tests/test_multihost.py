"""Two processes on localhost, 4 CPU devices each, one 8-device mesh through JAX's distributed
runtime (gloo collectives): training gives the single-device losses, as on a TPU pod's hosts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_sharding import ADAPTERS, MODEL, train_losses

import jpeft
from jpeft.quant import QuantConfig, quantize_params

# Two JAX processes take most of a minute to start and compile: not in the README's fast set.
pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("multihost_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost") / "result.json"
    port = str(free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), port, str(out)],
            cwd=WORKER.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    for process in processes:
        try:
            logs.append(process.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail("the two-process run did not finish in 10 minutes")
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning", "qlora"])
def test_two_processes_give_the_single_device_losses(two_process_run, method):
    params = MODEL.init(jax.random.key(0))
    if method == "qlora":
        params = quantize_params(params, QuantConfig("nf4", double_quant=True))
    single = train_losses(params, ADAPTERS["lora" if method == "qlora" else method])
    np.testing.assert_allclose(two_process_run["losses"][method], single, rtol=1e-4)


def test_gathered_adapter_is_whole_on_each_process(two_process_run):
    params = MODEL.init(jax.random.key(0))
    adapter = jpeft.init_adapter(params, ADAPTERS["lora"], key=jax.random.key(1))
    expected = {k: float(v["lora_A.weight"].sum()) for k, v in adapter.weights.items()}
    assert two_process_run["lora_A_sums"].keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(two_process_run["lora_A_sums"][name], value, rtol=1e-5)
