"""Swapping adapters under one compiled program: `pad_to`, jpeft's form of PEFT's hot-swap.

A jitted function taking an adapter compiles once per adapter *structure*: its config (static
data of the pytree), its modules, and its pieces' shapes and dtypes. Adapters of one method, one
config and one shape therefore swap freely already. `pad_to(adapter, like)` makes a LoRA adapter
of any rank, alpha and target subset take `like`'s structure without changing what it computes,
as PEFT's `prepare_model_for_compiled_hotswap` + `hotswap_adapter` do for torch.compile:

    A' = [A; 0]  (rank padded with zero rows),   B' = [B, 0] * (s / s_like)

so that s_like B' A' = s B A, module by module (s the adapter's scaling alpha/r, per module with
rank/alpha patterns), and modules `like` adapts but the adapter does not get zero pieces (PEFT's
hot-swap zero-fills them too). The result has `like`'s config, so it also saves as an adapter of
`like`'s rank (the saved file is exact, with zero padding).
"""

from __future__ import annotations

import jax.numpy as jnp

from jpeft.adapter import Adapter
from jpeft.methods.lora import A_KEY, B_KEY, EMB_A_KEY, EMB_B_KEY

# (A piece, its rank axis), (B piece, its rank axis) for linear and embedding modules
LAYOUTS = (((A_KEY, 0), (B_KEY, 1)), ((EMB_A_KEY, 0), (EMB_B_KEY, 1)))


def pad_to(adapter: Adapter, like: Adapter) -> Adapter:
    """`adapter` (LoRA) with `like`'s config, modules and piece shapes and the same function."""
    _check_swappable(adapter, like)
    weights = {}
    for module, like_pieces in like.weights.items():
        pieces = adapter.weights.get(module)
        (a_key, a_axis), (b_key, b_axis) = _layout(like_pieces)
        if pieces is None:
            weights[module] = {k: jnp.zeros_like(v) for k, v in like_pieces.items()}
            continue
        if a_key not in pieces:
            raise ValueError(
                f"{module} is a table in one adapter and a linear layer in the other "
                f"({sorted(pieces)} against {sorted(like_pieces)})"
            )
        rank, like_rank = pieces[a_key].shape[a_axis], like_pieces[a_key].shape[a_axis]
        if rank > like_rank:
            raise ValueError(
                f"{module} has rank {rank} in the adapter but {like_rank} in `like`; pad to an "
                "adapter of the largest rank (every module's rank at least the adapter's)"
            )
        ratio = adapter.config.scaling_for(module) / like.config.scaling_for(module)
        dtype_a, dtype_b = like_pieces[a_key].dtype, like_pieces[b_key].dtype
        weights[module] = {
            a_key: _pad(pieces[a_key].astype(dtype_a), a_axis, like_rank),
            b_key: _pad((pieces[b_key] * ratio).astype(dtype_b), b_axis, like_rank),
        }
    return Adapter(like.config, weights)


def _check_swappable(adapter: Adapter, like: Adapter) -> None:
    for name, one in (("adapter", adapter), ("like", like)):
        if one.config.peft_type != "LORA":
            raise ValueError(
                f"pad_to pads LoRA adapters (as PEFT's hot-swap); {name} is {one.config.peft_type}"
            )
        if one.config.use_dora or one.config.has_residual_init or one.overrides:
            raise ValueError(
                f"pad_to cannot pad {name}: DoRA magnitudes, PiSSA/OLoRA starts and "
                "modules_to_save copies have no neutral padding (PEFT's hot-swap refuses them "
                "too); swap such adapters only with ones of the same config"
            )
    extra = sorted(set(adapter.weights) - set(like.weights))
    if extra:
        raise ValueError(
            f"the adapter adapts {len(extra)} modules `like` does not (first {extra[0]!r}); pad to "
            "an adapter whose targets include every module of the adapters you swap"
        )


def _layout(pieces) -> tuple[tuple[str, int], tuple[str, int]]:
    for layout in LAYOUTS:
        if layout[0][0] in pieces:
            return layout
    raise ValueError(f"pad_to pads LoRA's A/B pieces, not {sorted(pieces)}")


def _pad(piece, axis: int, rank: int):
    widths = [(0, 0)] * piece.ndim
    widths[axis] = (0, rank - piece.shape[axis])
    return jnp.pad(piece, widths)
