"""A new adapter from weighted existing ones: PEFT's `add_weighted_adapter` (LoRA and IA3).

`add_weighted_adapter(adapters, weights, combination_type=...)` returns the adapter PEFT's
`LoraModel.add_weighted_adapter` builds. Per module, with s_i the source scaling (alpha/r) and
w_i the weight, over the adapters that adapt the module:

- `cat`: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...] (rank sum r_i): exactly
  sum_i w_i dW_i;
- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` (equal ranks): the A's and the
  B's are merged apart (`jpeft.task_arithmetic`), A with weights sign(w_i s_i) sqrt|w_i s_i| and B
  with sqrt|w_i s_i|, so `linear` has cross terms: it is sum_i w_i dW_i only for one adapter;
- `svd` and `<merge>_svd`: dW = merge of the w_i dW_i, then its truncated SVD, B = U S, A = V^T
  at rank `svd_rank` (default: the largest source rank), U and V^T clamped to the `svd_clamp`
  quantile of their values if given.

The new config is the first adapter's with r = lora_alpha = the new rank (scaling 1), the targets'
union, no rank or alpha pattern, as PEFT's. Where PEFT's result is wrong jpeft differs: the new
config has `use_rslora=False` (PEFT keeps the first adapter's, and an rsLoRA source then scales
the result by sqrt(r)); adapters with DoRA, PiSSA/OLoRA starts, trainable tokens,
`modules_to_save` or trained biases are refused (PEFT's result drops or mixes them silently).
IA3 adapters combine as PEFT's `IA3Model.add_weighted_adapter` does: l = sum_i w_i l_i.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import task_arithmetic as ta
from jpeft.adapter import Adapter
from jpeft.methods.ia3 import L_KEY
from jpeft.methods.lora import A_KEY, B_KEY, EMB_A_KEY, EMB_B_KEY

Array = jax.Array
SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = ("cat", *SAME_RANK, *SVD)
RANDOM = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
# Fields that decide which modules an adapter covers besides target_modules: PEFT takes the first
# adapter's for the new one, dropping other adapters' modules silently, so they must agree.
LAYER_FIELDS = ("layers_to_transform", "layers_pattern", "exclude_modules")


def add_weighted_adapter(
    adapters: Sequence[Adapter] | Mapping[str, Adapter],
    weights: Sequence[float],
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    *,
    key: Array | None = None,
) -> Adapter:
    """The adapter PEFT's `add_weighted_adapter` adds (see the module doc); `key` seeds the DARE
    types' random pruning (required for them)."""
    sources = list(adapters.values()) if isinstance(adapters, Mapping) else list(adapters)
    if not sources or len(sources) != len(weights):
        raise ValueError(
            f"add_weighted_adapter needs one weight per adapter, got {len(sources)} adapters and "
            f"{len(weights)} weights"
        )
    types = sorted({a.config.peft_type for a in sources})
    if types == ["IA3"]:
        if combination_type not in ("svd", "linear"):
            raise ValueError(
                f"IA3 adapters combine only as a weighted sum of their vectors (PEFT's IA3 "
                f"add_weighted_adapter), not combination_type={combination_type!r}"
            )
        return _combine_ia3(sources, weights)
    if types != ["LORA"]:
        raise ValueError(
            f"add_weighted_adapter combines LoRA adapters (or IA3 ones), as PEFT's does; got "
            f"{types}"
        )
    _check_lora_sources(sources)
    combination_type = "linear" if len(sources) == 1 else combination_type
    new_rank = _new_rank(sources, combination_type, svd_rank)
    if combination_type in RANDOM and key is None:
        raise ValueError(
            f"combination_type={combination_type!r} prunes at random: pass key= (a JAX PRNG key, "
            "e.g. jax.random.key(0)) so the result can be reproduced"
        )
    options = dict(
        density=density, sign_method=majority_sign_method, clamp=svd_clamp, new_rank=new_rank
    )
    first = sources[0].config
    config = first.replace(
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=_union_targets(sources),
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
    )
    modules = list(dict.fromkeys(m for a in sources for m in a.weights))
    combined = {}
    for index, module in enumerate(modules):
        parts = [
            (w, a.weights[module], a.config.scaling_for(module))
            for a, w in zip(sources, weights, strict=True)
            if module in a.weights
        ]
        module_key = None if key is None else jax.random.fold_in(key, index)
        combined[module] = _combine_module(module, parts, combination_type, module_key, options)
    return Adapter(config, combined)


# ---------------------------------------------------------------------------------------------
# LoRA


