"""Quickstart: train a LoRA on a small Llama in JAX, save it in PEFT format, load and merge it.

The model is built from a config (no download): a 4-layer Llama whose LoRA learns to continue
counting sequences (3, 4, 5, ... mod vocab). Runs in about a minute on 2 CPU cores:

    python examples/quickstart.py --output-dir quickstart-adapter
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft

CONFIG = dict(
    model_type="llama",
    vocab_size=128,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
)


def counting_batch(key: jax.Array, batch: int, seq: int, vocab: int) -> jax.Array:
    """[batch, seq] rows that count up from a random start, modulo `vocab`."""
    starts = jax.random.randint(key, (batch, 1), 0, vocab)
    return (starts + jnp.arange(seq)[None, :]) % vocab


def next_token_accuracy(model, params, adapter, ids: jax.Array) -> float:
    logits = model.apply(params, ids, adapter=adapter)
    return float(jnp.mean(jnp.argmax(logits[:, :-1], -1) == ids[:, 1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--output-dir", default="quickstart-adapter")
    args = parser.parse_args()

    model = jpeft.models.from_hf_config(CONFIG)
    params = model.init(jax.random.key(0))
    config = jpeft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05)
    adapter = jpeft.init_adapter(params, config, key=jax.random.key(1))
    print(f"{adapter}; base model {sum(x.size for x in jax.tree.leaves(params)):,} params")

    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0, 3e-3, 15, args.steps))
    trainable, _ = jpeft.partition(adapter)
    opt_state = optimizer.init(trainable)
    step = jpeft.train.make_train_step(model, optimizer)
    test_ids = counting_batch(jax.random.key(123), 64, 32, CONFIG["vocab_size"])
    print(
        f"next-token accuracy before: {next_token_accuracy(model, params, adapter, test_ids):.3f}"
    )

    start = time.perf_counter()
    for i in range(args.steps):
        key_data, key_drop = jax.random.split(jax.random.key(1000 + i))
        ids = counting_batch(key_data, 16, 32, CONFIG["vocab_size"])
        batch = {"input_ids": ids, "labels": ids}
        adapter, opt_state, loss = step(params, adapter, opt_state, batch, key_drop)
        if i % 25 == 0 or i == args.steps - 1:
            print(f"step {i:4d}  loss {float(loss):.4f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s")
    print(
        f"next-token accuracy after:  {next_token_accuracy(model, params, adapter, test_ids):.3f}"
    )

    prompt = jnp.array([[40, 41, 42, 43]])
    tokens = model.generate(params, prompt, max_new_tokens=8, adapter=adapter)
    print(f"greedy continuation of {prompt[0].tolist()}: {np.asarray(tokens[0, 4:]).tolist()}")

    jpeft.save_pretrained(adapter, args.output_dir)
    loaded = jpeft.load_pretrained(args.output_dir)
    merged = jpeft.merge(params, loaded)
    diff = jnp.abs(model.apply(merged, test_ids) - model.apply(params, test_ids, adapter=adapter))
    print(
        f"saved PEFT adapter to {args.output_dir}/; merged vs adapter max |diff| {diff.max():.2e}"
    )


if __name__ == "__main__":
    main()
