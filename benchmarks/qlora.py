"""QLoRA's memory and speed, measured: the three figures the README reports.

1. **Step memory.** A random Llama whose linear weights dominate (hidden 1024, intermediate 4096,
   4 layers, 16 heads, vocab 1024), LoRA r=16 on all seven projections, AdamW, batch 1 x 16. The
   compiled train step's temporary memory (`compiled.memory_analysis().temp_size_in_bytes`) is
   compared with the float32 size of the linear weights, for the NF4 (double-quantized) base and
   for the float32 base. XLA:CPU's default scheduler orders for concurrency and starts every
   independent op of a layer early (all seven of its weights at once); its memory-minimizing
   scheduler (`--xla_cpu_enable_concurrency_optimized_scheduler=false`) does not, so the figure
   is measured under both, each in a fresh process.
2. **Step time.** The same two steps, timed in alternating rounds in one process (medians), so
   background load shifts both alike: QLoRA / LoRA.
3. **Loading memory.** A Qwen2-0.5B-shaped float32 checkpoint (494M parameters, random weights,
   written once to `--checkpoint-dir`) is loaded in a fresh process by
   `jpeft.models.from_pretrained`, once in float32 and once with `quantize="nf4"`; each process
   reports its peak RSS (VmHWM), and a process that only imports jpeft gives the baseline.

Run:  python benchmarks/qlora.py [--rounds 7] [--skip-loading] [--json benchmarks/qlora.json]
(the first run writes the 2 GB checkpoint to --checkpoint-dir, default in the temp directory)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax

import jpeft
from jpeft.quant import QuantConfig, QuantizedTensor, quantize_params
from jpeft.train import make_train_step

STEP_MODEL = dict(
    model_type="llama",
    vocab_size=1024,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=512,
)
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")
QWEN2_05B = dict(
    model_type="qwen2",
    architectures=["Qwen2ForCausalLM"],
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    torch_dtype="float32",
)
MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--checkpoint-dir", default=None, help="where the 0.5B checkpoint lives")
    parser.add_argument("--skip-loading", action="store_true", help="skip the loading figure")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def linear_weight_bytes(params) -> int:
    """float32 bytes of the projection weights (every 3-D stacked `weight`)."""
    leaves = jpeft.tree.flatten(params)
    return sum(4 * int(np.prod(v.shape)) for p, v in leaves.items() if len(v.shape) == 3)


class Step:
    """A compiled LoRA train step on `params` (float or quantized), with its state."""

    def __init__(self, model, params, batch):
        self.params = params
        self.adapter = jpeft.init_adapter(
            params, jpeft.LoraConfig(**LORA), key=jax.random.key(0), model=model
        )
        optimizer = optax.adamw(1e-4)
        self.opt_state = optimizer.init(jpeft.partition(self.adapter)[0])
        self.batch = batch
        step = make_train_step(model, optimizer)
        self.compiled = step.lower(params, self.adapter, self.opt_state, batch, None).compile()
        self.loss = float("nan")

    def temp_bytes(self) -> int:
        return int(self.compiled.memory_analysis().temp_size_in_bytes)

    def run(self) -> None:
        self.adapter, self.opt_state, loss = self.compiled(
            self.params, self.adapter, self.opt_state, self.batch, None
        )
        self.loss = float(loss)


def build_steps(args: argparse.Namespace) -> tuple[Step, Step, dict]:
    """(LoRA step, QLoRA step, params) on the step model."""
    model = jpeft.models.from_hf_config(STEP_MODEL)
    params = model.init(jax.random.key(0))
    qparams = quantize_params(params, QuantConfig("nf4", 64, double_quant=True))
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, STEP_MODEL["vocab_size"])
    batch = {"input_ids": ids, "labels": ids}
    return Step(model, params, batch), Step(model, qparams, batch), params


def memory_figures(args: argparse.Namespace) -> dict:
    """Temporary memory of both compiled steps, in MiB and over the f32 linear weights."""
    lora, qlora, params = build_steps(args)
    weights = linear_weight_bytes(params)
    return {
        "linear_weights_f32_mib": weights / MIB,
        "quantized_linear_weights_mib": _quantized_bytes(qlora.params) / MIB,
        "qlora_step_temp_mib": qlora.temp_bytes() / MIB,
        "lora_step_temp_mib": lora.temp_bytes() / MIB,
        "qlora_temp_over_f32_weights": qlora.temp_bytes() / weights,
        "lora_temp_over_f32_weights": lora.temp_bytes() / weights,
    }


def _quantized_bytes(params) -> int:
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedTensor))
    return sum(leaf.nbytes for leaf in leaves if isinstance(leaf, QuantizedTensor))


def memory_in_fresh_process(args: argparse.Namespace, xla_flags: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": xla_flags}
    command = [sys.executable, __file__, "--memory-only", "--batch", str(args.batch)]
    out = subprocess.run(
        [*command, "--seq", str(args.seq)], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def time_figures(args: argparse.Namespace) -> dict:
    """Median step times of LoRA and QLoRA, timed in alternating rounds."""
    lora, qlora, _ = build_steps(args)
    times = {"lora": [], "qlora": []}
    for side in (lora, qlora):
        side.run()  # warm up
    for _ in range(args.rounds):
        for name, side in (("lora", lora), ("qlora", qlora)):
            start = time.perf_counter()
            for _ in range(args.steps):
                side.run()
            times[name].append((time.perf_counter() - start) / args.steps)
    lora_s, qlora_s = statistics.median(times["lora"]), statistics.median(times["qlora"])
    return {
        "lora_step_s": lora_s,
        "qlora_step_s": qlora_s,
        "qlora_over_lora_time": qlora_s / lora_s,
        "losses": {"lora": lora.loss, "qlora": qlora.loss},
    }


def write_checkpoint(directory: Path) -> Path:
    """A random Qwen2-0.5B-shaped float32 checkpoint, written one tensor at a time (once)."""
    from safetensors.numpy import save_file

    if (directory / "model.safetensors").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    model = jpeft.models.from_hf_config(QWEN2_05B)
    shapes = jpeft.models.param_shapes(model.config)
    rng = np.random.default_rng(0)
    tensors = {}
    for path, shape in jpeft.tree.flatten(shapes).items():
        if path.startswith("model.layers."):
            rest = path[len("model.layers.") :]
            for i in range(shape[0]):
                tensors[f"model.layers.{i}.{rest}"] = _random(rng, shape[1:])
        else:
            tensors[path] = _random(rng, shape)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(QWEN2_05B))
    return directory


def _random(rng: np.random.Generator, shape) -> np.ndarray:
    return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


# The child reads its peak from /proc (VmHWM): `ru_maxrss` would include the resident memory
# of this process at fork time, which Linux carries across exec.
_LOAD = """
import sys, jax, jax.numpy as jnp
import jpeft
path, quantize = sys.argv[1], sys.argv[2] or None
if path != "-":
    model, params = jpeft.models.from_pretrained(path, dtype=jnp.float32, quantize=quantize)
    jax.block_until_ready(jax.tree.leaves(params))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) * 1024)
