"""A new PEFT method in one file, registered from outside jpeft, then trained and saved.

SSF ("Scaling & Shifting your Features", Lian et al. 2022, https://arxiv.org/abs/2210.08823)
learns, per targeted linear layer W [out, in], a scale gamma [out] and a shift beta [out]:

    y = (x W^T + b) * gamma + beta,        gamma = 1, beta = 0 at init

PEFT has no SSF; this file is all it takes to get one in jpeft: the config, the per-module
pieces, the node `jpeft.ops.linear` runs, merge (W * gamma, b * gamma + beta), the sharding
axes, and what `jpeft finetune --method ssf` would train. Registering it makes the registry
drive the rest: `jpeft.init_adapter`, the train step, `save_pretrained`/`load_pretrained`
(keys `base_model.model.<module>.ssf_scale` / `ssf_shift`), merging, sharding. Runs in about
half a minute on 2 CPU cores:

    python examples/custom_method.py
"""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jpeft
from jpeft import targeting
from jpeft import tree as jtree
from jpeft.config import PeftConfig
from jpeft.method import JobSpec, WeightMethod, register
from jpeft.ops import dense

SCALE, SHIFT = "ssf_scale", "ssf_shift"


@dataclasses.dataclass(frozen=True)
class SSFConfig(PeftConfig):
    """The method's config: PEFT-style field names, hashable, JSON both ways."""

    target_modules: Any = None
    exclude_modules: Any = None
    modules_to_save: Any = None


@dataclasses.dataclass(frozen=True)
class SSFWeight:
    """A linear weight with SSF: base [..., out, in], scale/shift [..., out]. For a model that
    stacks its layers every leaf has a leading [L] axis; layers without the adapter hold zeros,
    which `active` [L] turns back into the identity."""

    base: jax.Array
    scale: jax.Array
    shift: jax.Array
    active: jax.Array | None = None

    def _scale_shift(self) -> tuple[jax.Array, jax.Array]:
        if self.active is None:
            return self.scale, self.shift
        return jnp.where(self.active[..., None], self.scale, 1.0), self.shift

    def linear(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """`x` [..., in] -> [..., out] (one layer's slice)."""
        scale, shift = self._scale_shift()
        return dense(x, self.base, bias) * scale.astype(x.dtype) + shift.astype(x.dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        raise TypeError("an SSF linear weight was used as an embedding table")

    def merged_weight(self) -> jax.Array:
        scale, _ = self._scale_shift()
        return (self.base * scale[..., :, None]).astype(self.base.dtype)

    def unmerged_weight(self) -> jax.Array:
        scale, _ = self._scale_shift()
        return (self.base / scale[..., :, None]).astype(self.base.dtype)

    def merged_bias(self, bias: jax.Array) -> jax.Array:
        """b * gamma + beta: [..., out]."""
        scale, shift = self._scale_shift()
        return (bias * scale + shift).astype(bias.dtype)

    def unmerged_bias(self, bias: jax.Array) -> jax.Array:
        scale, shift = self._scale_shift()
        return ((bias - shift) / scale).astype(bias.dtype)


jax.tree_util.register_dataclass(
    SSFWeight, data_fields=["base", "scale", "shift", "active"], meta_fields=[]
)


@register
class SSF(WeightMethod):
    peft_type = "SSF"
    name = "ssf"
    config_class = SSFConfig
    default_lr = 1e-2
    job_help = "SSF: a learned scale and shift per output of every targeted linear layer"
    piece_names = (SCALE, SHIFT)
    piece_axes = {SCALE: (0,), SHIFT: (0,)}  # both run along W's output axis

    def init_adapter(self, params, config: SSFConfig, key, model=None) -> jpeft.Adapter:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        biases = set(jtree.hf_leaf_names(params))
        weights = {}
        for ref in targeting.resolve_targets(params, config, model_type):
            if f"{ref.name}.bias" not in biases:
                raise ValueError(
                    f"{ref.name} has no bias, so SSF's shift could not be merged into it; "
                    "target layers with a bias (Qwen2's q/k/v projections, say)"
                )
            out_dim = ref.shape[0]
            weights[ref.name] = {SCALE: jnp.ones(out_dim), SHIFT: jnp.zeros(out_dim)}
        return jpeft.Adapter(config, weights)

    def make_node(self, base, pieces, frozen, constants, active, dropout_key, config):
        return SSFWeight(base, pieces[SCALE], pieces[SHIFT], active)

    def job_config(self, job: JobSpec) -> SSFConfig:
        targets = job.target_modules or ["q_proj", "k_proj", "v_proj"]
        return SSFConfig(target_modules=targets, **job.common)


def main() -> None:
    config = dict(
        model_type="qwen2",  # q/k/v projections with a bias, which SSF's shift merges into
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = jpeft.models.from_hf_config(config)
    params = model.init(jax.random.key(0))
    ssf = SSFConfig(target_modules=["q_proj", "k_proj", "v_proj"])
    adapter = jpeft.init_adapter(params, ssf, key=None)
    print(f"registered methods: {list(jpeft.registered())}")
    print(adapter)

    ids = (jax.random.randint(jax.random.key(1), (8, 1), 0, 64) + jnp.arange(16)) % 64
    batch = {"input_ids": ids, "labels": ids}
    optimizer = optax.adam(1e-1)
    opt_state = jpeft.train.init_opt_state(optimizer, jpeft.partition(adapter)[0])
    step = jpeft.train.make_train_step(model, optimizer)
    for i in range(60):
        adapter, opt_state, loss = step(params, adapter, opt_state, batch, None)
        if i % 20 == 0 or i == 59:
            print(f"step {i:3d}  loss {float(loss):.4f}")

    with tempfile.TemporaryDirectory() as directory:
        jpeft.save_pretrained(adapter, directory)
        loaded = jpeft.load_pretrained(directory)
    merged = jpeft.merge(params, loaded)
    adapted = model.apply(params, ids, adapter=adapter)
    difference = float(jnp.abs(model.apply(merged, ids) - adapted).max())
    print(f"saved, loaded and merged: max |merged - adapted| logit {difference:.1e}")


if __name__ == "__main__":
    main()
