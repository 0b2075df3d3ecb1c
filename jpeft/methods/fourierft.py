"""FourierFT (learnable entries of a weight update's 2-D spectrum), with PEFT's semantics and file
format.

Math (Gao et al. 2024, https://arxiv.org/abs/2405.03003, as PEFT implements it), per targeted
linear `W` [out, in] with `n = n_frequency` trainable coefficients `spectrum` [n]:

    dense[rows, cols] = spectrum          (zeros elsewhere; [out, in])
    dW = Re(ifft2(dense)) * scaling       (ifft2 with its 1 / (out * in), in float32)
    y  = x W^T + b + x dW^T

The positions (rows, cols) are not saved: PEFT draws them as
`torch.randperm(out * in, generator=torch.Generator().manual_seed(random_loc_seed))[:n]`
(`rows = perm // in`, `cols = perm % in`). `torch_random.randperm_prefix` reproduces torch's
CPU randperm bit for bit (mt19937 seeded by `init_genrand`, forward Fisher-Yates with
`random() % (N - i)`); torch switches to another algorithm (64-bit draws, "inside-out" shuffle)
for N >= (2**32 - 1) // 20, so layers that large are refused rather than given other positions.

PEFT forms dW with one ifft2 per call; so does jpeft, and the node runs `x (W + dW)^T` as one
float32 matmul like LoHa's. The exact alternative, dW = (C_out S C_in^T - S_out S S_in^T) / (out in)
with the n cos/sin columns of the chosen frequencies, is two rank-n matmuls: on a 576x576 layer
with n=1000 it took 24 ms on CPU against the ifft2's 2.5 ms (~2 out in n flops against
~5 out in log2(out in)), and applying it to x directly costs ~4 n (in + out) flops per token.
Positions depend only on the static shapes and the seed, so they are computed once per
(out, in, seed, n) in numpy and cached.
A layer of the stack whose `n_frequency_pattern` gives it fewer coefficients holds them
zero-padded: torch's positions for n are the first n of those for any larger n, so the padding
lands on positions that add nothing.

PEFT's default init is `randn` (the adapter changes the model at init); `init_weights=True` gives
zeros. `jpeft finetune` uses zeros, so a job starts from the base model (the spectrum still gets
a gradient at zero: dW is linear in it). Linear layers only; 4-bit bases are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.config import FrozenMap
from jpeft.method import JobOptionError, JobSpec, Pieces, register
from jpeft.methods import torch_random
from jpeft.methods.low_rank import (
    LINEAR_NAMES,
    LowRankConfig,
    LowRankMethod,
    check_bias,
    check_pattern_keys,
    check_regex_targets,
)
from jpeft.methods.lycoris import LycorisNode
from jpeft.quant import QuantizedTensor

SPECTRUM = "fourierft_spectrum"
# The job's n_frequency per unit of `--r`: the job's default r=16 gives 1024, PEFT's 1000 scale.
JOB_FREQUENCIES_PER_RANK = 64


@dataclasses.dataclass(frozen=True)
class FourierFTConfig(LowRankConfig):
    """PEFT's `FourierFTConfig`: same field names, defaults and JSON. FourierFT has no rank or
    alpha: `n_frequency` (per module: `n_frequency_pattern`) counts the trainable coefficients."""

    ALPHA_FIELD: ClassVar[str | None] = None
    rank_pattern: ClassVar[Mapping[str, int]] = FrozenMap()
    alpha_pattern: ClassVar[Mapping[str, float]] = FrozenMap()

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int | None = 777
    fan_in_fan_out: bool = False
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    bias: str = "none"
    modules_to_save: Sequence[str] | None = None
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    n_frequency_pattern: Mapping[str, int] | None = dataclasses.field(default_factory=dict)
    init_weights: bool = False

    def validate(self) -> None:
        if self.n_frequency <= 0:
            raise ValueError(
                f"FourierFTConfig.n_frequency must be a positive integer, got {self.n_frequency!r}"
            )
        for key, count in (self.n_frequency_pattern or {}).items():
            if count <= 0:
                raise ValueError(
                    f"FourierFTConfig.n_frequency_pattern[{key!r}] must be > 0, got {count!r}"
                )
        check_pattern_keys("FourierFTConfig", "n_frequency_pattern", self.n_frequency_pattern)
        seed = self.random_loc_seed
        if seed is None or not -(2**63) <= seed < 2**64:
            raise ValueError(
                f"FourierFTConfig.random_loc_seed must be an integer in [-2**63, 2**64) (a torch "
                f"generator seed, which places the frequencies), got {seed!r}"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform` as well.")
        check_regex_targets(self)
        check_bias(self, "fourier_only")

    def n_frequency_key(self, module: str) -> str | None:
        """The `n_frequency_pattern` key PEFT uses for `module`: the first key matching
        `.*\\.{key}$`, else the module's full name if it is a key, else None."""
        patterns = self.n_frequency_pattern or {}
        key = next((k for k in patterns if re.match(rf".*\.{k}$", module)), module)
        return key if key in patterns else None

    def rank_for(self, module: str) -> int:
        """`module`'s n_frequency (PEFT's `n_frequency_pattern` lookup)."""
        key = self.n_frequency_key(module)
        return self.n_frequency if key is None else self.n_frequency_pattern[key]

    def rank_origin(self, module: str) -> str:
        key = self.n_frequency_key(module)
        if key is None:
            return f"n_frequency={self.n_frequency}"
        return f"n_frequency_pattern[{key!r}]={self.n_frequency_pattern[key]}"


