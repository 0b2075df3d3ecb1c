"""`jpeft.memory.estimate_memory` against XLA's `memory_analysis()` of compiled sharded steps.

A random Llama (hidden 256, intermediate 1024, 4 layers, 8 heads / 4 kv heads, vocab 512), LoRA
r=16 on all linear layers, AdamW, float32, on 8 CPU devices. For each mesh, batch x seq and remat
policy the compiled `jpeft.train.make_train_step` reports its argument bytes (params, adapter,
optimizer state, batch) and temporary bytes per device (`jpeft.memory.compiled_step_memory`);
the table gives them next to the estimate. The `temp / counted` column is what the per-policy
factors of `estimate_memory` (`jpeft.memory.OVERHEAD`) were set from.

Run:  python benchmarks/sharding_memory.py [--json benchmarks/sharding_memory.json]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import json  # noqa: E402

import jpeft  # noqa: E402
from jpeft import memory, sharding  # noqa: E402
from jpeft.memory import OVERHEAD  # noqa: E402
from jpeft.models.llama import ModelConfig  # noqa: E402

CONFIG = ModelConfig(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
)
MESHES = ({"data": 2, "fsdp": 2, "model": 2}, {"data": 1, "fsdp": 8, "model": 1},
          {"data": 2, "fsdp": 1, "model": 4})  # fmt: skip
SHAPES = ((8, 128), (16, 256), (8, 512))
POLICIES = (None, "dots", "full")


def measure(mesh, batch: int, seq: int, remat: str | None) -> dict:
    """The compiled sharded LoRA step's memory next to the estimate."""
    plan = dict(
        adapter_config=jpeft.LoraConfig(r=16, target_modules="all-linear"),
        dtype="float32",
        remat=remat,
    )
    analysis = memory.compiled_step_memory(CONFIG, mesh, batch, seq, **plan)
    estimate = memory.estimate_memory(CONFIG, mesh, batch, seq, **plan)
    counted = estimate.activations / OVERHEAD[remat]
    return {
        "mesh": dict(mesh.shape),
        "batch": batch,
        "seq": seq,
        "remat": remat,
        "argument_bytes": analysis.argument_size_in_bytes,
        "estimated_state_bytes": estimate.weights + estimate.adapter + estimate.optimizer,
        "temp_bytes": analysis.temp_size_in_bytes,
        "estimated_activation_bytes": estimate.activations,
        "temp_over_counted": analysis.temp_size_in_bytes / counted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    rows = []
    print("mesh (d,f,m)  batch x seq  remat  args MiB (est)   temp MiB (est)   temp/counted")
    for sizes in MESHES:
        mesh = sharding.make_mesh(**sizes)
        for batch, seq in SHAPES:
            for remat in POLICIES:
                row = measure(mesh, batch, seq, remat)
                rows.append(row)
                args_mib, state_mib = (
                    row["argument_bytes"] / 2**20,
                    row["estimated_state_bytes"] / 2**20,
                )
                temp_mib = row["temp_bytes"] / 2**20
                act_mib = row["estimated_activation_bytes"] / 2**20
                print(
                    f"{tuple(sizes.values())!s:<13} {batch:>3} x {seq:<5}  {remat or 'none':<5}  "
                    f"{args_mib:6.2f} ({state_mib:6.2f})  {temp_mib:7.1f} ({act_mib:7.1f})  "
                    f"{row['temp_over_counted']:.2f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": "8 XLA:CPU devices on one host", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