"""


def peak_rss(path: str, quantize: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _LOAD, path, quantize], check=True, capture_output=True, text=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def loading_figures(args: argparse.Namespace) -> dict:
    root = Path(args.checkpoint_dir or Path(tempfile.gettempdir()) / "jpeft_qwen2_0.5b_f32")
    path = str(write_checkpoint(root))
    size = (root / "model.safetensors").stat().st_size
    baseline, f32, nf4 = peak_rss("-", ""), peak_rss(path, ""), peak_rss(path, "nf4")
    return {
        "checkpoint_gib": size / 2**30,
        "import_rss_gib": baseline / 2**30,
        "f32_load_peak_rss_gib": f32 / 2**30,
        "nf4_load_peak_rss_gib": nf4 / 2**30,
        "nf4_over_f32_rss": nf4 / f32,
    }


def main() -> None:
    args = parse_args()
    if args.memory_only:
        print(json.dumps(memory_figures(args)))
        return
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
        f"({jax.default_backend()})",
        "step_memory": {
            "default_scheduler": memory_in_fresh_process(args, ""),
            "memory_minimizing_scheduler": memory_in_fresh_process(
                args, "--xla_cpu_enable_concurrency_optimized_scheduler=false"
            ),
        },
        "step_time": time_figures(args),
    }
    if not args.skip_loading:
        figures["loading"] = loading_figures(args)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
