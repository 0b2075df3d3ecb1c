"""jpeft and Qwix side by side: the same LoRA on the same Flax model, checked and timed.

The model is a small Llama-shaped decoder written here with plain Flax layers: for linen
(`nn.Dense`, `nn.Embed`) its layers are an `nn.scan` stack, for NNX (`nnx.Linear`, `nnx.Embed`)
a Python loop over an `nnx.List` (Qwix 0.1.8 adapts a linen `nn.scan` stack but fails inside an
`nnx.scan`). LoRA r=16, alpha=32 on every projection but the head, with the same A and B in both
libraries (Qwix's A [in, r] is jpeft's `lora_A.weight`.T, its B [r, out] `lora_B.weight`.T; B is
random, not PEFT's zeros, so the adapter changes the output). For each framework and each base:

- **checks**: jpeft's and Qwix's logits, loss and gradients with respect to A and B (max
  |difference| over max |value|; for the gradients the worst of all A and B tensors); on the float
  base they must agree to float32 rounding, or the run fails;
- **step time**: a jitted train step (loss and gradients with respect to the LoRA arrays only,
  then an Adam update), compilation excluded, the two libraries' steps alternating in one process;
  the figure is the ratio of the medians, jpeft / Qwix;
- **step memory**: XLA's `memory_analysis()` of each compiled step, temporary buffers plus
  arguments, under XLA:CPU's default scheduler; and (not with `--quick` or `--skip-fresh`) from a
  fresh process per step under the memory-minimizing scheduler, with that process's peak RSS
  (VmHWM; it builds the model and adapter, compiles the step and runs it three times), beside a
  process that builds the model and adapter but no step.

The 4-bit base is each library's own format: jpeft's `peft.quantize` stores each projection's
[out, in] view as bitsandbytes NF4 (blocks of 64 inputs, float32 absmax, no double quantization,
two codes packed a byte) and its matmul's backward keeps only codes and scales; Qwix's
`weight_qtype="nf4"`, `tile_size=64` stores uint4 codes [in, out] with a float32 scale per tile of
64 inputs, and autodiff keeps the dequantized weight for the backward. The blocks are the same, so
the dequantized values agree but for the few elements at a rounding midpoint (counted in the
JSON); the 4-bit logits and gradients are reported, not required to agree.

Run:  python benchmarks/qwix_compare.py [--steps 10] [--quick] [--skip-fresh]
                                        [--json benchmarks/qwix_compare.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

import jpeft
import jpeft.flax

warnings.simplefilter("ignore", DeprecationWarning)  # qwix 0.1.8 uses flax APIs 0.12 deprecates


@dataclasses.dataclass(frozen=True)
class Shape:
    """The decoder's sizes and the batch a step trains on."""

    vocab: int
    dim: int
    layers: int
    heads: int
    intermediate: int
    batch: int
    seq: int


FULL = Shape(vocab=4096, dim=512, layers=4, heads=8, intermediate=1536, batch=4, seq=128)
QUICK = Shape(vocab=256, dim=64, layers=2, heads=4, intermediate=128, batch=2, seq=16)
RANK, ALPHA = 16, 32.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QWIX_TARGETS = r".*/(" + "|".join(TARGETS) + ")"
BLOCKSIZE = 64  # NF4 absmax block (jpeft, bitsandbytes) = Qwix tile, along the input axis
FRAMEWORKS, BASES, LIBRARIES = ("linen", "nnx"), ("float", "nf4"), ("jpeft", "qwix")
FLOAT_TOLERANCE = 1e-5  # max |difference| / max |value| allowed between the two on a float base
MIB = 2**20

# -------------------------------------------------------------------------- the model


