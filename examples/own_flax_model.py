"""LoRA on your own Flax model, linen and NNX, without editing it (about 30 s on a CPU).

    python examples/own_flax_model.py

The models below stand for yours: jpeft finds their `Dense` / `Einsum` / `Embed` / `Conv` layers
(`nn.scan`- and `nnx.vmap`-stacked ones included), trains a LoRA on them, merges it into the
model's own params and saves it in PEFT's format.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jpeft
from jpeft.flax import linen as peft_linen
from jpeft.flax import nnx as peft_nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from flax_toy_models import VOCAB, LinenModel, NnxModel  # noqa: E402

IDS = jax.random.randint(jax.random.key(0), (4, 12), 0, VOCAB)
CONFIG = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "o", "up", "down"])


def next_token_loss(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], IDS[:, 1:]).mean()


def train(forward, adapter, steps=30):
    """Adam on the adapter alone: `forward(adapter)` gives logits."""
    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(adapter)

    @jax.jit
    def step(adapter, opt_state):
        loss, grads = jax.value_and_grad(lambda a: next_token_loss(forward(a)))(adapter)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(adapter, updates), opt_state, loss

    for i in range(steps):
        adapter, opt_state, loss = step(adapter, opt_state)
        if i in (0, steps - 1):
            print(f"  step {i}: loss {float(loss):.3f}")
    return adapter


def linen_model():
    print("linen:")
    model = LinenModel()
    variables = model.init(jax.random.key(1), IDS)
    peft = peft_linen.PeftModel(model, variables, IDS)  # one trace finds the layers
    adapter = peft.init_adapter(variables, CONFIG, key=jax.random.key(2))
    adapter = train(lambda a: peft.apply(variables, IDS, adapter=a), adapter)
    merged = peft.merge(variables, adapter)  # the plain model runs these
    difference = jnp.abs(model.apply(merged, IDS) - peft.apply(variables, IDS, adapter=adapter))
    print(f"  merged model vs adapted: max difference {float(difference.max()):.1e}")
    return adapter


def nnx_model():
    print("nnx (functional):")
    model = NnxModel(nnx.Rngs(1))
    peft = peft_nnx.PeftModel(model)
    graphdef, state = nnx.split(model)
    adapter = peft.init_adapter(state, CONFIG, key=jax.random.key(2))
    adapter = train(lambda a: peft.apply(state, IDS, adapter=a), adapter)

    print("nnx (in place, nnx.Optimizer over the adapter only):")
    peft.inject(model, peft.init_adapter(state, CONFIG, key=jax.random.key(2)))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=peft_nnx.AdapterParam)

    @nnx.jit
    def step(model, optimizer):
        grad_of = nnx.value_and_grad(
            lambda m: next_token_loss(m(IDS)), argnums=nnx.DiffState(0, peft_nnx.AdapterParam)
        )
        loss, grads = grad_of(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    print(f"  step 0: loss {losses[0]:.3f}\n  step 29: loss {losses[-1]:.3f}")
    return peft.adapter_of(model)


if __name__ == "__main__":
    linen_adapter = linen_model()
    nnx_adapter = nnx_model()
    with tempfile.TemporaryDirectory() as out:
        jpeft.save_pretrained(nnx_adapter, out)
        names = sorted(jpeft.load_pretrained(out).weights)
        print(f"saved in PEFT's format: {len(names)} modules, e.g. {names[0]}")
