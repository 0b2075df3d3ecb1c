"""Llama-family decoder-only language models: Llama (1/2/3, llama3 RoPE), Mistral, Qwen2, Qwen3,
Gemma 1/2/3 (text).

The params are a plain nested dict keyed by the Hugging Face module paths, weights in HF
orientation `[out, in]`, except that the decoder layers are stacked on a leading axis under
`params["model"]["layers"]` so that one layer body runs under `lax.scan`:

    params["model"]["embed_tokens"]["weight"]                     [V, D]
    params["model"]["layers"]["self_attn"]["q_proj"]["weight"]    [L, H*hd, D]  (+ "bias" [L, H*hd])
    params["model"]["layers"]["self_attn"]["q_norm"]["weight"]    [L, hd]       (Qwen3)
    params["model"]["layers"]["mlp"]["gate_proj"]["weight"]       [L, I, D]
    params["model"]["layers"]["input_layernorm"]["weight"]        [L, D]
    params["model"]["norm"]["weight"]                             [D]
    params["lm_head"]["weight"]                                   [V, D]  (absent when tied)

Every projection goes through `ops.linear` and the embedding through `ops.embed`, so a weight
leaf may be an adapted-weight node (see `jpeft.ops`); the model never looks inside one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jpeft import ops
from jpeft.activations import constrain_batch
from jpeft.adapter import Prompt
from jpeft.injection import Prepared, prepare
from jpeft.mixed import mix
from jpeft.models import rope
from jpeft.models.inputs import check_inputs, check_max_new_tokens, float_dtype
from jpeft.models.rope import RopeScaling

Params = dict[str, Any]

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
_NO_WINDOW = 1 << 30  # window of a full-attention layer: larger than any sequence
_QUERY_BLOCK = 128  # query block length of `causal_attention`
# "llama": x / rms * w, cast first; "gemma": x / rms * (1 + w) in float32, then cast.
NORM_STYLES = ("llama", "gemma")
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


@dataclass(frozen=True)
class ModelConfig:
    """Static architecture of a Llama-family model (hashable, so it can be a jit static arg).

    `attention_bias` puts a bias on q/k/v_proj, `o_proj_bias` on o_proj (Llama's
    `attention_bias` sets both; Qwen2 has only the first). `layer_types[i]` is
    `"sliding_attention"` when layer `i` only attends to the last `sliding_window` tokens.

    Gemma: `norm_style="gemma"` (every RMSNorm scales by 1 + w, in float32), `embed_scale`
    (embeddings times sqrt(hidden_size), rounded to their dtype), `sandwich_norms` (Gemma 2/3:
    norms on the attention and MLP outputs too, `pre_/post_feedforward_layernorm`),
    `query_pre_attn_scalar` (attention scale), `attn_logit_softcapping` (Gemma 2: scores ->
    cap * tanh(scores / cap)), `final_logit_softcapping` (the same on the logits),
    `rope_local_theta` (Gemma 3: the sliding layers' RoPE base, without rope scaling).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    hidden_act: str = "silu"
    norm_style: str = "llama"
    embed_scale: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_local_theta: float | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            kind = FULL_ATTENTION if self.sliding_window is None else SLIDING_ATTENTION
            object.__setattr__(self, "layer_types", (kind,) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers="
                f"{self.num_hidden_layers}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if SLIDING_ATTENTION in self.layer_types and self.sliding_window is None:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is None")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; supported: {tuple(ACTIVATIONS)}"
            )
        if self.norm_style not in NORM_STYLES:
            raise ValueError(f"norm_style={self.norm_style!r}; choose from {NORM_STYLES}")
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}={value!r} must be positive (or None)")
        if self.rope_local_theta is not None and SLIDING_ATTENTION not in self.layer_types:
            raise ValueError("rope_local_theta is set but no layer is a sliding_attention layer")

    @property
    def attention_scale(self) -> float:
        """The factor on q.k: `query_pre_attn_scalar ** -0.5` (Gemma 2/3), else head_dim's."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


def param_shapes(config: ModelConfig) -> Params:
    """The param tree of `config` with shape tuples as leaves (layers stacked on axis 0)."""
    c, n = config, config.num_hidden_layers
    q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim

    def proj(out: int, inp: int, bias: bool) -> dict[str, tuple[int, ...]]:
        return {"weight": (n, out, inp), **({"bias": (n, out)} if bias else {})}

    attn = {
        "q_proj": proj(q_dim, c.hidden_size, c.attention_bias),
        "k_proj": proj(kv_dim, c.hidden_size, c.attention_bias),
        "v_proj": proj(kv_dim, c.hidden_size, c.attention_bias),
        "o_proj": proj(c.hidden_size, q_dim, c.o_proj_bias),
    }
    if c.qk_norm:
        attn["q_norm"] = {"weight": (n, c.head_dim)}
        attn["k_norm"] = {"weight": (n, c.head_dim)}
    layers = {
        "self_attn": attn,
        "mlp": {
            "gate_proj": proj(c.intermediate_size, c.hidden_size, c.mlp_bias),
            "up_proj": proj(c.intermediate_size, c.hidden_size, c.mlp_bias),
            "down_proj": proj(c.hidden_size, c.intermediate_size, c.mlp_bias),
        },
        "input_layernorm": {"weight": (n, c.hidden_size)},
        "post_attention_layernorm": {"weight": (n, c.hidden_size)},
    }
    if c.sandwich_norms:
        layers["pre_feedforward_layernorm"] = {"weight": (n, c.hidden_size)}
        layers["post_feedforward_layernorm"] = {"weight": (n, c.hidden_size)}
    tree: Params = {
        "model": {
            "embed_tokens": {"weight": (c.vocab_size, c.hidden_size)},
            "layers": layers,
            "norm": {"weight": (c.hidden_size,)},
        }
    }
    if not c.tie_word_embeddings:
        tree["lm_head"] = {"weight": (c.vocab_size, c.hidden_size)}
    return tree


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, style: str = "llama") -> jax.Array:
    """RMSNorm over the last axis: `x` [..., d], `weight` [d]. Normalized in float32; "llama"
    casts back, then scales by `weight`; "gemma" scales by 1 + `weight` in float32, then casts."""
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if style == "gemma":
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def attention_mask(q_idx: jax.Array, key_valid: jax.Array, window: jax.Array) -> jax.Array:
    """Which keys each query sees: `q_idx` [seq] slot of each query, `key_valid` [batch, kv] bool.

    Causal (`kv <= q`), within `window` (`kv > q - window`) and not padding -> [batch, seq, kv].
    """
    kv_idx = jnp.arange(key_valid.shape[1])
    visible = (kv_idx[None, :] <= q_idx[:, None]) & (kv_idx[None, :] > q_idx[:, None] - window)
    return visible[None] & key_valid[:, None, :]


def grouped_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    num_kv_heads: int,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """GQA without repeating kv heads: `q` [B, S, H, hd], `k`/`v` [B, K, T, hd], `mask` [B, S, T].

    Query head `h` reads kv head `h // (H // K)` like transformers' `repeat_kv`. The G = H // K
    query heads of a kv head are stacked as G*S rows, so both products are plain batched matmuls
    over (B, K) ([B, K, G*S, hd] x [B, K, T, hd]), the layout XLA:CPU runs (and differentiates)
    fastest. `scale` multiplies the scores (default head_dim ** -0.5); `softcap` caps them,
    cap * tanh(scores / cap), before the mask (Gemma 2). Softmax in float32 -> [B, S, H * hd].
    """
    b, s, h, hd = q.shape
    groups, t = h // num_kv_heads, k.shape[2]
    rows = q.reshape(b, s, num_kv_heads, groups, hd).transpose(0, 2, 3, 1, 4)
    rows = rows.reshape(b, num_kv_heads, groups * s, hd)
    scores = jnp.einsum("bkmd,bktd->bkmt", rows, k) * (hd**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    row_mask = jnp.broadcast_to(mask[:, None, None], (b, 1, groups, s, t))
    row_mask = row_mask.reshape(b, 1, groups * s, t)
    scores = jnp.where(row_mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkmt,bktd->bkmd", probs, v).reshape(b, num_kv_heads, groups, s, hd)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h * hd)


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    num_kv_heads: int,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """`grouped_attention` of S queries over the same S positions (no cache), in query blocks.

    `q` [B, S, H, hd], `k`/`v` [B, K, S, hd], `mask` [B, S, S] causal. Query block [lo, hi) only
    reads keys [0, hi): the keys after it are masked for every one of its rows, so the skipped
    blocks change nothing but the work (about 1/4 of it for two blocks). The one exception is a
    row with no visible key at all (a query at a padding position): its output, garbage either
    way, averages the values of its block's keys instead of all keys. -> [B, S, H * hd].
    """
    seq = q.shape[1]
    edges = list(range(0, seq, _QUERY_BLOCK)) + [seq]
    return jnp.concatenate(
        [
            grouped_attention(
                q[:, lo:hi],
                k[:, :, :hi],
                v[:, :, :hi],
                mask[:, lo:hi, :hi],
                num_kv_heads,
                scale,
                softcap,
            )
            for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        ],
        axis=1,
    )


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclass(frozen=True)
class LlamaForCausalLM:
    """A Llama-family causal LM; the config is static, the params are passed to every call.

    `remat` checkpoints each decoder layer for the backward pass: "full" keeps only the layer's
    input and recomputes the rest, "dots" keeps the matmul outputs; None keeps everything.

    Every call checks its inputs' shapes and dtypes while it is traced (see
    `jpeft.models.inputs`), and the token ids' range when they are concrete. `check_ids=True`
    checks the range inside `jax.jit` too, with `jax.experimental.checkify`: call the jitted
    function through `jpeft.models.checked(step)` to get a ValueError for a bad id.
    """

    config: ModelConfig
    remat: str | None = None
    check_ids: bool = False

    def __post_init__(self) -> None:
        if self.remat is not None and self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"remat must be None or one of {sorted(REMAT_POLICIES)}, got {self.remat!r}"
            )

    def init(self, key: jax.Array, dtype: jnp.dtype = jnp.float32) -> Params:
        """Random params (normal(0, 0.02) weights, unit norms, zero biases) for tests/benchmarks."""
        return _init_params(self.config, key, float_dtype(dtype))

    def apply(
        self,
        params: Params,
        input_ids: jax.Array,
        adapter: Any = None,
        attention_mask: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        adapter_names: Sequence[str] | None = None,
    ) -> jax.Array:
        """`input_ids` [B, S] int -> logits [B, S, V]; `attention_mask` [B, S]: 1 token, 0 pad.

        With a prompt-tuning or p-tuning adapter the logits are [B, T + S, V], the T virtual
        tokens first, as PEFT's are. `position_ids` [B, S] or [1, S]; `dropout_key` a PRNG key
        (`jax.random.key`) that turns on the adapter's dropout. `adapter_names` [B] with
        `adapter` a dict {name: LoRA Adapter}: row b runs adapter `adapter_names[b]`
        ("__base__": none), PEFT's mixed-adapter batch (see `jpeft.mixed`).
        """
        adapter = mix(adapter, adapter_names) if adapter_names is not None else adapter
        ready, hidden = self._checked_hidden(
            params, input_ids, adapter, attention_mask, dropout_key, position_ids
        )
        return self._head(ready.params, hidden)

    def hidden_states(
        self,
        params: Params,
        input_ids: jax.Array,
        adapter: Any = None,
        attention_mask: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
        """`input_ids` [B, S] int -> the final-norm hidden states [B, S, D] ([B, T + S, D] with
        T virtual tokens)."""
        return self._checked_hidden(
            params, input_ids, adapter, attention_mask, dropout_key, position_ids
        )[1]

    def logits(self, params: Params, h: jax.Array, adapter: Any = None) -> jax.Array:
        """The LM head alone: `h` [..., D] -> logits [..., V]."""
        return self._head(prepare(params, adapter).params, h)

    def generate(
        self,
        params: Params,
        input_ids: jax.Array,
        max_new_tokens: int,
        adapter: Any = None,
        attention_mask: jax.Array | None = None,
        adapter_names: Sequence[str] | None = None,
    ) -> jax.Array:
        """Greedy decoding with a KV cache: `input_ids` [B, S] -> [B, S + max_new_tokens].

        `adapter_names` as in `apply`: each row decodes with its own adapter.

        Left padding in `attention_mask` is handled like transformers' `generate`. Prompt-learning
        adapters put their virtual tokens or prefix first, as PEFT's `generate` does; the result
        holds the real tokens only. The whole loop is one jitted function, cached per model,
        shapes and `max_new_tokens`. ValueError when the prompt (virtual tokens included) plus
        `max_new_tokens` exceeds `max_position_embeddings`.
        """
        input_ids = jnp.asarray(input_ids)
        check_inputs(self.config.vocab_size, input_ids, attention_mask)
        adapter = mix(adapter, adapter_names) if adapter_names is not None else adapter
        ready = prepare(params, adapter)
        virtual = 0 if ready.prompt is None else ready.prompt.num_virtual_tokens
        max_new_tokens = check_max_new_tokens(
            max_new_tokens, virtual + input_ids.shape[1], self.config.max_position_embeddings
        )
        if max_new_tokens == 0:
            return input_ids
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        return _generate(
            self, ready.params, ready.prompt, input_ids, jnp.asarray(attention_mask), max_new_tokens
        )

    def _checked_hidden(
        self,
        params: Params,
        input_ids: jax.Array,
        adapter: Any,
        attention_mask: jax.Array | None,
        dropout_key: jax.Array | None,
        position_ids: jax.Array | None,
    ) -> tuple[Prepared, jax.Array]:
        """The inputs checked, the adapter prepared, and `_hidden` run: (prepared, [B, S, D])."""
        check_inputs(
            self.config.vocab_size,
            input_ids,
            attention_mask,
            position_ids,
            dropout_key,
            check_ids=self.check_ids,
        )
        ready = prepare(params, adapter, dropout_key)
        hidden = self._hidden(
            ready.params,
            input_ids,
            attention_mask,
            position_ids,
            ready.untouched_layers,
            ready.prompt,
        )
        return ready, hidden

    def _hidden(
        self,
        params: Params,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        position_ids: jax.Array | None,
        frozen_layers: int = 0,
        prompt: Prompt | None = None,
    ) -> jax.Array:
        """Embeddings -> scanned layers -> final norm, no cache: [B, S] -> [B, S, D].

        The first `frozen_layers` layers hold nothing trainable: they run without a backward pass.
        `prompt` adds virtual tokens before the inputs ([B, T + S, D] out) or a per-layer prefix.
        """
        batch, seq = input_ids.shape
        if attention_mask is None:
            key_valid = jnp.ones((batch, seq), bool)
        else:
            key_valid = attention_mask.astype(bool)
        x = constrain_batch(self.embed_tokens(params, input_ids))
        if prompt is None:
            if position_ids is None:
                position_ids = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
            x, _ = self._decoder(params, x, position_ids, key_valid, None, 0, frozen_layers)
            return x
        tokens = prompt.num_virtual_tokens
        virtual_valid = jnp.ones((batch, tokens), bool)
        key_valid = jnp.concatenate([virtual_valid, key_valid], axis=1)
        if prompt.embeddings is not None:
            if position_ids is not None:
                warnings.warn(
                    "position_ids are ignored with prompt tuning and p-tuning, as in PEFT",
                    stacklevel=3,
                )
            x = jnp.concatenate([self._virtual_embeddings(prompt, batch, x.dtype), x], axis=1)
            positions = jnp.broadcast_to(jnp.arange(tokens + seq), (batch, tokens + seq))
            x, _ = self._decoder(params, x, positions, key_valid, None, 0)
            return x
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        cache = self._prefix_cache(prompt, batch, tokens + seq, x.dtype)
        x, _ = self._decoder(params, x, position_ids + tokens, key_valid, cache, tokens)
        return x

    def _virtual_embeddings(self, prompt: Prompt, batch: int, dtype) -> jax.Array:
        """The prompt's virtual token embeddings for each row: [B, T, D]."""
        tokens, dim = prompt.embeddings.shape
        if dim != self.config.hidden_size:
            raise ValueError(
                f"the prompt adapter's virtual tokens have token_dim={dim} but the model's "
                f"hidden_size is {self.config.hidden_size}; was the adapter made for another model?"
            )
        return jnp.broadcast_to(prompt.embeddings.astype(dtype), (batch, tokens, dim))

    def _prefix_cache(self, prompt: Prompt, batch: int, length: int, dtype) -> tuple:
        """A KV cache (k, v), each [L, B, K, length, hd], holding the prefix in its first slots."""
        c = self.config
        layers, heads, tokens, head_dim = prompt.keys.shape
        want = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
        if (layers, heads, head_dim) != want:
            raise ValueError(
                f"the prefix-tuning adapter has num_layers={layers}, {heads} key/value heads of "
                f"size {head_dim} (token_dim={heads * head_dim}), but the model has "
                f"{want[0]} layers and {want[1]} key/value heads of size {want[2]} "
                f"(token_dim={want[1] * want[2]}); was the adapter made for another model?"
            )
        shape = (layers, batch, heads, length, head_dim)

        def filled(prefix: jax.Array) -> jax.Array:
            cache = jnp.zeros(shape, dtype)
            prefix = jnp.broadcast_to(prefix[:, None].astype(dtype), (*shape[:3], tokens, head_dim))
            return lax.dynamic_update_slice(cache, prefix, (0, 0, 0, 0, 0))

        return filled(prompt.keys), filled(prompt.values)

    def _decoder(
        self,
        params: Params,
        x: jax.Array,
        position_ids: jax.Array,
        key_valid: jax.Array,
        cache: tuple[jax.Array, jax.Array] | None,
        offset: jax.Array | int,
        frozen_layers: int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Run all layers on embeddings `x` [B, S, D] placed at cache slots `offset + arange(S)`.

        `key_valid` [B, T] marks real tokens among the keys (T = S without a cache, else the cache
        length); `cache` is `(k, v)`, each [L, B, K, T, hd], or None. The first `frozen_layers`
        layers (no cache only) run in their own scan with no gradient. Returns the final-norm
        hidden states [B, S, D] and the updated cache.
        """
        c = self.config
        # [2 or 1, B, S, hd/2]: the global RoPE, then the sliding layers' own (Gemma 3)
        ropes = [rope.cos_sin(self._inv_freq(), position_ids, x.dtype)]
        if c.rope_local_theta is not None:
            local = rope.inverse_frequencies(c.head_dim, c.rope_local_theta, None)
            ropes.append(rope.cos_sin(local, position_ids, x.dtype))
        cos_all, sin_all = (jnp.stack(parts) for parts in zip(*ropes, strict=True))
        q_idx = offset + jnp.arange(x.shape[1])
        sliding = [t == SLIDING_ATTENTION for t in c.layer_types]
        windows = jnp.array([c.sliding_window if s else _NO_WINDOW for s in sliding])
        rope_index = jnp.array([int(s and c.rope_local_theta is not None) for s in sliding])

        def body(x, layer):
            p, window, which, kv = layer
            mask = attention_mask(q_idx, key_valid, window)
            x, kv = self._layer(p, x, cos_all[which], sin_all[which], mask, kv, offset)
            return constrain_batch(x), kv

        if self.remat is not None:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)

        layers = (params["model"]["layers"], windows, rope_index)
        if frozen_layers and cache is None:
            bottom = jax.tree.map(lambda a: a[:frozen_layers], layers)
            x = lax.stop_gradient(lax.scan(body, x, (*bottom, None))[0])
            layers = jax.tree.map(lambda a: a[frozen_layers:], layers)
        x, cache = lax.scan(body, x, (*layers, cache))
        return self._norm(params["model"]["norm"], x), cache

    def _layer(
        self,
        p: Params,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None,
        offset: jax.Array | int,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """One pre-norm decoder layer: `x` [B, S, D] -> [B, S, D], plus this layer's cache.

        With sandwich norms (Gemma 2/3) `post_attention_layernorm` normalizes the attention's
        output and `pre_/post_feedforward_layernorm` wrap the MLP; else it is the MLP's input
        norm (Llama)."""
        h = self._norm(p["input_layernorm"], x)
        attn, kv = self._attention(p["self_attn"], h, cos, sin, mask, kv, offset)
        if self.config.sandwich_norms:
            x = x + self._norm(p["post_attention_layernorm"], attn)
            h = self._mlp(p["mlp"], self._norm(p["pre_feedforward_layernorm"], x))
            return x + self._norm(p["post_feedforward_layernorm"], h), kv
        x = x + attn
        h = self._norm(p["post_attention_layernorm"], x)
        return x + self._mlp(p["mlp"], h), kv

    def _norm(self, p: Params, x: jax.Array) -> jax.Array:
        """The config's RMSNorm with the module dict `p` = {"weight": w}."""
        return rms_norm(x, p["weight"], self.config.rms_norm_eps, self.config.norm_style)

    def embed_tokens(self, params: Params, ids: jax.Array) -> jax.Array:
        """Token embeddings `ids` [...] -> [..., D] as the model's embedding layer gives them:
        times sqrt(hidden_size) rounded to their dtype for Gemma (prompt-learning virtual tokens
        do not get it, as in transformers; PEFT's TEXT / SAMPLE_VOCAB prompt init does)."""
        x = ops.embed(ids, params["model"]["embed_tokens"]["weight"])
        if not self.config.embed_scale:
            return x
        return x * jnp.asarray(np.float32(self.config.hidden_size**0.5), x.dtype)

    def _attention(
        self,
        p: Params,
        h: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None,
        offset: jax.Array | int,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Self-attention `h` [B, S, D] -> [B, S, D]; writes k/v into the cache `kv` if given."""
        c = self.config
        batch, seq, _ = h.shape
        q = _linear(p["q_proj"], h).reshape(batch, seq, c.num_attention_heads, c.head_dim)
        k = _linear(p["k_proj"], h).reshape(batch, seq, c.num_key_value_heads, c.head_dim)
        v = _linear(p["v_proj"], h).reshape(batch, seq, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:
            q = self._norm(p["q_norm"], q)
            k = self._norm(p["k_norm"], k)
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if kv is not None:
            start = (0, 0, offset, 0)
            kv = (
                lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start),
                lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start),
            )
            k, v = kv
        attend = grouped_attention if kv is not None else causal_attention
        out = attend(
            q, k, v, mask, c.num_key_value_heads, c.attention_scale, c.attn_logit_softcapping
        )
        return _linear(p["o_proj"], out), kv

    def _mlp(self, p: Params, h: jax.Array) -> jax.Array:
        """Gated MLP `down(act(gate(h)) * up(h))`: [B, S, D] -> [B, S, D]."""
        act = ACTIVATIONS[self.config.hidden_act]
        return _linear(p["down_proj"], act(_linear(p["gate_proj"], h)) * _linear(p["up_proj"], h))

    def _head(self, params: Params, h: jax.Array) -> jax.Array:
        """LM head on already-injected params: `h` [..., D] -> [..., V] (tied: embed_tokens),
        soft-capped when the config says so (Gemma 2)."""
        if "lm_head" in params:
            logits = ops.linear(h, params["lm_head"]["weight"])
        elif not self.config.tie_word_embeddings:
            raise KeyError("params has no 'lm_head' and the config does not tie word embeddings")
        else:
            logits = ops.linear(h, params["model"]["embed_tokens"]["weight"])
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def _inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies of this config, float32 [head_dim // 2]."""
        c = self.config
        return rope.inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)


def _linear(p: Params, x: jax.Array) -> jax.Array:
    """`ops.linear` with the module dict `p` = {"weight": w, optional "bias": b}."""
    return ops.linear(x, p["weight"], p.get("bias"))


def is_shape(x: Any) -> bool:
    """Leaf test for `param_shapes` trees, whose leaves are shape tuples."""
    return isinstance(x, tuple)


@partial(jax.jit, static_argnums=(0, 2))
def _init_params(config: ModelConfig, key: jax.Array, dtype: jnp.dtype) -> Params:
    """All params of `config` at once (one compilation), see `LlamaForCausalLM.init`."""
    leaves, treedef = jax.tree.flatten_with_path(param_shapes(config), is_leaf=is_shape)
    keys = jax.random.split(key, len(leaves))
    norm_value = 0.0 if config.norm_style == "gemma" else 1.0  # a unit norm either way
    values = [
        _init_leaf(k, jax.tree_util.keystr(path), shape, dtype, norm_value)
        for k, (path, shape) in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, values)


def _init_leaf(
    key: jax.Array, path: str, shape: tuple[int, ...], dtype: jnp.dtype, norm_value: float
) -> jax.Array:
    """Init one leaf from its key path: norms -> `norm_value`, biases -> zeros, weights ->
    N(0, 0.02)."""
    if "norm" in path:
        return jnp.full(shape, norm_value, dtype)
    if path.endswith("['bias']"):
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@partial(jax.jit, static_argnums=(0, 5))
def _generate(
    model: LlamaForCausalLM,
    params: Params,
    prompt: Prompt | None,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    max_new_tokens: int,
) -> jax.Array:
    """Prefill then `max_new_tokens - 1` single-token steps: [B, S] -> [B, S + max_new_tokens].

    Cache slots: a prefix (prefix tuning), then the prompt (virtual tokens first for prompt
    tuning), then the new tokens. Positions count the valid slots, as transformers' `generate`
    derives them from the attention mask, except with virtual tokens: PEFT drops position ids
    there, so the model numbers the slots, padding included, as `apply` does.
    """
    batch, seq = input_ids.shape
    x = model.embed_tokens(params, input_ids)
    virtual = prompt is not None and prompt.embeddings is not None
    prefix_len = prompt.num_virtual_tokens if prompt is not None and not virtual else 0
    if virtual:
        x = jnp.concatenate([model._virtual_embeddings(prompt, batch, x.dtype), x], axis=1)
        attention_mask = jnp.pad(
            attention_mask, ((0, 0), (prompt.num_virtual_tokens, 0)), constant_values=1
        )
    filled = prefix_len + x.shape[1]
    valid = jnp.pad(attention_mask.astype(bool), ((0, 0), (prefix_len, 0)), constant_values=True)
    if virtual:
        positions = jnp.broadcast_to(jnp.arange(filled), (batch, filled))  # PEFT drops them
    else:
        positions = jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, 0)[:, prefix_len:]
    key_valid = jnp.concatenate([valid, jnp.ones((batch, max_new_tokens), bool)], axis=1)
    if prefix_len:
        cache = model._prefix_cache(prompt, batch, filled + max_new_tokens, x.dtype)
    else:
        c = model.config
        shape = (c.num_hidden_layers, batch, c.num_key_value_heads, filled + max_new_tokens)
        cache = tuple(jnp.zeros((*shape, c.head_dim), x.dtype) for _ in range(2))

    h, cache = model._decoder(params, x, positions, key_valid, cache, prefix_len)
    first = jnp.argmax(model._head(params, h[:, -1]), axis=-1)
    tokens = jnp.zeros((batch, max_new_tokens), input_ids.dtype).at[:, 0].set(first)

    def step(t, carry):
        tokens, cache = carry
        x = model.embed_tokens(params, lax.dynamic_slice_in_dim(tokens, t - 1, 1, axis=1))
        pos = positions[:, -1:] + t
        h, cache = model._decoder(params, x, pos, key_valid, cache, filled + t - 1)
        nxt = jnp.argmax(model._head(params, h[:, 0]), axis=-1)
        return tokens.at[:, t].set(nxt.astype(tokens.dtype)), cache

    tokens, _ = lax.fori_loop(1, max_new_tokens, step, (tokens, cache))
    return jnp.concatenate([input_ids, tokens], axis=1)