def rope(x: jax.Array) -> jax.Array:
    """Rotary position embedding of x [batch, seq, heads, head_dim] (positions 0..seq-1)."""
    half = x.shape[-1] // 2
    angle = jnp.arange(x.shape[1])[:, None] * 10000.0 ** (-jnp.arange(half) / half)
    cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Causal softmax attention of q, k, v [batch, seq, dim] -> [batch, seq, dim]."""
    b, t, dim = q.shape
    q, k, v = (a.reshape(b, t, heads, dim // heads) for a in (q, k, v))
    q, k = rope(q), rope(k)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dim // heads)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, jnp.finfo(scores.dtype).min)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(b, t, dim)


class LinenAttention(nn.Module):
    shape: Shape

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v, o = (
            nn.Dense(self.shape.dim, use_bias=False, name=name)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj")
        )
        return o(causal_attention(q(x), k(x), v(x), self.shape.heads))


class LinenMlp(nn.Module):
    shape: Shape

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.shape
        gate = nn.Dense(s.intermediate, use_bias=False, name="gate_proj")(x)
        up = nn.Dense(s.intermediate, use_bias=False, name="up_proj")(x)
        return nn.Dense(s.dim, use_bias=False, name="down_proj")(nn.silu(gate) * up)


class LinenDecoderLayer(nn.Module):
    """One layer, as `nn.scan` calls it: (x, None) -> (x, None)."""

    shape: Shape

    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        h = nn.RMSNorm(epsilon=1e-6, name="input_layernorm")(x)
        x = x + LinenAttention(self.shape, name="self_attn")(h)
        h = nn.RMSNorm(epsilon=1e-6, name="post_attention_layernorm")(x)
        return x + LinenMlp(self.shape, name="mlp")(h), None


class LinenLlama(nn.Module):
    """ids [batch, seq] -> logits [batch, seq, vocab]."""

    shape: Shape

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        s = self.shape
        x = nn.Embed(s.vocab, s.dim, name="embed_tokens")(ids)
        stack = nn.scan(
            LinenDecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=s.layers,
        )
        x, _ = stack(s, name="layers")(x, None)
        x = nn.RMSNorm(epsilon=1e-6, name="norm")(x)
        return nn.Dense(s.vocab, use_bias=False, name="lm_head")(x)


class NnxAttention(nnx.Module):
    def __init__(self, s: Shape, rngs: nnx.Rngs):
        self.heads = s.heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nnx.Linear(s.dim, s.dim, use_bias=False, rngs=rngs) for _ in range(4)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        out = causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads)
        return self.o_proj(out)


class NnxMlp(nnx.Module):
    def __init__(self, s: Shape, rngs: nnx.Rngs):
        self.gate_proj = nnx.Linear(s.dim, s.intermediate, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(s.dim, s.intermediate, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(s.intermediate, s.dim, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class NnxDecoderLayer(nnx.Module):
    def __init__(self, s: Shape, rngs: nnx.Rngs):
        self.input_layernorm = nnx.RMSNorm(s.dim, epsilon=1e-6, rngs=rngs)
        self.self_attn = NnxAttention(s, rngs)
        self.post_attention_layernorm = nnx.RMSNorm(s.dim, epsilon=1e-6, rngs=rngs)
        self.mlp = NnxMlp(s, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class NnxLlama(nnx.Module):
    """The NNX twin of `LinenLlama`."""

    def __init__(self, s: Shape, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(s.vocab, s.dim, rngs=rngs)
        self.layers = nnx.List([NnxDecoderLayer(s, rngs) for _ in range(s.layers)])
        self.norm = nnx.RMSNorm(s.dim, epsilon=1e-6, rngs=rngs)
        self.lm_head = nnx.Linear(s.dim, s.vocab, use_bias=False, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


# -------------------------------------------------------------------------- the two libraries


@dataclasses.dataclass
class Side:
    """One library's LoRA on one model, as a train step sees it.

    logits(trainable, frozen, ids) -> [batch, seq, vocab]; `trainable` holds the LoRA arrays
    (the pytree gradients are taken of), `frozen` the base; to_peft(trainable-shaped tree) ->
    {module: {"lora_A.weight": [r, in], "lora_B.weight": [out, r]}} in jpeft's names.
    """

    logits: Callable[[Any, Any, jax.Array], jax.Array]
    trainable: Any
    frozen: Any
    to_peft: Callable[[Any], dict[str, dict[str, jax.Array]]]


def lora_config() -> jpeft.LoraConfig:
    return jpeft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS))


def with_random_b(adapter: jpeft.Adapter, key: jax.Array) -> jpeft.Adapter:
    """The adapter with every `lora_B.weight` drawn from N(0, 0.02^2) instead of zeros."""
    weights = {}
    for i, (module, pieces) in enumerate(sorted(adapter.weights.items())):
        b = pieces["lora_B.weight"]
        noise = 0.02 * jax.random.normal(jax.random.fold_in(key, i), b.shape, b.dtype)
        weights[module] = {**pieces, "lora_B.weight": noise}
    return adapter.replace(weights=weights)


def jpeft_side(peft, base, adapter: jpeft.Adapter, nf4: bool) -> Side:
    """jpeft's PeftModel (linen or NNX): the adapter trains, the base (maybe NF4) is frozen."""
    frozen = peft.quantize(base) if nf4 else base
    return Side(
        logits=lambda adapter, frozen, ids: peft.apply(frozen, ids, adapter=adapter),
        trainable=adapter,
        frozen=frozen,
        to_peft=lambda tree: tree.weights,
    )


