"""Per-device memory of a sharded fine-tuning step: estimated before any device is touched
(`estimate_memory`), or exactly, by compiling the step from abstract inputs
(`compiled_step_memory`).

Weights, adapter and optimizer state are counted exactly: the param and adapter trees are built
abstractly (`jax.eval_shape`), placed by the same partition rules `shard` uses, and each leaf's
bytes divided by the devices that split it. Activations are a model of what one train step keeps
for its backward pass, per device; the tests compare all four with XLA's `memory_analysis()` of
the compiled step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, AxisType, Mesh

from jpeft.adapter import is_trainable, partition
from jpeft.config import PeftConfig
from jpeft.injection import init_adapter
from jpeft.methods.lora import LoraConfig
from jpeft.models.llama import LlamaForCausalLM
from jpeft.quant.params import QuantConfig, quantize_params
from jpeft.sharding.adapter_specs import adapter_specs
from jpeft.sharding.mesh import AXES, BATCH_AXES
from jpeft.sharding.placement import step_shardings
from jpeft.sharding.rules import LLAMA_RULES, Rules, axes_size, axis_names, param_specs
from jpeft.train import init_opt_state, make_train_step

REMAT_POLICIES = (None, "dots", "full")
ADAM_MOMENTS = 2
# What XLA keeps beyond the tensors counted below (copies between fusions, gradient buffers,
# layouts), per remat policy: the ratio of `memory_analysis().temp_size_in_bytes` to the count,
# measured on XLA:CPU by benchmarks/sharding_memory.py over meshes (2,2,2), (1,8,1), (2,1,4) and
# batch x seq 8x128, 16x256, 8x512 (within 15% of these but one small case). Other backends fuse
# differently: read the result as +-30%.
OVERHEAD = {None: 1.7, "dots": 2.2, "full": 1.4}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device."""

    weights: int
    adapter: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.optimizer + self.activations

    def __str__(self) -> str:
        rows = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]
        rows.append(("total", self.total))
        return "\n".join(f"{name:<12}{_gib(value):>10.3f} GiB per device" for name, value in rows)


def _gib(n: int) -> float:
    return n / 2**30


def estimate_memory(
    config: Any,
    mesh: Mesh | Mapping[str, int],
    batch: int,
    seq: int,
    *,
    adapter_config: PeftConfig | None = None,
    dtype: str = "bfloat16",
    quantize: str | None = None,
    remat: str | None = None,
    rules: Rules = LLAMA_RULES,
) -> MemoryEstimate:
    """Per-device bytes of a LoRA (or `adapter_config`) train step with AdamW.

    config: a `jpeft.models.ModelConfig`; mesh: a Mesh, or axis sizes {"data": 1, "fsdp": 8,
    "model": 1} to plan for devices you do not have; batch: the global batch; seq: tokens per
    example; quantize: "nf4"/"fp4" for a 4-bit base (double-quantized, blocksize 64); remat: the
    train step's per-layer activation checkpointing (None, "dots" or "full").
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
    mesh = _as_mesh(mesh)
    _, params, adapter = _abstract_state(config, adapter_config, dtype, quantize)
    weights = _tree_bytes(params, param_specs(params, mesh, rules), mesh)
    adapter_bytes = _tree_bytes(adapter, adapter_specs(adapter, params, mesh, rules), mesh)
    counted = _activation_bytes(config, mesh, batch, seq, jnp.dtype(dtype).itemsize, remat)
    activations = int(counted * OVERHEAD[remat])
    return MemoryEstimate(weights, adapter_bytes, ADAM_MOMENTS * adapter_bytes, activations)


def compiled_step_memory(
    config: Any,
    mesh: Mesh,
    batch: int,
    seq: int,
    *,
    adapter_config: PeftConfig | None = None,
    dtype: str = "bfloat16",
    quantize: str | None = None,
    remat: str | None = None,
    rules: Rules = LLAMA_RULES,
) -> Any:
    """XLA's `memory_analysis()` of the sharded train step (AdamW, `jpeft.train.make_train_step`)
    compiled for `mesh` from abstract inputs: exact per-device argument and temporary bytes for
    the backend it runs on, with nothing allocated. Run it on the target (a TPU VM) to check a
    plan before loading a model; arguments as in `estimate_memory`.
    """
    model, params, adapter = _abstract_state(config, adapter_config, dtype, quantize)
    optimizer = optax.adamw(1e-4)
    trainable = partition(adapter, is_trainable)[0]
    opt_state = jax.eval_shape(lambda t: init_opt_state(optimizer, t), trainable)
    s = step_shardings(mesh, params, adapter, optimizer, rules)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=s.batch)
    step = make_train_step(model, optimizer, shardings=s, remat=remat)
    lowered = step.lower(
        _with_shardings(params, s.params),
        _with_shardings(adapter, s.adapter),
        _with_shardings(opt_state, s.opt_state),
        {"input_ids": ids, "labels": ids},
        None,
    )
    return lowered.compile().memory_analysis()


def _abstract_state(config, adapter_config, dtype: str, quantize: str | None):
    """(model, params, adapter) of `config` as ShapeDtypeStructs: nothing is allocated."""
    adapter_config = adapter_config or LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    model = LlamaForCausalLM(config)

    def build(key):
        params = model.init(key, jnp.dtype(dtype))
        if quantize is not None:
            params = quantize_params(params, QuantConfig(quant_type=quantize, double_quant=True))
        return params, init_adapter(params, adapter_config, key=key, model=model)

    return model, *jax.eval_shape(build, jax.random.key(0))


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        tree,
        shardings,
    )


def _as_mesh(mesh: Mesh | Mapping[str, int]) -> Mesh | AbstractMesh:
    if isinstance(mesh, Mesh | AbstractMesh):
        return mesh
    unknown = set(mesh) - set(AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} are not among {AXES}")
    sizes = tuple(int(mesh.get(a, 1)) for a in AXES)
    if min(sizes) < 1:
        raise ValueError(f"planning needs every mesh size given (no -1), got {dict(mesh)}")
    return AbstractMesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _tree_bytes(tree: Any, specs: Any, mesh) -> int:
    """Bytes per device of `tree`'s leaves (ShapeDtypeStructs) placed by `specs`."""
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    total = 0
    for leaf, spec in zip(leaves, spec_leaves, strict=True):
        split = math.prod(axes_size(mesh, axis_names(entry)) for entry in spec)
        total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize // split
    return total