def _check_lora_sources(sources: list[Adapter]) -> None:
    """ValueError for what PEFT's add_weighted_adapter gets wrong or cannot do."""
    for index, adapter in enumerate(sources):
        config, name = adapter.config, f"adapter {index}"
        if config.use_dora:
            raise ValueError(
                f"{name} uses DoRA; PEFT's add_weighted_adapter drops the magnitude vectors, so "
                "the combination would not be the adapters' sum (jpeft refuses it)"
            )
        if config.has_residual_init:
            raise ValueError(
                f"{name} has init_lora_weights={config.init_lora_weights!r}; its change of W is "
                "B A - B0 A0, which PEFT's add_weighted_adapter ignores: save it converted "
                "(jpeft.save_pretrained does) and combine the loaded adapter"
            )
        if adapter.overrides:
            raise ValueError(
                f"{name} trains {sorted(adapter.overrides)} (modules_to_save or biases); PEFT's "
                "add_weighted_adapter gives the new adapter fresh copies of those modules instead "
                "(or refuses two adapters sharing one), so jpeft combines adapters without them"
            )
        if any(A_KEY not in p and EMB_A_KEY not in p for p in adapter.weights.values()):
            raise ValueError(
                f"{name} holds trainable token rows (trainable_token_indices), which PEFT's "
                "add_weighted_adapter does not combine; remove them first"
            )
    for field in LAYER_FIELDS:
        values = [getattr(a.config, field) for a in sources]
        if any(v != values[0] for v in values):
            raise ValueError(
                f"the adapters differ in {field} ({values}); the new adapter keeps the first "
                "one's, so PEFT would drop the others' modules outside it: combine adapters that "
                "agree"
            )


def _new_rank(sources: list[Adapter], combination_type: str, svd_rank: int | None) -> int:
    ranks = [max([a.config.r, *(a.config.rank_pattern or {}).values()]) for a in sources]
    if combination_type in SAME_RANK:
        if len(set(ranks)) != 1:
            raise ValueError(
                "All adapters must have the same r value when using combination_type linear, "
                f"ties, dare_ties or dare_linear (got r={ranks}); use cat or an svd type"
            )
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    if combination_type in SVD:
        if svd_rank is not None and svd_rank < 1:
            raise ValueError(f"svd_rank must be a positive rank, got {svd_rank}")
        return svd_rank or max(ranks)
    raise ValueError(
        f"Invalid combination_type: {combination_type!r}; use one of {list(COMBINATIONS)}"
    )


def _union_targets(sources: list[Adapter]) -> Any:
    """PEFT's new target_modules: "(a)|(b)" for regexes, the union of name lists."""
    targets = [_target_names(a) for a in sources]
    if len({isinstance(t, str) for t in targets}) > 1:
        raise ValueError(
            "all adapter configs should follow the same target modules type. Combining adapters "
            "with `target_modules` type being a mix of list/set and string is not supported."
        )
    return _join(targets)


def _target_names(adapter: Adapter) -> str | tuple[str, ...]:
    """The config's target_modules, with "all-linear" as the names it resolved to (PEFT saves
    those, never the shorthand)."""
    targets = adapter.config.target_modules
    if targets == "all-linear":
        return tuple(sorted({module.rsplit(".", 1)[-1] for module in adapter.weights}))
    return targets


def _combine_module(module: str, parts, combination_type: str, key, options) -> dict[str, Array]:
    """{A piece: [new r, in], B piece: [out, new r]} of one module from its (w, pieces, s)."""
    embedding = EMB_A_KEY in parts[0][1]
    a_key, b_key = (EMB_A_KEY, EMB_B_KEY) if embedding else (A_KEY, B_KEY)
    dtype = parts[0][1][a_key].dtype
    a_list = [jnp.asarray(p[a_key], jnp.float32) for _, p, _ in parts]
    b_list = [jnp.asarray(p[b_key], jnp.float32) for _, p, _ in parts]
    scaled = [w * s for w, _, s in parts]
    if combination_type == "cat":
        new_a = jnp.concatenate([f * a for f, a in zip(scaled, a_list, strict=True)], axis=0)
        new_b = jnp.concatenate(b_list, axis=1)
        pad = options["new_rank"] - new_a.shape[0]
        new_a, new_b = jnp.pad(new_a, ((0, pad), (0, 0))), jnp.pad(new_b, ((0, 0), (0, pad)))
    elif combination_type in SVD:
        deltas = [s * (b @ a) for (_, _, s), a, b in zip(parts, a_list, b_list, strict=True)]
        merged = _merge(
            combination_type.removesuffix("_svd"), deltas, [w for w, _, _ in parts], key, options
        )
        new_b, new_a = _truncated_svd(module, merged, options["new_rank"], options["clamp"])
    else:
        _check_same_shapes(module, a_list)
        _check_same_shapes(module, b_list)
        root = [float(np.sqrt(abs(f))) for f in scaled]
        signed = [r if f >= 0 else -r for r, f in zip(root, scaled, strict=True)]
        keys = (None, None) if key is None else jax.random.split(key)
        new_a = _merge(combination_type, a_list, signed, keys[0], options)
        new_b = _merge(combination_type, b_list, root, keys[1], options)
    return {a_key: new_a.astype(dtype), b_key: new_b.astype(dtype)}


