"""The fused 4-bit Pallas kernels on a GPU: compiled (not interpreted), against the reference.

What decides whether `quantized_matmul`'s "auto" may pick the kernels on a GPU:

1. **Agreement.** For each case (NF4/FP4, block sizes, bfloat16 and float32, shapes of a 1-8B
   model's projections with 1 to 4096 tokens), the compiled kernels' forward `x W^T` and input
   gradient `g W` against dequantize-then-dot in float32 (`precision=HIGHEST`): the largest error
   relative to the output's largest magnitude, and the same figure for the reference path in the
   compute dtype, so the two errors compare.
2. **Speed and memory.** A LoRA train step (r=16 on every projection, AdamW) on a random Llama of
   `--hidden`/`--intermediate`/`--layers`, batch `--batch` x `--seq`, bfloat16, on three bases:
   the bfloat16 weights, NF4 through the reference path, NF4 through the kernels. Medians of
   alternating rounds in one process, and each compiled step's temporary memory.

Run on a GPU machine:  python benchmarks/gpu_kernels.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft import quant
from jpeft.quant import QuantConfig, codebooks, kernels, quantize_params
from jpeft.train import make_train_step

# (quant_type, blocksize, double_quant, tokens m, out n, in k, dtype)
CASES = [
    ("nf4", 64, True, 1, 4096, 4096, "bfloat16"),
    ("nf4", 64, True, 4096, 4096, 4096, "bfloat16"),
    ("nf4", 64, True, 4096, 14336, 4096, "bfloat16"),
    ("nf4", 64, True, 4096, 4096, 14336, "bfloat16"),
    ("fp4", 128, False, 1000, 2048, 8192, "bfloat16"),
    ("nf4", 64, False, 333, 1024, 1024, "float32"),
]


def agreement(case) -> dict:
    """Largest errors of the kernels and of the reference, relative to the exact outputs."""
    quant_type, blocksize, double_quant, m, n, k, dtype_name = case
    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((n, k), np.float32) * 0.02)
    q = quant.quantize(w, quant_type, blocksize, double_quant)
    packed = q.packed.reshape(n, k // 2)
    scales = quant.block_absmax(q).reshape(n, k // blocksize)
    x = jnp.asarray(rng.standard_normal((m, k), np.float32)).astype(dtype)
    g = jnp.asarray(rng.standard_normal((m, n), np.float32)).astype(dtype)
    code = codebooks.CODES[quant_type]
    exact_w = quant.dequantize(q, jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    y_exact = jnp.dot(x.astype(jnp.float32), exact_w.T, precision=hi)
    dx_exact = jnp.dot(g.astype(jnp.float32), exact_w, precision=hi)
    try:
        y_kernel = kernels.fused_matmul(x, packed, scales, code, blocksize)
        dx_kernel = kernels.fused_matmul_transposed(g, packed, scales, code, blocksize)
    except jax.errors.JaxRuntimeError as err:  # e.g. tiles beyond the GPU's shared memory
        return {"case": list(case), "error": str(err).splitlines()[0][:300]}
    w_dtype = quant.dequantize(q, dtype)
    y_ref, dx_ref = jnp.dot(x, w_dtype.T), jnp.dot(g, w_dtype)

    def rel(got, want):
        return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))

    return {
        "case": list(case),
        "forward_kernel": rel(y_kernel, y_exact),
        "forward_reference": rel(y_ref, y_exact),
        "input_grad_kernel": rel(dx_kernel, dx_exact),
        "input_grad_reference": rel(dx_ref, dx_exact),
    }


class Step:
    """A compiled LoRA train step on `params`, with the quantized-matmul path `impl`."""

    def __init__(self, model, params, batch, impl: str):
        os.environ["JPEFT_QUANT_MATMUL"] = impl  # read while the step is traced
        config = jpeft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
        self.adapter = jpeft.init_adapter(params, config, key=jax.random.key(0), model=model)
        optimizer = optax.adamw(1e-4)
        self.opt_state = optimizer.init(jpeft.partition(self.adapter)[0])
        self.params, self.batch = params, batch
        step = make_train_step(model, optimizer)
        start = time.perf_counter()
        self.compiled = step.lower(params, self.adapter, self.opt_state, batch, None).compile()
        self.compile_s = time.perf_counter() - start
        self.temp_mib = self.compiled.memory_analysis().temp_size_in_bytes / 2**20
        self.loss = float("nan")

    def run(self) -> None:
        self.adapter, self.opt_state, loss = self.compiled(
            self.params, self.adapter, self.opt_state, self.batch, None
        )
        self.loss = float(loss)  # waits for the step


def step_figures(args) -> dict:
    model = jpeft.models.from_hf_config(
        dict(
            model_type="llama",
            vocab_size=32000,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 128,
            num_key_value_heads=8,
            max_position_embeddings=4096,
        )
    )
    params = model.init(jax.random.key(0), jnp.bfloat16)
    qparams = quantize_params(params, QuantConfig("nf4", 64, double_quant=True))
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, 32000)
    batch = {"input_ids": ids, "labels": ids}
    steps, out = {}, {}
    for name, base, impl in (
        ("lora_bf16", params, "reference"),
        ("qlora_reference", qparams, "reference"),
        ("qlora_pallas", qparams, "pallas"),
    ):
        try:
            steps[name] = Step(model, base, batch, impl)
        except jax.errors.JaxRuntimeError as err:
            out[name] = {"error": str(err).splitlines()[0][:300]}
    times = {name: [] for name in steps}
    for step in steps.values():
        step.run()
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step.run()
            times[name].append((time.perf_counter() - start) / args.steps)
    for name, step in steps.items():
        out[name] = {
            "step_s": statistics.median(times[name]),
            "compile_s": step.compile_s,
            "temp_mib": step.temp_mib,
            "loss": step.loss,
        }
    for name in ("qlora_reference", "qlora_pallas"):
        if name in steps:
            out[f"{name}_over_lora"] = out[name]["step_s"] / out["lora_bf16"]["step_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__}
    result["agreement"] = [agreement(case) for case in CASES]
    for row in result["agreement"]:
        print(json.dumps(row), flush=True)
    result["steps"] = step_figures(args)
    print(json.dumps(result["steps"], indent=2), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
