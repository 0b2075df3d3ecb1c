"""PEFT on Flax models jpeft did not write: `jpeft.flax.linen` and `jpeft.flax.nnx`."""

from jpeft.flax import linen, nnx
from jpeft.flax.hf_names import rename

__all__ = ["linen", "nnx", "rename"]