QWIX_PIECES = {"kernel_lora_a": "lora_A.weight", "kernel_lora_b": "lora_B.weight"}
LORA_SUFFIXES = tuple(f"/{leaf}" for leaf in QWIX_PIECES)


def qwix_modules(name: str, shape: tuple[int, ...]) -> tuple[list[str], str]:
    """The jpeft modules and piece of one Qwix LoRA array of `shape`.

    'layers/0/self_attn/q_proj/kernel_lora_a' -> (['layers.0.self_attn.q_proj'], 'lora_A.weight').
    An array of a scanned layer ([L, in, r]) carries one module per layer on its leading axis,
    and jpeft puts the layer index after the scanned module's name: 'layers/self_attn/q_proj/..'
    -> ['layers.0.self_attn.q_proj', 'layers.1.self_attn.q_proj', ...].
    """
    path, leaf = name.rsplit("/", 1)
    head, _, rest = path.partition("/")
    if len(shape) == 2:
        return [path.replace("/", ".")], QWIX_PIECES[leaf]
    modules = [f"{head}.{i}.{rest.replace('/', '.')}" for i in range(shape[0])]
    return modules, QWIX_PIECES[leaf]


def qwix_to_peft(flat: dict[str, jax.Array]) -> dict[str, dict[str, jax.Array]]:
    """Qwix's LoRA arrays (A [*stack, in, r], B [*stack, r, out]) in jpeft's names and
    orientation, one entry per layer."""
    out: dict[str, dict[str, jax.Array]] = {}
    for name, value in flat.items():
        modules, piece = qwix_modules(name, value.shape)
        layers = [value] if value.ndim == 2 else list(value)
        for module, layer in zip(modules, layers, strict=True):
            out.setdefault(module, {})[piece] = layer.T
    return out


def qwix_values(shapes: dict[str, tuple[int, ...]], adapter: jpeft.Adapter) -> dict:
    """{Qwix LoRA name: jpeft's arrays, transposed (and stacked for a scanned layer)} for every
    Qwix LoRA array in `shapes`; an error if the two libraries adapt different modules."""
    values, adapted = {}, set()
    for name, shape in shapes.items():
        modules, piece = qwix_modules(name, shape)
        layers = [adapter.weights[module][piece].T for module in modules]
        values[name] = layers[0] if len(shape) == 2 else jnp.stack(layers)
        adapted.update(modules)
    if adapted != set(adapter.weights):
        raise RuntimeError(
            f"Qwix adapts {sorted(adapted)[:3]}..., jpeft {sorted(adapter.weights)[:3]}...: "
            f"the two target different modules (QWIX_TARGETS={QWIX_TARGETS!r})"
        )
    return values


def qwix_provider(nf4: bool) -> qwix.LoraProvider:
    quant = dict(weight_qtype="nf4", tile_size=BLOCKSIZE) if nf4 else {}
    return qwix.LoraProvider(module_path=QWIX_TARGETS, rank=RANK, alpha=ALPHA, **quant)


