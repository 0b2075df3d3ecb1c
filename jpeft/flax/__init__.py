"""PEFT on Flax models jpeft did not write: `jpeft.flax.linen` and `jpeft.flax.nnx`."""

from jpeft.flax import linen, nnx

__all__ = ["linen", "nnx"]
