"""One LoRA train step (AdamW) in jpeft and in PyTorch PEFT, same process, alternating rounds.

The model is a tiny random Llama (hidden 512, intermediate 1376, 4 layers, 8 heads, 8 kv heads,
vocab 8000), float32, batch 8 x 256 tokens, LoRA r=16, alpha=32, dropout 0 on all seven
projections. Both sides load the same weights: transformers builds the model from a seed, saves
it as safetensors, and jpeft loads that checkpoint.

Each round times `--steps` train steps and `--steps` forwards (loss, no gradient) of each side in
turn; the figures are medians over `--rounds` rounds of the per-call time, so background load
shifts both sides alike. Run:

    python benchmarks/lora_step.py [--rounds 5] [--steps 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import torch
import transformers

import jpeft
from jpeft.train import causal_lm_loss, make_train_step

MODEL = dict(
    vocab_size=8000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
ADAMW = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians)")
    parser.add_argument("--steps", type=int, default=2, help="timed calls per side per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    return parser.parse_args()


def timed(fn: Callable[[], None], calls: int) -> float:
    """Mean seconds per call of `fn` (which must block until its result is ready)."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


class PeftSide:
    """PEFT's LoRA model on the transformers checkpoint at `path`, with torch AdamW."""

    def __init__(self, path: str, input_ids: np.ndarray):
        base = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.attn_implementation = base.config._attn_implementation
        self.model = peft.get_peft_model(base, peft.LoraConfig(**LORA)).train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            trainable,
            lr=ADAMW["lr"],
            betas=(ADAMW["b1"], ADAMW["b2"]),
            eps=ADAMW["eps"],
            weight_decay=ADAMW["weight_decay"],
        )
        self.ids = torch.from_numpy(input_ids)
        self.loss = float("nan")

    def step(self) -> None:
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.loss = loss.item()

    def forward(self) -> None:
        with torch.no_grad():
            self.model(input_ids=self.ids, labels=self.ids).loss.item()