def flat_dict(tree) -> dict[str, Any]:
    return {"/".join(k): v for k, v in flatten_dict(tree).items()}


def nested_dict(flat: dict[str, Any]) -> dict:
    return unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def qwix_quantize_stacked(params: dict, abstract: dict) -> dict:
    """`qwix.quantize_params` for a model whose layers are scanned: each kernel [L, in, out]
    quantized as L kernels in Qwix's format, the layer axis channelwise (Qwix 0.1.8's
    `quantize_params` applies the per-layer tiling to the stacked kernel and fails)."""
    specs = flat_dict(abstract)
    out = {}
    for name, value in flat_dict(params).items():
        spec = specs[name]
        if hasattr(spec, "how"):  # Qwix's WithAux: quantize as its `how` says, per layer
            how, lead = spec.how, value.ndim - 2
            value = spec.replace(
                array=qwix.quantize(
                    value,
                    how.qtype,
                    channelwise_axes=[*range(lead), *(a + lead for a in how.channelwise_axes)],
                    tiled_axes={a + lead: size for a, size in how.tiled_axes.items()},
                )
            )
        out[name] = value
    return nested_dict(out)


def qwix_linen_side(model, params, ids, adapter: jpeft.Adapter, nf4: bool) -> Side:
    """Qwix on the linen model: LoRA arrays are '<layer>/kernel_lora_a|b' in its params."""
    lora_model = qwix.apply_lora_to_model(model, qwix_provider(nf4))
    abstract = jax.eval_shape(lora_model.init, jax.random.key(0), ids)["params"]
    base = qwix_quantize_stacked(params, abstract) if nf4 else params
    shapes = {n: a.shape for n, a in flat_dict(abstract).items() if n.endswith(LORA_SUFFIXES)}

    def logits(trainable, frozen, ids):
        return lora_model.apply({"params": nested_dict({**frozen, **trainable})}, ids)

    return Side(logits, qwix_values(shapes, adapter), flat_dict(base), qwix_to_peft)


def nnx_flat(state: nnx.State) -> dict[str, Any]:
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def qwix_nnx_side(model: nnx.Module, ids, adapter: jpeft.Adapter, nf4: bool) -> Side:
    """Qwix on the NNX model (cloned by Qwix): LoRA arrays are its `nnx.LoRAParam`s."""
    lora_model = qwix.apply_lora_to_model(model, qwix_provider(nf4), ids, rngs=nnx.Rngs(params=1))
    graphdef, lora, rest = nnx.split(lora_model, nnx.LoRAParam, ...)
    values = qwix_values({n: v.shape for n, v in nnx_flat(lora).items()}, adapter)
    for path, variable in nnx.to_flat_state(lora):
        variable.set_value(values["/".join(map(str, path))])
    return Side(
        logits=lambda lora, rest, ids: nnx.merge(graphdef, lora, rest)(ids),
        trainable=lora,
        frozen=rest,
        to_peft=lambda state: qwix_to_peft(nnx_flat(state)),
    )


ALL_SIDES = tuple((base, library) for base in BASES for library in LIBRARIES)


def build_sides(
    framework: str, shape: Shape, wanted: tuple[tuple[str, str], ...] = ALL_SIDES
) -> tuple[dict[tuple[str, str], Side], jax.Array]:
    """{(base, library): Side} for one framework and the `wanted` pairs, all from one model
    and one adapter; and the token ids [batch, seq] a step trains on."""
    ids = jax.random.randint(jax.random.key(1), (shape.batch, shape.seq), 0, shape.vocab)
    if framework == "linen":
        model = LinenLlama(shape)
        base = jax.jit(model.init)(jax.random.key(0), ids)
        peft = jpeft.flax.linen.PeftModel(model, base, ids)
    else:
        model = NnxLlama(shape, nnx.Rngs(0))
        peft = jpeft.flax.nnx.PeftModel(model)
        _, base = nnx.split(model)
    adapter = peft.init_adapter(base, lora_config(), key=jax.random.key(2))
    adapter = with_random_b(adapter, jax.random.key(3))
    sides = {}
    for quant, library in wanted:
        nf4 = quant == "nf4"
        if library == "jpeft":
            sides[quant, library] = jpeft_side(peft, base, adapter, nf4)
        elif framework == "linen":
            sides[quant, library] = qwix_linen_side(model, base["params"], ids, adapter, nf4)
        else:
            sides[quant, library] = qwix_nnx_side(model, ids, adapter, nf4)
    return sides, ids