def _merge(kind: str, tensors, weights, key, options) -> Array:
    """One `jpeft.task_arithmetic` merge; "svd" alone is the plain weighted sum."""
    density, sign_method = options["density"], options["sign_method"]
    if kind in ("svd", "linear"):
        return ta.task_arithmetic(tensors, weights)
    if kind == "ties":
        return ta.ties(tensors, weights, density, sign_method)
    if kind == "magnitude_prune":
        return ta.magnitude_prune(tensors, weights, density)
    if kind == "dare_linear":
        return ta.dare_linear(tensors, weights, density, key)
    return ta.dare_ties(tensors, weights, density, key, sign_method)


def _truncated_svd(module: str, delta: Array, rank: int, clamp: float | None):
    """(U_k S_k [out, k], V^T_k [k, in]) of `delta` [out, in], clamped to the `clamp` quantile."""
    if rank > min(delta.shape):
        raise ValueError(
            f"{module}: svd_rank {rank} is above the rank a change of shape {tuple(delta.shape)} "
            f"can have ({min(delta.shape)}); pass a smaller svd_rank"
        )
    u, s, vh = jnp.linalg.svd(delta, full_matrices=False)
    u, vh = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:
        high = jnp.quantile(jnp.concatenate([u.reshape(-1), vh.reshape(-1)]), clamp)
        u, vh = jnp.clip(u, -high, high), jnp.clip(vh, -high, high)
    return u, vh


def _check_same_shapes(module: str, tensors: list[Array]) -> None:
    shapes = sorted({tuple(t.shape) for t in tensors})
    if len(shapes) > 1:
        raise ValueError(
            f"{module}: the adapters' pieces have the shapes {shapes}; the linear, ties, dare and "
            "magnitude_prune types merge pieces of one rank (rank_pattern may differ per "
            "module): use cat or an svd type"
        )


# ---------------------------------------------------------------------------------------------
# IA3


def _combine_ia3(sources: list[Adapter], weights: Sequence[float]) -> Adapter:
    """PEFT's IA3 combination: l = sum_i w_i l_i over the adapters that scale the module."""
    for index, adapter in enumerate(sources):
        if adapter.overrides:
            raise ValueError(
                f"adapter {index} trains {sorted(adapter.overrides)} (modules_to_save); PEFT's "
                "add_weighted_adapter gives the new adapter fresh copies of those modules instead, "
                "so jpeft combines adapters without them"
            )
    targets = [a.config.target_modules for a in sources]
    feedforward = [a.config.feedforward_modules for a in sources]
    for values in (targets, feedforward):
        if len({type(v) for v in values}) > 1:
            raise ValueError(
                "All adapter configs should have the same type for target and feedforward modules."
            )
    config = sources[0].config.replace(
        target_modules=_join(targets), feedforward_modules=_join(feedforward)
    )
    modules = list(dict.fromkeys(m for a in sources for m in a.weights))
    combined = {}
    for module in modules:
        vectors = [
            (w, a.weights[module][L_KEY])
            for a, w in zip(sources, weights, strict=True)
            if module in a.weights
        ]
        shapes = {tuple(v.shape) for _, v in vectors}
        if len(shapes) > 1:
            raise ValueError(
                f"{module}: the adapters scale it on different sides ({sorted(shapes)}: "
                "feed-forward [1, in] in some, output [out, 1] in others); they cannot be summed"
            )
        total = sum(w * jnp.asarray(v, jnp.float32) for w, v in vectors)
        combined[module] = {L_KEY: total.astype(vectors[0][1].dtype)}
    return Adapter(config, combined)


def _join(values: list[Any]) -> Any:
    """PEFT's union of module fields: "(a)|(b)" for regexes, the union of name lists."""
    if isinstance(values[0], str):
        return "|".join(f"({v})" for v in values)
    if values[0] is None:
        return None
    return tuple(sorted(set().union(*values)))
