"""Mixed-adapter batches, measured: throughput over 1, 4 and 16 adapters, and their memory.

A random Llama (by default hidden 512, intermediate 1376, 4 layers, vocab 8000, float32; see the
options) and LoRA adapters (r=16 on all seven projections, random). For a batch of `--batch`
rows x `--seq` tokens, the jitted forward pass (`model.apply`) is timed three ways, in
alternating rounds (medians):

- **one adapter**: every row through the same adapter (the reference cost);
- **mixed**: rows assigned round-robin to N adapters, one call (`adapter_names=`);
- **one after another**: the rows of each adapter in their own call, N calls (what a server
  without mixed batches does).

Memory: the bytes of the N adapters' bank against the base weights' bytes (the bank must grow
as N x one adapter, never as N x the base).

Run:  python benchmarks/mixed_adapters.py [--json benchmarks/mixed_adapters.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.mixed import mix

MODEL = dict(
    model_type="llama",
    vocab_size=8000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,
)


def adapters(params, count: int) -> dict[str, jpeft.Adapter]:
    config = jpeft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    out = {}
    for i in range(count):
        adapter = jpeft.init_adapter(params, config, key=jax.random.key(i))
        rng = np.random.default_rng(i)
        out[f"a{i}"] = jax.tree.map(
            lambda x, rng=rng: x + 0.01 * rng.standard_normal(x.shape, np.float32), adapter
        )
    return out


def nbytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def measure(model, params, ids, count: int, rounds: int) -> dict:
    bank_adapters = adapters(params, count)
    names = [f"a{i % count}" for i in range(ids.shape[0])]
    bank = mix(bank_adapters, names)
    apply = jax.jit(lambda params, ids, adapter: model.apply(params, ids, adapter=adapter))
    first = bank_adapters["a0"]
    groups = {n: jnp.asarray([i for i, m in enumerate(names) if m == n], jnp.int32) for n in names}

    def one_after_another():
        return [apply(params, ids[rows], bank_adapters[n]) for n, rows in groups.items()]

    runs = {
        "one_adapter": lambda: apply(params, ids, first),
        "mixed": lambda: apply(params, ids, bank),
        "one_after_another": one_after_another,
    }
    times = {name: [] for name in runs}
    for fn in runs.values():  # compile
        jax.block_until_ready(fn())
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    tokens = ids.size
    out = {name: tokens / statistics.median(t) for name, t in times.items()}
    return {
        "adapters": count,
        "tokens_per_s": out,
        "mixed_over_one_adapter": out["mixed"] / out["one_adapter"],
        "mixed_over_one_after_another": out["mixed"] / out["one_after_another"],
        "bank_bytes": nbytes(bank.weights),
        "one_adapter_bytes": nbytes(first.weights),
        "base_bytes": nbytes(params),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=MODEL["hidden_size"])
    parser.add_argument("--intermediate", type=int, default=MODEL["intermediate_size"])
    parser.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sizes = dict(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
    )
    model = jpeft.models.from_hf_config({**MODEL, **sizes})
    params = model.init(jax.random.key(0), jnp.dtype(args.dtype))
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, MODEL["vocab_size"])
    results = [measure(model, params, ids, count, args.rounds) for count in (1, 4, 16)]
    for row in results:
        print(json.dumps(row), flush=True)
    if args.json:
        setup = {**vars(args), "device": str(jax.devices()[0])}
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