@functools.lru_cache(maxsize=64)
def frequency_positions(
    out_dim: int, in_dim: int, seed: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) [count] of PEFT's spectral entries for a weight [out_dim, in_dim]."""
    perm = torch_random.randperm_prefix(out_dim * in_dim, seed, count)
    return perm // in_dim, perm % in_dim


def check_layer(config: FourierFTConfig, module: str, base_shape: tuple[int, ...]) -> None:
    """ValueError naming the module when its n_frequency does not fit its weight [out, in] (as
    PEFT's) or the weight is too large for jpeft to place PEFT's frequencies."""
    out_dim, in_dim = base_shape
    count, size = config.rank_for(module), out_dim * in_dim
    if count > size:
        raise ValueError(
            f"{module}: {config.rank_origin(module)} exceeds the {size} entries of its weight "
            f"of shape {tuple(base_shape)}; lower it (n_frequency_pattern sets it per module)"
        )
    if size >= torch_random.RANDPERM_32BIT_LIMIT:
        raise ValueError(
            f"{module}: its weight of shape {tuple(base_shape)} has {size} >= "
            f"{torch_random.RANDPERM_32BIT_LIMIT} entries, for which torch's randperm (PEFT's "
            "frequency positions) uses an algorithm jpeft does not reproduce; leave this module out"
        )


def refuse_quantized(weight: Any, module: str) -> None:
    """ValueError when `weight` is a 4-bit quantized base (jpeft's FourierFT does not run one)."""
    if isinstance(weight, QuantizedTensor):
        raise ValueError(
            f"FourierFT cannot adapt {module}: it is a 4-bit quantized weight, which jpeft's "
            "FourierFT does not support; load the base unquantized, or use LoRA (QLoRA)"
        )


@dataclasses.dataclass(frozen=True)
class FourierFTWeight(LycorisNode):
    """A linear weight with FourierFT; leaves may carry a leading stacked-layer axis [L].

    base [out, in]; spectrum [n] (zero-padded to the stack's largest n, zeros on layers the
    adapter does not cover); scaling [] (0 on uncovered layers); seed: random_loc_seed. FourierFT
    has no dropout: the LyCORIS dropout fields stay off.
    """

    base: jax.Array
    spectrum: jax.Array
    scaling: jax.Array
    seed: int = 777
    dropout_key: jax.Array | None = None
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    renormalise: bool = True

    def delta(self) -> jax.Array:
        out_dim, in_dim = self.base.shape[-2:]
        rows, cols = frequency_positions(out_dim, in_dim, self.seed, self.spectrum.shape[-1])
        lead = self.spectrum.shape[:-1]
        dense = jnp.zeros((*lead, out_dim, in_dim), jnp.float32)
        dense = dense.at[..., rows, cols].set(self.spectrum.astype(jnp.float32))
        scaling = jnp.asarray(self.scaling, jnp.float32)[..., None, None]
        return jnp.fft.ifft2(dense).real * scaling


