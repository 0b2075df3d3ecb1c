"""One of the processes of `test_multihost.py`: 4 CPU devices of an 8-device, 2-process mesh.

    python multihost_worker.py PROCESS_ID PORT OUT_JSON

Trains each method for a few steps on the (data=2, fsdp=2, model=2) mesh that spans both
processes (gloo collectives), saves nothing, and (process 0) writes the losses and the gathered
LoRA adapter's leaf sums to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

import jpeft  # noqa: E402
from jpeft import sharding as js  # noqa: E402


def main() -> None:
    process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    js.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4

    from test_sharding import ADAPTERS, MESH_SHAPE, MODEL, train_losses

    from jpeft.quant import QuantConfig, quantize_params

    mesh = js.make_mesh(**MESH_SHAPE)
    params = MODEL.init(jax.random.key(0))
    losses = {}
    for method in ("lora", "ia3", "prompt_tuning", "qlora"):
        base = params
        if method == "qlora":
            base = quantize_params(params, QuantConfig("nf4", double_quant=True))
        config = ADAPTERS["lora" if method == "qlora" else method]
        losses[method] = train_losses(base, config, mesh)
    adapter = js.shard(
        jpeft.init_adapter(params, ADAPTERS["lora"], key=jax.random.key(1)),
        mesh,
        like=js.shard(params, mesh),
    )
    whole = js.gather(adapter)  # readable on every process
    sums = {k: float(v["lora_A.weight"].sum()) for k, v in whole.weights.items()}
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "lora_A_sums": sums}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