# -------------------------------------------------------------------------- checks and steps


def cross_entropy(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Mean next-token cross entropy of logits [batch, seq, vocab] on ids [batch, seq]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def outputs(side: Side, ids: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
    """(logits, loss, PEFT-named gradients) at the side's current LoRA arrays."""

    def loss_fn(trainable, frozen):
        logits = side.logits(trainable, frozen, ids)
        return cross_entropy(logits, ids), logits

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, logits), grads = grad_fn(side.trainable, side.frozen)
    return logits, loss, side.to_peft(grads)


def relative_difference(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def compare(ours: Side, theirs: Side, ids: jax.Array) -> tuple[dict, tuple[jax.Array, ...]]:
    """Relative differences of jpeft's (`ours`) and Qwix's logits, loss and gradients (the
    worst tensor), and the two logits."""
    our_logits, our_loss, our_grads = outputs(ours, ids)
    their_logits, their_loss, their_grads = outputs(theirs, ids)
    grad_diffs = {
        f"{module}.{piece}": relative_difference(
            our_grads[module][piece], their_grads[module][piece]
        )
        for module in our_grads
        for piece in our_grads[module]
    }
    worst = max(grad_diffs, key=grad_diffs.get)
    row = {
        "logits_rel_diff": relative_difference(our_logits, their_logits),
        "loss": {"jpeft": float(our_loss), "qwix": float(their_loss)},
        "loss_rel_diff": abs(float(our_loss) - float(their_loss)) / abs(float(their_loss)),
        "grads_rel_diff": grad_diffs[worst],
        "grads_worst_tensor": worst,
        "grads_compared": len(grad_diffs),
    }
    return row, (our_logits, their_logits)


class Step:
    """A side's compiled train step (Adam on its LoRA arrays), its state, and how to run it."""

    def __init__(self, side: Side, ids: jax.Array):
        optimizer = optax.adam(1e-3)

        def loss_fn(trainable, frozen, ids):
            return cross_entropy(side.logits(trainable, frozen, ids), ids)

        def step(trainable, opt_state, frozen, ids):
            loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, loss

        self.side, self.ids = side, ids
        self.trainable, self.opt_state = side.trainable, optimizer.init(side.trainable)
        start = time.perf_counter()
        lowered = jax.jit(step).lower(self.trainable, self.opt_state, side.frozen, ids)
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - start
        self.loss = float("nan")

    def run(self) -> float:
        """One step; its wall time in seconds."""
        start = time.perf_counter()
        self.trainable, self.opt_state, loss = self.compiled(
            self.trainable, self.opt_state, self.side.frozen, self.ids
        )
        self.loss = float(loss)
        return time.perf_counter() - start

    def memory(self) -> dict:
        analysis = self.compiled.memory_analysis()
        temp, args = analysis.temp_size_in_bytes, analysis.argument_size_in_bytes
        return {
            "temp_mib": temp / MIB,
            "argument_mib": args / MIB,
            "temp_plus_argument_mib": (temp + args) / MIB,
        }


def time_alternating(steps: dict[str, Step], count: int) -> dict[str, float]:
    """Median wall time per step of each side, the sides taking turns step by step."""
    for step in steps.values():
        step.run()  # warm up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(count):
        for name, step in steps.items():
            times[name].append(step.run())
    return {name: statistics.median(t) for name, t in times.items()}


# -------------------------------------------------------------------------- fresh processes

# XLA:CPU's default scheduler starts independent ops early, for concurrency; this one orders
# for memory. It is read when the backend starts, so its figures come from a fresh process.
MEMORY_MINIMIZING = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def peak_rss_here() -> int:
    """This process's peak resident memory (VmHWM), in bytes."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) * 1024


def child_figures(framework: str, base: str, library: str, shape: Shape) -> dict:
    """(In the child) build the model and adapter and, unless `library` is 'none', compile that
    one side's step and run three steps: its memory analysis and the process's peak RSS."""
    wanted = () if library == "none" else ((base, library),)
    sides, ids = build_sides(framework, shape, wanted)
    figures = {}
    if sides:
        step = Step(sides[base, library], ids)
        for _ in range(3):
            step.run()
        figures = step.memory()
    return {**figures, "peak_rss_mib": peak_rss_here() / MIB}


def in_fresh_process(framework: str, base: str, library: str) -> dict:
    """`child_figures` (full-size model) from a new process under the memory-minimizing
    scheduler."""
    command = [sys.executable, __file__, "--child", framework, base, library]
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {MEMORY_MINIMIZING}"}
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------- the figures


def nf4_values_differing(sides: dict[tuple[str, str], Side]) -> dict[str, int]:
    """How many elements of the linen projections dequantize differently from jpeft's NF4 and
    from Qwix's (the formats store differently; this says whether they round alike)."""
    jpeft_params = flat_dict(sides["nf4", "jpeft"].frozen["params"])
    qwix_params = sides["nf4", "qwix"].frozen
    differing = total = 0
    for name, leaf in jpeft_params.items():
        if isinstance(leaf, jpeft.quant.QuantizedTensor):
            ours = jpeft.quant.dequantize(leaf)  # [layers, out, in]
            theirs = jnp.swapaxes(qwix.dequantize(qwix_params[name].array), -1, -2)
            differing += int(jnp.sum(ours != theirs))
            total += ours.size
    return {"differing": differing, "total": total}


def compare_framework(framework: str, shape: Shape, steps: int) -> dict:
    """Checks, step memory and step time of jpeft vs Qwix, float and NF4 base, one framework."""
    sides, ids = build_sides(framework, shape)
    float_logits = None
    figures: dict[str, Any] = {}
    for base in BASES:
        pair = {library: sides[base, library] for library in LIBRARIES}
        row, logits = compare(pair["jpeft"], pair["qwix"], ids)
        if base == "float":
            float_logits = logits[1]
            check_float_agreement(framework, row)
        else:
            row["logits_rel_diff_to_float_base"] = {
                library: relative_difference(out, float_logits)
                for library, out in zip(LIBRARIES, logits, strict=True)
            }
            if framework == "linen":
                row["dequantized_values"] = nf4_values_differing(sides)
        figures[base] = {**row, **step_figures(pair, ids, steps)}
    return figures


def step_figures(pair: dict[str, Side], ids: jax.Array, steps: int) -> dict:
    """Each library's step time (alternating), compile time, loss after the timed steps and
    step memory; and jpeft / Qwix of the time and of the memory."""
    compiled = {library: Step(side, ids) for library, side in pair.items()}
    times = time_alternating(compiled, steps)
    row: dict[str, Any] = {
        library: {
            "step_s": times[library],
            "compile_s": step.compile_s,
            "loss_after_steps": step.loss,
            **step.memory(),
        }
        for library, step in compiled.items()
    }
    row["jpeft_over_qwix_time"] = times["jpeft"] / times["qwix"]
    row["jpeft_over_qwix_temp_plus_argument"] = (
        row["jpeft"]["temp_plus_argument_mib"] / row["qwix"]["temp_plus_argument_mib"]
    )
    return row


def check_float_agreement(framework: str, row: dict) -> None:
    """Raise unless jpeft and Qwix agree to float32 rounding on the float base."""
    for key in ("logits_rel_diff", "loss_rel_diff", "grads_rel_diff"):
        if not row[key] < FLOAT_TOLERANCE:
            raise RuntimeError(
                f"{framework}, float base: jpeft and Qwix differ, {key}={row[key]:.2e} "
                f"(allowed {FLOAT_TOLERANCE:.0e}; worst gradient {row['grads_worst_tensor']})"
            )


def add_fresh_process_figures(figures: dict) -> None:
    """Per framework, base and library, the step's memory under the memory-minimizing scheduler
    and the peak RSS of a process that builds and runs only that step; and, per framework, the
    peak RSS of a process that builds the model and adapter but no step."""
    for framework in FRAMEWORKS:
        baseline = in_fresh_process(framework, "float", "none")["peak_rss_mib"]
        figures[framework]["model_and_adapter_only_peak_rss_mib"] = baseline
        for base in BASES:
            row = figures[framework][base]
            for library in LIBRARIES:
                row[library]["fresh_process"] = in_fresh_process(framework, base, library)
            ours, theirs = (row[library]["fresh_process"] for library in LIBRARIES)
            row["jpeft_over_qwix_peak_rss"] = ours["peak_rss_mib"] / theirs["peak_rss_mib"]
            row["jpeft_over_qwix_temp_plus_argument_memory_minimizing"] = (
                ours["temp_plus_argument_mib"] / theirs["temp_plus_argument_mib"]
            )


def print_table(figures: dict) -> None:
    columns = ("logits", "grads", "jpeft s", "qwix s", "time j/q", "mem j/q", "mm j/q", "rss j/q")
    print(("{:<6} {:<5}" + " {:>8}" * len(columns)).format("", "base", *columns))
    for framework in FRAMEWORKS:
        for base in BASES:
            row = figures[framework][base]
            cells = [
                f"{row['logits_rel_diff']:.1e}",
                f"{row['grads_rel_diff']:.1e}",
                f"{row['jpeft']['step_s']:.3f}",
                f"{row['qwix']['step_s']:.3f}",
                f"{row['jpeft_over_qwix_time']:.2f}",
                f"{row['jpeft_over_qwix_temp_plus_argument']:.2f}",
            ]
            for key in ("temp_plus_argument_memory_minimizing", "peak_rss"):
                ratio = row.get(f"jpeft_over_qwix_{key}")
                cells.append("-" if ratio is None else f"{ratio:.2f}")
            print(("{:<6} {:<5}" + " {:>8}" * len(cells)).format(framework, base, *cells))
    print(
        "logits, grads: max |jpeft - qwix| / max |qwix| (grads: the worst tensor); time: median "
        "step; mem: XLA temp + argument bytes of the step (mm: memory-minimizing scheduler, "
        "fresh process); rss: fresh process peak RSS"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per library")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny model, no fresh processes (under a minute)"
    )
    parser.add_argument(
        "--skip-fresh", action="store_true", help="no fresh-process figures (peak RSS)"
    )
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    shape = QUICK if args.quick else FULL
    if args.child:
        print(json.dumps(child_figures(*args.child, shape)))
        return
    start = time.perf_counter()
    figures: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
        f"({jax.default_backend()}), flax {flax.__version__}, qwix {qwix.__version__}",
        "shape": dataclasses.asdict(shape),
        "lora": {"r": RANK, "lora_alpha": ALPHA, "target_modules": list(TARGETS)},
        "timed_steps": args.steps,
        "layers": {"linen": "nn.scan stack", "nnx": "Python loop over an nnx.List"},
        "nf4_formats": {
            "jpeft": "bitsandbytes NF4 of each [out, in] view: blocks of 64 inputs, float32 "
            "absmax, no double quantization, two codes a byte; backward keeps codes and scales",
            "qwix": "uint4 codes [in, out], float32 scale per output per tile of 64 inputs; "
            "autodiff keeps the dequantized weight",
        },
    }
    for framework in FRAMEWORKS:
        figures[framework] = compare_framework(framework, shape, args.steps)
    if not (args.quick or args.skip_fresh):
        add_fresh_process_figures(figures)
    figures["wall_s"] = time.perf_counter() - start
    print_table(figures)
    text = json.dumps(figures, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
