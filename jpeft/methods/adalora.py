"""AdaLoRA: LoRA in SVD form whose ranks are pruned during training by importance, with PEFT's
semantics and file format.

Math (Zhang et al. 2023, https://arxiv.org/abs/2303.10512), per targeted linear `W` [out, in]:

    y = x W^T + b + s * (dropout(x) (A * E)^T) B^T,   A [k, in], E [k, 1], B [out, k],
    s = lora_alpha / (init_r + 1e-5)

E holds the "singular values" and broadcasts over the rows of A, so the forward is LoRA's with
A' = A * E (jpeft runs it through `LoraWeight`: no weight-sized gradient, 4-bit bases included).
As in PEFT, s divides by `init_r` for ever (also after pruning), `use_rslora` and `alpha_pattern`
have no effect, and `lora_alpha <= 0` means "use the module's rank" (its rows k).

Training adds two things (PEFT's `AdaLoraModel.forward` and `RankAllocator`):
- `regularizer`: orth_reg_weight * mean over all A and B of ||A A^T - I||_F, ||B^T B - I||_F;
- `wrap_optimizer`: after each optimizer step, importance EMAs of |p * grad|, and on PEFT's cubic
  budget schedule a mask that zeroes the E entries of the least important triplets; from step
  `total_step - tfinal` on, the final mask is fixed and re-applied after every step.

The file holds the kept triplets only (E[k], A[k], B[:, k] for the k rows a module keeps) and
`rank_pattern` {"<module>.lora_E": [bool] * init_r}; a fresh, never-masked adapter is saved at
init_r rows with `rank_pattern` null.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft.adapter import Adapter
from jpeft.method import JobSpec, register
from jpeft.methods.lora import LoraConfig, LoraWeight
from jpeft.methods.low_rank import ANY, LowRankMethod
from jpeft.tree import path_str

A_KEY, E_KEY, B_KEY = "lora_A", "lora_E", "lora_B"
PIECES = (A_KEY, E_KEY, B_KEY)
# PEFT's AdaLoRA defaults when `target_modules` is None (it has none for mistral).
DEFAULT_TARGETS = {
    model_type: ("q_proj", "v_proj")
    for model_type in ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
}
# LoraConfig's `r` default: AdaLoRA ignores `r` and warns when it differs (`init_r` is the rank).
LORA_DEFAULT_R = 8

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AdaLoraConfig(LoraConfig):
    """PEFT's `AdaLoraConfig`: every LoraConfig field plus AdaLoRA's, same defaults and JSON.

    target_r: the final average rank; init_r: the rank every module starts at; tinit: warm-up
    steps without pruning; tfinal: final steps at fixed ranks; deltaT: steps between masks while
    the budget shrinks; beta1/beta2: EMA factors of importance and uncertainty; orth_reg_weight:
    weight of the orthogonality loss; total_step: the optimizer steps of the run (required);
    rank_pattern: the kept triplets {"<module>.lora_E": [bool] * init_r}, written when ranks are
    allocated (not LoRA's ranks by regex).
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (PEFT's field name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: Mapping[str, Sequence[bool]] | None = None

    def validate(self) -> None:
        """PEFT's AdaLoraConfig checks, and LoraConfig's except its int-valued `rank_pattern`."""
        name = "AdaLoraConfig"
        if self.use_dora:
            raise ValueError(f"{name}: AdaLoRA does not support DoRA; set use_dora=False")
        if self.loftq_config:
            raise ValueError(f"{name}: AdaLoRA does not support LoftQ; remove loftq_config")
        if self.init_r <= 0:
            raise ValueError(f"{name}.init_r must be a positive integer, got {self.init_r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"{name}.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"{name}.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform` as well.")
        if self.total_step is None or self.total_step <= 0:
            raise ValueError(
                f"{name}.total_step={self.total_step!r}: AdaLoRA needs the number of optimizer "
                "steps of the run (> 0) for its rank budget schedule"
            )
        if self.orth_reg_weight < 0:
            raise ValueError(f"{name}.orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"{name}: tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase "
                f"in total_step={self.total_step} steps (needs tinit < total_step - tfinal); "
                "decrease tinit/tfinal or increase total_step"
            )
        if self.r != LORA_DEFAULT_R:
            warnings.warn(
                f"{name}.r={self.r} is not used by AdaLoRA; the starting rank is init_r="
                f"{self.init_r}",
                stacklevel=4,
            )
        if self.use_rslora or self.alpha_pattern:
            warnings.warn(
                f"{name}: use_rslora and alpha_pattern have no effect on AdaLoRA (PEFT ignores "
                "them too); every module is scaled by lora_alpha / init_r",
                stacklevel=4,
            )

    def rank_for(self, module: str) -> int:
        """init_r: every module starts at it and is scaled by it."""
        return self.init_r

    def alpha_for(self, module: str) -> float:
        return self.lora_alpha

    def kept_rank(self, module: str) -> int:
        """The rows `module` keeps in a file: its `rank_pattern` True count, else init_r."""
        mask = (self.rank_pattern or {}).get(f"{module}.{E_KEY}")
        return self.init_r if mask is None else sum(mask)

    def rank_origin(self, module: str) -> str:
        """Where the rank a file holds for `module` comes from, for messages."""
        key = f"{module}.{E_KEY}"
        if key not in (self.rank_pattern or {}):
            return f"init_r={self.init_r}"
        return f"rank_pattern[{key!r}] (keeping {self.kept_rank(module)} triplets)"


# ---------------------------------------------------------------------------------------------
# the rank allocator


def triplet_scores(ipt: Mapping[str, Array], unc: Mapping[str, Array]) -> Array:
    """[k] importance of one module's triplets from its EMAs {piece: array} (PEFT's
    `_element_score` and `_combine_ipt`): with s = ipt * unc per entry,
    score[i] = s_E[i] + (mean over in of s_A[i, :] + mean over out of s_B[:, i])."""
    s = {piece: ipt[piece] * unc[piece] for piece in PIECES}
    return s[E_KEY][:, 0] + (jnp.mean(s[A_KEY], axis=1) + jnp.mean(s[B_KEY], axis=0))


def allocate(scores: Mapping[str, Array], budget: int | Array) -> dict[str, Array]:
    """{module: bool [k], True = kept} keeping `budget` triplets over all modules (PEFT's
    `mask_to_budget`): every triplet scoring <= the (n - budget)-th smallest of the n scores is
    dropped (ties at that value drop more); a budget >= n keeps all."""
    flat = jnp.concatenate([jnp.ravel(s) for s in scores.values()])
    drop = flat.size - budget
    threshold = jnp.sort(flat)[jnp.clip(drop - 1, 0, flat.size - 1)]
    threshold = jnp.where(drop > 0, threshold, -jnp.inf)
    return {module: s > threshold for module, s in scores.items()}


def budget_schedule(config: AdaLoraConfig, step: int, init_budget: int, target_budget: int):
    """(budget, whether to allocate a new mask) at 0-based `step`, as PEFT's
    `RankAllocator.budget_schedule` under `AdaLoraModel.update_and_allocate`: init_budget up to
    tinit; then a cubic decrease to target_budget, masking every deltaT steps; at
    total_step - tfinal the final mask (forced); after it, no new mask (the final one is kept)."""
    final = config.total_step - config.tfinal
    if step <= config.tinit:
        return init_budget, False
    if step >= final:
        return target_budget, step == final
    left = 1 - (step - config.tinit) / (final - config.tinit)
    budget = int((init_budget - target_budget) * (left**3) + target_budget)
    return budget, step % config.deltaT == 0


@functools.lru_cache(maxsize=16)
def _schedule_tables(config: AdaLoraConfig, init_budget: int, target_budget: int):
    """`budget_schedule` for steps 0 .. final + 1 (the last entry stands for every later step) as
    int32 and bool arrays: computed here in float64 as PEFT does, indexed by the step in the
    jitted update."""
    final = config.total_step - config.tfinal
    rows = [budget_schedule(config, s, init_budget, target_budget) for s in range(final + 2)]
    budgets, fresh = zip(*rows, strict=True)
    return np.asarray(budgets, np.int32), np.asarray(fresh, bool)


class AdaLoraState(NamedTuple):
    """The optimizer state of `wrap_optimizer`: the inner optimizer's plus the rank allocator's.

    count: int32 [], steps finished (PEFT's `global_step` of the next update); ipt / unc:
    Adapter-shaped trees, float32 EMAs of the importance |p * grad| and of its uncertainty at
    each lora_A/E/B (None at other leaves); keep: Adapter-shaped, bool [k, 1] at each lora_E,
    the last mask applied (None elsewhere); masked: bool [], whether a mask was applied.
    """

    inner: Any
    count: Array
    ipt: Any
    unc: Any
    keep: Any
    masked: Array


def _per_piece(params: Any, make, pieces: tuple[str, ...] = PIECES) -> Any:
    """A tree shaped like `params` (an Adapter) with `make(leaf)` at the AdaLoRA pieces named in
    `pieces` and None elsewhere (optax's params placeholder maps to itself)."""

    def leaf(path, value):
        where = path_str(path)
        ours = where.startswith("weights.") and where.endswith(tuple(f".{p}" for p in pieces))
        return make(value) if ours else None

    return jax.tree_util.tree_map_with_path(leaf, params)


def rank_allocator(
    config: AdaLoraConfig, optimizer: optax.GradientTransformation
) -> optax.GradientTransformation:
    """`optimizer`, then PEFT's `update_and_allocate(global_step)` on the updated params with
    the same gradients, global_step the 0-based index of the step just taken (PEFT's example
    loop and its Trainer callbacks pass the count of steps finished before it).

    The result is given as updates (new params - params), so masked E entries become exactly 0.
    The gradients are those the step computed (orthogonality loss included); clipping inside
    `optimizer` is not seen, while PEFT with a clipping Trainer reads clipped gradients.
    """
    final = config.total_step - config.tfinal
    beta1, beta2 = config.beta1, config.beta2

    def init(params):
        return AdaLoraState(
            inner=optimizer.init(params),
            count=jnp.zeros((), jnp.int32),
            ipt=_per_piece(params, lambda p: jnp.zeros(p.shape, jnp.float32)),
            unc=_per_piece(params, lambda p: jnp.zeros(p.shape, jnp.float32)),
            keep=_per_piece(params, lambda p: jnp.ones(p.shape, bool), (E_KEY,)),
            masked=jnp.zeros((), bool),
        )

    def update(grads, state: AdaLoraState, params=None):
        if params is None:
            raise ValueError("AdaLoRA's rank allocator needs the params: update(grads, state, p)")
        updates, inner = optimizer.update(grads, state.inner, params)
        new = optax.apply_updates(params, updates)
        step = state.count
        learning = step < final  # PEFT updates the importance before the final mask only
        ipt, unc, scores = {}, {}, {}
        for module, pieces in new.weights.items():
            ipt[module], unc[module] = {}, {}
            for piece in PIECES:
                grad = grads.weights[module][piece].astype(jnp.float32)
                now = jnp.abs(pieces[piece].astype(jnp.float32) * grad)
                old_ipt = state.ipt.weights[module][piece]
                old_unc = state.unc.weights[module][piece]
                ema = beta1 * old_ipt + (1 - beta1) * now
                spread = beta2 * old_unc + (1 - beta2) * jnp.abs(now - ema)
                ipt[module][piece] = jnp.where(learning, ema, old_ipt)
                unc[module][piece] = jnp.where(learning, spread, old_unc)
            scores[module] = triplet_scores(ipt[module], unc[module])
        init_budget = sum(int(s.shape[0]) for s in scores.values())
        budgets, fresh = _schedule_tables(config, init_budget, config.target_r * len(scores))
        index = jnp.minimum(step, final + 1)
        allocating = jnp.asarray(fresh)[index]
        chosen = allocate(scores, jnp.asarray(budgets)[index])
        enforce = allocating | (step > final)
        out_updates, keep = dict(updates.weights), {}
        for module in scores:
            kept = jnp.where(allocating, chosen[module][:, None], state.keep.weights[module][E_KEY])
            keep[module] = {**state.keep.weights[module], E_KEY: kept}
            # masked rows: update = -E, so that E + update is exactly 0
            e_update = updates.weights[module][E_KEY]
            zeroed = -params.weights[module][E_KEY].astype(e_update.dtype)
            e_update = jnp.where(enforce & ~kept, zeroed, e_update)
            out_updates[module] = {**updates.weights[module], E_KEY: e_update}
        # PEFT resets the importance after the final mask (and never updates it again).
        reset = step == final
        ipt = {m: {p: jnp.where(reset, 0.0, v) for p, v in d.items()} for m, d in ipt.items()}
        unc = {m: {p: jnp.where(reset, 0.0, v) for p, v in d.items()} for m, d in unc.items()}
        return updates.replace(weights=out_updates), AdaLoraState(
            inner=inner,
            count=step + 1,
            ipt=state.ipt.replace(weights=ipt),
            unc=state.unc.replace(weights=unc),
            keep=state.keep.replace(weights=keep),
            masked=state.masked | allocating,
        )

    return optax.GradientTransformation(init, update)


def _is_state(x: Any) -> bool:
    return isinstance(x, AdaLoraState)


def _local(x: Any) -> np.ndarray:
    """A replicated (or host) array's value, readable on every process."""
    return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)


# ---------------------------------------------------------------------------------------------
# the method


def prune(adapter: Adapter) -> Adapter:
    """The adapter at the ranks `rank_pattern` keeps: E[keep], A[keep], B[:, keep] per module
    (PEFT's `resize_state_dict_by_rank_pattern`); a module already at that rank stays as it is."""
    pattern = adapter.config.rank_pattern or {}
    weights = {}
    for module, pieces in adapter.weights.items():
        mask = pattern.get(f"{module}.{E_KEY}")
        rows = np.shape(pieces[A_KEY])[0]
        if mask is None or rows == sum(mask):
            weights[module] = pieces
            continue
        if rows != len(mask):
            raise ValueError(
                f"{module}: rank_pattern['{module}.{E_KEY}'] has {len(mask)} entries, but the "
                f"module has {rows} triplets; the pattern must come from training this adapter"
            )
        keep = np.asarray(mask)
        weights[module] = {
            A_KEY: np.asarray(pieces[A_KEY])[keep],
            E_KEY: np.asarray(pieces[E_KEY])[keep],
            B_KEY: np.asarray(pieces[B_KEY])[:, keep],
        }
    return adapter.replace(weights=weights)


@register
class AdaLora(LowRankMethod):
    """AdaLoRA (SVD-form LoRA with importance-based rank pruning) on linear layers."""

    peft_type = "ADALORA"
    name = "adalora"
    config_class = AdaLoraConfig
    # PEFT's AdaLoRA example uses 1e-3 for long runs; in the job's 80 steps that left the main
    # job at 0.667 accuracy (LoRA: 0.933): A and B start at N(0, 0.02) and E at 0, and Adam moves
    # each by about lr per step, so the triplets' product grows far slower than LoRA's B A.
    default_lr = 5e-3
    job_help = "AdaLoRA, rank --r pruned by importance to 2/3 of it, all-linear on the top layers"
    default_targets = DEFAULT_TARGETS
    piece_names = PIECES
    # A [k, in], E [k, 1], B [out, k]
    piece_axes = {A_KEY: (None, 1), E_KEY: (None, None), B_KEY: (0, None)}

    def init_module(self, config: AdaLoraConfig, ref, weight, key):
        """PEFT's init: A, B ~ N(0, 0.02) and E = 0; with init_lora_weights=False all three stay
        at torch.randn's N(0, 1)."""
        out_dim, in_dim = weight.shape
        rank = config.init_r
        key_a, key_e, key_b = jax.random.split(key, 3)
        a = jax.random.normal(key_a, (rank, in_dim), jnp.float32)
        e = jax.random.normal(key_e, (rank, 1), jnp.float32)
        b = jax.random.normal(key_b, (out_dim, rank), jnp.float32)
        if config.init_lora_weights:
            a, e, b = 0.02 * a, jnp.zeros_like(e), 0.02 * b
        return {A_KEY: a, E_KEY: e, B_KEY: b}, {}

    def module_constants(self, config: AdaLoraConfig, module: str, pieces):
        """s = alpha / (init_r + 1e-5); alpha <= 0 means the module's rank, its rows now (PEFT
        sets it from the rank it builds the module at, the pruned one after loading)."""
        rows = np.shape(pieces[A_KEY])[0]
        alpha = config.lora_alpha if config.lora_alpha > 0 else float(rows)
        return {"scaling": alpha / (config.init_r + 1e-5)}

    def expected_shapes(self, config, module: str, base_shape, pieces):
        out_dim, in_dim = base_shape
        return {A_KEY: (ANY, in_dim), E_KEY: (ANY, 1), B_KEY: (out_dim, ANY)}

    def file_shapes(self, config: AdaLoraConfig, module: str, pieces):
        """The kept triplets: A [k, in], E [k, 1], B [out, k], k = `kept_rank`."""
        rank = config.kept_rank(module)
        return {A_KEY: (rank, ANY), E_KEY: (rank, 1), B_KEY: (ANY, rank)}

    def check_shapes(self, config, module: str, base_shape, pieces) -> None:
        super().check_shapes(config, module, base_shape, pieces)
        ranks = {
            A_KEY: np.shape(pieces[A_KEY])[0],
            E_KEY: np.shape(pieces[E_KEY])[0],
            B_KEY: np.shape(pieces[B_KEY])[1],
        }
        if len(set(ranks.values())) != 1:
            raise ValueError(f"{module}: lora_A, lora_E and lora_B disagree on the rank: {ranks}")

    def make_node(self, base, pieces, frozen, constants, active, dropout_key, config):
        """LoRA's node with A' = A * E (E [..., k, 1] scales A's rows)."""
        use_dropout = config.lora_dropout > 0 and dropout_key is not None
        return LoraWeight(
            base=base,
            lora_A=pieces[A_KEY] * pieces[E_KEY],
            lora_B=pieces[B_KEY],
            scaling=constants.get("scaling", jnp.float32(0.0)),
            dropout_key=dropout_key if use_dropout else None,
            dropout_rate=config.lora_dropout if use_dropout else 0.0,
        )

    def regularizer(self, adapter: Adapter) -> Array | None:
        """orth_reg_weight * mean over every lora_A and lora_B of ||C - I||_F, C = A A^T or
        B^T B [k, k] (PEFT's `AdaLoraModel.forward`). PEFT adds it only when the wrapped model
        computes the loss itself (labels passed); jpeft's train step always adds it."""
        weight = adapter.config.orth_reg_weight
        if weight == 0:
            return None
        norms = []
        for pieces in adapter.weights.values():
            a = pieces[A_KEY].astype(jnp.float32)
            b = pieces[B_KEY].astype(jnp.float32)
            for gram in (a @ a.T, b.T @ b):
                norms.append(jnp.linalg.norm(gram - jnp.eye(gram.shape[0], dtype=gram.dtype)))
        return weight * jnp.mean(jnp.stack(norms))

    def wrap_optimizer(self, config: AdaLoraConfig, optimizer):
        """`optimizer` followed by PEFT's rank allocator (see `rank_allocator`)."""
        for field in ("beta1", "beta2"):
            value = getattr(config, field)
            if not 0 < value < 1:
                raise ValueError(f"AdaLoraConfig.{field} must be in (0, 1) to train, got {value}")
        return rank_allocator(config, optimizer)

    def finish_training(self, adapter: Adapter, opt_state) -> Adapter:
        """`adapter` with `rank_pattern` set to the last mask the allocator applied (as PEFT
        sets its config at every mask), or unchanged when no mask was applied yet."""
        leaves = jax.tree.leaves(opt_state, is_leaf=_is_state)
        state = next((leaf for leaf in leaves if _is_state(leaf)), None)
        if state is None:
            raise ValueError(
                "opt_state holds no AdaLoRA rank allocator state; create it with "
                "jpeft.train.init_opt_state(optimizer, trainable)"
            )
        if not bool(_local(state.masked)):
            return adapter
        pattern = {
            f"{module}.{E_KEY}": [bool(kept) for kept in _local(pieces[E_KEY])[:, 0]]
            for module, pieces in state.keep.weights.items()
        }
        return adapter.replace(config=adapter.config.replace(rank_pattern=pattern))

    def to_file(self, adapter: Adapter):
        """The kept triplets only (`prune`), as PEFT saves them."""
        return super().to_file(prune(adapter))

    def job_fields(self, job: JobSpec) -> dict[str, Any]:
        """init_r = --r, pruned to an average of target_r = 2/3 of it (PEFT's defaults prune 12
        to 8). The first 10% of the steps train at full rank (tinit, so the importance EMAs
        settle), the budget then shrinks on PEFT's cubic schedule, and the last 30% train at the
        final ranks. tfinal is at least 1 (for runs of 2+ steps): the final mask is applied at
        0-based step total_step - tfinal, which PEFT's default tfinal=0 puts after the run."""
        tinit = job.steps // 10
        tfinal = min(max(1, job.steps * 3 // 10), job.steps - tinit - 1)
        return dict(
            r=LORA_DEFAULT_R,
            init_r=job.r,
            target_r=max(1, job.r * 2 // 3),
            tinit=tinit,
            tfinal=tfinal,
            total_step=job.steps,
            lora_dropout=job.lora_dropout,
        )