jax.tree_util.register_dataclass(
    FourierFTWeight,
    data_fields=["base", "spectrum", "scaling", "dropout_key"],
    meta_fields=["seed", "rank_dropout", "module_dropout", "renormalise"],
)


@register
class FourierFT(LowRankMethod):
    """FourierFT on linear layers."""

    peft_type = "FOURIERFT"
    name = "fourierft"
    config_class = FourierFTConfig
    # PEFT's MetaMathQA run of FourierFT at the benchmark's lr 1e-4 learnt nothing (0% test
    # accuracy). An Adam step moves each coefficient by ~lr, so dW moves by
    # ~lr * scaling * sqrt(n / (2 out in)) in Frobenius norm: ~6 lr at 576x576, n=1024,
    # scaling 150, where LoRA's (r=16, alpha/r=2) moves by ~0.2 lr per entry, ~110 lr in
    # norm: ~20x less. 3e-2 gives LoRA's 2e-3 update size (the paper trains the spectrum at
    # lrs of this order).
    default_lr = 3e-2
    job_help = (
        f"FourierFT, n_frequency={JOB_FREQUENCIES_PER_RANK}*--r, zero init, all-linear on top"
    )
    piece_names = (SPECTRUM,)
    bias_only_value = "fourier_only"

    def init_module(self, config: FourierFTConfig, ref, weight, key) -> tuple[Pieces, Pieces]:
        """PEFT's init: a standard normal spectrum, or zeros with init_weights=True."""
        refuse_quantized(weight, ref.name)
        check_layer(config, ref.name, tuple(ref.shape))
        shape = (config.rank_for(ref.name),)
        if config.init_weights:
            return {SPECTRUM: jnp.zeros(shape, jnp.float32)}, {}
        return {SPECTRUM: jax.random.normal(key, shape, jnp.float32)}, {}

    def expected_shapes(self, config: FourierFTConfig, module: str, base_shape, pieces):
        return {SPECTRUM: (config.rank_for(module),)}

    def check_shapes(self, config: FourierFTConfig, module: str, base_shape, pieces) -> None:
        check_layer(config, module, tuple(base_shape))
        super().check_shapes(config, module, base_shape, pieces)

    def module_constants(self, config: FourierFTConfig, module: str, pieces: Pieces) -> dict:
        return {"scaling": config.scaling}

    def make_node(self, base, pieces, frozen, constants, active, dropout_key, config):
        refuse_quantized(base, f"a weight of shape {tuple(base.shape)}")
        return FourierFTWeight(
            base=base,
            spectrum=pieces[SPECTRUM],
            scaling=constants.get("scaling", jnp.float32(0.0)),
            seed=config.random_loc_seed,
        )

    def job_config(self, job: JobSpec) -> FourierFTConfig:
        """n_frequency = JOB_FREQUENCIES_PER_RANK * `--r`, zero init (the job starts from the base
        model), all-linear (or `--target-modules`) on the job's top layers."""
        targets = job.target_modules or "all-linear"
        if job.train_layers and targets == "all-linear":
            targets = list(LINEAR_NAMES)
        if isinstance(targets, str) and targets != "all-linear" and job.train_layers:
            raise JobOptionError(
                f"--method {self.name} with a regex --target-modules trains the layers the regex "
                "names; add --train-layers 0 (PEFT's layers_to_transform needs a list of names)"
            )
        return FourierFTConfig(
            n_frequency=JOB_FREQUENCIES_PER_RANK * job.r,
            target_modules=targets,
            layers_to_transform=job.train_layers,
            init_weights=True,
            **job.common,
        )