def _activation_bytes(config, mesh, batch: int, seq: int, itemsize: int, remat) -> int:
    """What the backward pass keeps, per device: per layer, the tensors each op saves.

    b local rows, m-way tensor parallel where heads and the intermediate size divide. Without
    remat a layer keeps its norms' inputs and outputs, q/k/v, the attention probabilities (f32)
    and output, and the MLP's gate, up and product; "dots" keeps the matmul outputs only and
    recomputes the rest; "full" keeps each layer's input and recomputes the layer. The logits
    and their gradient (f32) come on top.
    """
    c = config
    b = max(batch // math.prod(mesh.shape[a] for a in BATCH_AXES), 1)
    m = mesh.shape["model"]
    heads, kv = _split(c.num_attention_heads, m), _split(c.num_key_value_heads, m)
    inter = _split(c.intermediate_size, m)
    d, hd = c.hidden_size, c.head_dim
    qkv = (heads + 2 * kv) * hd
    tokens = b * seq
    if remat == "full":
        per_layer = tokens * d * itemsize
        recomputed = _full_layer(tokens, d, qkv, heads * hd, inter, itemsize, heads, b, seq)
    elif remat == "dots":
        per_layer = tokens * (qkv + 2 * d + 2 * inter) * itemsize
        recomputed = 0
    else:
        per_layer = _full_layer(tokens, d, qkv, heads * hd, inter, itemsize, heads, b, seq)
        recomputed = 0
    vocab = _split(c.vocab_size, m)
    logits = 2 * tokens * vocab * 4
    # a layer's weights gathered over fsdp for its matmuls, forward and backward both in flight
    layer_weights = (d * qkv + heads * hd * d + 3 * d * inter) * itemsize
    return c.num_hidden_layers * per_layer + recomputed + logits + 2 * layer_weights


def _split(size: int, ways: int) -> int:
    """One device's part of a dimension the rules split `ways` ways (whole when it does not
    divide, as `fit_dims` does)."""
    return size // ways if size % ways == 0 else size


def _full_layer(tokens, d, qkv, attn_out, inter, itemsize, heads, b, seq) -> int:
    """Everything one decoder layer saves for its backward pass."""
    dense = tokens * (4 * d + 2 * qkv + attn_out + 3 * inter) * itemsize
    probabilities = b * heads * seq * seq * 4
    return dense + probabilities
