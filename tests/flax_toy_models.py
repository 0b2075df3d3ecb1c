"""Two small Flax models jpeft did not write (one linen, one NNX, the same shape): an embedding,
a convolution, two scanned blocks (a DenseGeneral query, an Einsum output, a LayerNorm, a Dense
MLP) and a Dense head; for the `jpeft.flax` tests."""

from __future__ import annotations

import flax.linen as nn
import jax
from flax import nnx

VOCAB, DIM, HEADS, HEAD_DIM, HIDDEN, LAYERS = 32, 16, 2, 8, 32, 2


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        q = nn.DenseGeneral((HEADS, HEAD_DIM), name="q")(x)
        h = nn.Einsum((HEADS, HEAD_DIM, DIM), "btnh,nhd->btd", name="o")(jax.nn.gelu(q))
        x = nn.LayerNorm(name="norm")(x + h)
        return x + nn.Dense(DIM, name="down")(jax.nn.gelu(nn.Dense(HIDDEN, name="up")(x))), None


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, DIM, name="embed")(ids)
        x = x + nn.Conv(DIM, (3,), padding="SAME", name="conv")(x)
        blocks = nn.scan(
            LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS
        )
        x, _ = blocks(name="layers")(x, None)
        return nn.Dense(VOCAB, name="lm_head")(x)


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q = nnx.LinearGeneral(DIM, (HEADS, HEAD_DIM), rngs=rngs)
        self.o = nnx.Einsum("btnh,nhd->btd", (HEADS, HEAD_DIM, DIM), (DIM,), rngs=rngs)
        self.norm = nnx.LayerNorm(DIM, rngs=rngs)
        self.up = nnx.Linear(DIM, HIDDEN, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, DIM, rngs=rngs)

    def __call__(self, x):
        x = self.norm(x + self.o(jax.nn.gelu(self.q(x))))
        return x + self.down(jax.nn.gelu(self.up(x)))


class NnxModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.conv = nnx.Conv(DIM, DIM, (3,), padding="SAME", rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return NnxBlock(rngs)

        self.layers = blocks(rngs)
        self.lm_head = nnx.Linear(DIM, VOCAB, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + self.conv(x)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return block(x)

        return self.lm_head(run(x, self.layers))