class JpeftSide:
    """jpeft's LoRA adapter on the same checkpoint; the step and forward compiled ahead of time."""

    def __init__(self, path: str, input_ids: np.ndarray, seed: int):
        self.model, self.params = jpeft.models.from_pretrained(path)
        self.adapter = jpeft.init_adapter(
            self.params, jpeft.LoraConfig(**LORA), key=jax.random.key(seed)
        )
        optimizer = optax.adamw(
            ADAMW["lr"],
            b1=ADAMW["b1"],
            b2=ADAMW["b2"],
            eps=ADAMW["eps"],
            weight_decay=ADAMW["weight_decay"],
        )
        self.opt_state = optimizer.init(jpeft.partition(self.adapter)[0])
        ids = jnp.asarray(input_ids)
        self.batch = {"input_ids": ids, "labels": ids}
        self.loss = float("nan")

        args = (self.params, self.adapter, self.opt_state, self.batch, None)
        start = time.perf_counter()
        lowered = make_train_step(self.model, optimizer).lower(*args)
        self.trace_s = time.perf_counter() - start
        start = time.perf_counter()
        self._step = lowered.compile()
        self.compile_s = time.perf_counter() - start
        self._forward = jax.jit(self._forward_loss).lower(self.params, self.adapter, ids).compile()

    def _forward_loss(self, params, adapter, ids: jax.Array) -> jax.Array:
        """Loss of `ids` [B, S] with `adapter`, no gradient."""
        return causal_lm_loss(self.model.apply(params, ids, adapter=adapter), ids)

    def step(self) -> None:
        self.adapter, self.opt_state, loss = self._step(
            self.params, self.adapter, self.opt_state, self.batch, None
        )
        self.loss = float(loss.block_until_ready())

    def forward(self) -> None:
        self._forward(self.params, self.adapter, self.batch["input_ids"]).block_until_ready()

    def hlo_ops(self) -> dict[str, int]:
        """Counts of transposes and copies in the compiled step (weight relayouts show here)."""
        text = self._step.as_text()
        return {op: text.count(f" {op}(") for op in ("transpose", "copy", "dot", "fusion")}


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    input_ids = rng.integers(0, MODEL["vocab_size"], (args.batch, args.seq), dtype=np.int64)
    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(args.seed)
        config = transformers.LlamaConfig(**MODEL)
        transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
        torch_side = PeftSide(path, input_ids)
        jax_side = JpeftSide(path, input_ids, args.seed)

    # Warm-up, and the first-step losses: B = 0, so both equal the base model's loss.
    jax_side.step()
    torch_side.step()
    first_loss = {"jpeft": jax_side.loss, "peft": torch_side.loss}
    jax_side.forward()
    torch_side.forward()

    samples: dict[str, list[float]] = {k: [] for k in ("jax_step", "pt_step", "jax_fwd", "pt_fwd")}
    for _ in range(args.rounds):
        samples["jax_step"].append(timed(jax_side.step, args.steps))
        samples["pt_step"].append(timed(torch_side.step, args.steps))
        samples["jax_fwd"].append(timed(jax_side.forward, args.steps))
        samples["pt_fwd"].append(timed(torch_side.forward, args.steps))
    med = {k: statistics.median(v) for k, v in samples.items()}
    # Ratios per round (same round, same background load), then the median over rounds.
    per_round = {
        "jpeft_step/peft_step": ("jax_step", "pt_step", 0.8),
        "jpeft_step/jpeft_fwd": ("jax_step", "jax_fwd", 2.2),
        "peft_step/peft_fwd": ("pt_step", "pt_fwd", None),
        "jpeft_fwd/peft_fwd": ("jax_fwd", "pt_fwd", None),
    }
    ratios = {
        name: statistics.median(a / b for a, b in zip(samples[num], samples[den], strict=True))
        for name, (num, den, _) in per_round.items()
    }

    report = {
        "machine": {
            "cpu_cores": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch_num_threads": torch.get_num_threads(),
            "jax_devices": [str(d) for d in jax.devices()],
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "setup": {
            **{k: v for k, v in MODEL.items() if k != "max_position_embeddings"},
            "batch": args.batch,
            "seq": args.seq,
            "dtype": "float32",
            "lora": LORA,
            "adamw": ADAMW,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "peft_attn_implementation": torch_side.attn_implementation,
        },
        "median_s": med,
        "samples_s": samples,
        "ratios": ratios,
        "jpeft_step_trace_s": jax_side.trace_s,
        "jpeft_step_compile_s": jax_side.compile_s,
        "jpeft_step_hlo_ops": jax_side.hlo_ops(),
        "first_step_loss": first_loss,
    }
    print_table(report, per_round)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def print_table(report: dict, per_round: dict) -> None:
    """The figures of `report` as markdown tables."""
    m, med = report["machine"], report["median_s"]
    print(
        f"\nmachine: {m['cpu_cores']} CPU cores ({m['processor']}), torch threads "
        f"{m['torch_num_threads']}, XLA_FLAGS={m['xla_flags']!r}; "
        f"{report['setup']['rounds']} rounds x {report['setup']['steps_per_round']} calls, medians"
    )
    print("\n| | jpeft | PEFT |\n|---|---|---|")
    print(f"| train step (s) | {med['jax_step']:.3f} | {med['pt_step']:.3f} |")
    print(f"| forward + loss, no grad (s) | {med['jax_fwd']:.3f} | {med['pt_fwd']:.3f} |")
    loss = report["first_step_loss"]
    print(f"| first-step loss | {loss['jpeft']:.6f} | {loss['peft']:.6f} |")
    print("\n| ratio | value | target |\n|---|---|---|")
    for name, (_, _, target) in per_round.items():
        print(f"| {name} | {report['ratios'][name]:.3f} | {'' if target is None else target} |")
    print(
        f"\njpeft step: trace {report['jpeft_step_trace_s']:.2f} s, "
        f"compile {report['jpeft_step_compile_s']:.2f} s; HLO ops {report['jpeft_step_hlo_ops']}"
    )


if __name__ == "__main__":
    main()
