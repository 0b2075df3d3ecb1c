"""A Flax layer's kernel as PEFT's [out, in] weight, and its call with an adapted weight.

Every linear-like Flax layer is an einsum of its input with its kernel: `Dense` is `...i,io->...o`,
`DenseGeneral` / `LinearGeneral` contract a few input axes with the kernel's leading axes, `Einsum`
spells its equation out. A `Projection` holds that equation for one layer; from it follow

- the kernel's *view*: the kernel's produced axes flattened to `out`, its contracted axes to `in`,
  giving the [out, in] weight every jpeft method (and PEFT's file format) is written for;
- the call: the input's contracted axes moved last and flattened, `jpeft.ops.linear` on the view
  (so a method's node runs its own op, and a 4-bit view its quantized matmul), the output
  reshaped and permuted to the layer's own output axes.

Embedding tables are already [vocab, dim]; convolutions are viewed as PEFT views a `Conv2d`
weight, [out, in * window] (channels first, then the window), and run with the adapted kernel.
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax
import jax.numpy as jnp

from jpeft import ops

Array = jax.Array

# The kinds of layer jpeft adapts, as `jpeft.tree.ModuleRef.kind` names them.
LINEAR, EMBEDDING, CONV = "linear", "embedding", "conv"


class UnsupportedLayer(ValueError):
    """A layer whose kernel is not a plain projection of its input (and cannot be adapted)."""


@dataclasses.dataclass(frozen=True)
class Projection:
    """One layer's einsum `x_labels,kernel_labels->out_labels` (no ellipsis in the kernel).

    bias_labels: the bias's axes, in its own order ('' when the layer has no bias).
    The kernel's labels are each either contracted (in `x_labels`, not in `out_labels`) or produced
    (in `out_labels`, not in `x_labels`); `contracted` and `produced` list them in kernel order.
    """

    x_labels: str
    kernel_labels: str
    out_labels: str
    bias_labels: str = ""

    @property
    def contracted(self) -> str:
        return "".join(c for c in self.kernel_labels if c in self.x_labels)

    @property
    def produced(self) -> str:
        return "".join(c for c in self.kernel_labels if c in self.out_labels)

    def check(self, where: str) -> None:
        """UnsupportedLayer naming `where` when the equation is not a projection of its input."""
        batch = [c for c in self.kernel_labels if c in self.x_labels and c in self.out_labels]
        summed = [c for c in self.kernel_labels if c not in self.x_labels + self.out_labels]
        dropped = [c for c in self.x_labels if c not in self.kernel_labels + self.out_labels]
        equation = f"{self.x_labels},{self.kernel_labels}->{self.out_labels}"
        problem = None
        if batch:
            problem = f"kernel axes {batch} are batch axes (in the input and the output)"
        elif summed or dropped:
            problem = f"axes {summed + dropped} are summed away by one operand alone"
        elif not self.contracted or not self.produced:
            problem = "the kernel needs at least one contracted and one produced axis"
        if problem:
            raise UnsupportedLayer(
                f"{where}: cannot adapt the einsum {equation!r}: {problem}, so its kernel is not "
                "one [out, in] weight; exclude the layer (exclude_modules) or write it as a "
                "projection of its input"
            )

    # -- the kernel's [out, in] view ----------------------------------------------------------

    def _order(self) -> list[int]:
        return [self.kernel_labels.index(c) for c in self.produced + self.contracted]

    def view(self, kernel: Array) -> Array:
        """`kernel` [*lead, *kernel axes] -> [*lead, out, in] (`lead`: stacked layer axes)."""
        lead = kernel.ndim - len(self.kernel_labels)
        shape = kernel.shape[lead:]
        out = math.prod(shape[self.kernel_labels.index(c)] for c in self.produced)
        moved = jnp.transpose(kernel, [*range(lead), *(lead + i for i in self._order())])
        return moved.reshape(*kernel.shape[:lead], out, -1)

    def kernel_from_view(self, view: Array, kernel_shape: tuple[int, ...]) -> Array:
        """The inverse of `view`: [*lead, out, in] -> [*lead, *kernel_shape]."""
        lead = view.ndim - 2
        order = self._order()
        moved = view.reshape(*view.shape[:lead], *(kernel_shape[i] for i in order))
        inverse = [order.index(i) for i in range(len(order))]
        return jnp.transpose(moved, [*range(lead), *(lead + i for i in inverse)])

    def flat_bias(self, bias: Array | None) -> Array | None:
        """The bias over `produced` in kernel order, flattened to [out]."""
        if bias is None:
            return None
        order = [self.bias_labels.index(c) for c in self.produced]
        return jnp.transpose(bias, order).reshape(-1)

    def bias_from_flat(self, flat: Array, bias_shape: tuple[int, ...]) -> Array:
        """The inverse of `flat_bias`."""
        sizes = {c: bias_shape[i] for i, c in enumerate(self.bias_labels)}
        shaped = flat.reshape([sizes[c] for c in self.produced])
        return jnp.transpose(shaped, [self.produced.index(c) for c in self.bias_labels])

    # -- the call --------------------------------------------------------------------------------

    def apply(self, x: Array, weight, bias: Array | None, kernel_shape: tuple[int, ...]) -> Array:
        """The layer's output for input `x`, with `weight` its [out, in] view (an array, a
        4-bit weight or a method's node; `ops.linear` runs it) and `bias` the layer's own."""
        kept = "".join(c for c in self.x_labels if c not in self.contracted)
        xt = jnp.transpose(x, [self.x_labels.index(c) for c in kept + self.contracted])
        flat = xt.reshape(*xt.shape[: len(kept)], -1)
        y = ops.linear(flat, weight, self.flat_bias(bias))
        sizes = {c: kernel_shape[i] for i, c in enumerate(self.kernel_labels)}
        y = y.reshape(*xt.shape[: len(kept)], *(sizes[c] for c in self.produced))
        labels = kept + self.produced
        return jnp.transpose(y, [labels.index(c) for c in self.out_labels])


@jax.tree_util.register_pytree_node_class
class KernelView(ops.WeightView):
    """One layer's kernel, as stored, seen as its [out, in] view (`Projection.view`): products
    contract the kernel's own axes, so no transposed copy exists (under `nn.scan`, the backward
    then reads the kernel slice itself instead of keeping a copy per layer)."""

    def __init__(self, kernel: Array, projection: Projection):
        self.kernel = kernel
        self.projection = projection

    def tree_flatten(self):
        return (self.kernel,), self.projection

    @classmethod
    def tree_unflatten(cls, projection, children):
        return cls(children[0], projection)

    def _sizes(self, labels: str) -> list[int]:
        own = self.projection.kernel_labels
        return [self.kernel.shape[own.index(c)] for c in labels]

    @property
    def shape(self) -> tuple[int, int]:
        produced, contracted = self.projection.produced, self.projection.contracted
        return math.prod(self._sizes(produced)), math.prod(self._sizes(contracted))

    @property
    def dtype(self):
        return self.kernel.dtype

    def _contract(self, x: Array, labels: str) -> Array:
        own = self.projection.kernel_labels
        shaped = x.reshape(*x.shape[:-1], *self._sizes(labels))
        lead = x.ndim - 1
        dims = (tuple(range(lead, shaped.ndim)), tuple(own.index(c) for c in labels))
        y = jax.lax.dot_general(shaped, self.kernel.astype(x.dtype), (dims, ((), ())))
        return y.reshape(*x.shape[:-1], -1)

    def dense(self, x: Array) -> Array:
        return self._contract(x, self.projection.contracted)

    def dense_transposed(self, g: Array) -> Array:
        return self._contract(g, self.projection.produced)

    def astype(self, dtype) -> Array:
        return self.projection.view(self.kernel).astype(dtype)


def _letters(count: int, avoid: str = "") -> str:
    free = [c for c in string.ascii_letters if c not in avoid]
    return "".join(free[:count])


def dense(x_ndim: int) -> Projection:
    """`Dense` / `nnx.Linear`: kernel [in, out] on the input's last axis."""
    batch = _letters(x_ndim - 1, "io")
    return Projection(batch + "i", "io", batch + "o", "o")


def dense_general(x_ndim: int, axis: tuple[int, ...], num_features: int) -> Projection:
    """`DenseGeneral` / `nnx.LinearGeneral`: kernel [*in at `axis`, *features]."""
    axis = tuple(a % x_ndim for a in axis)
    labels = _letters(x_ndim + num_features)
    x_labels = labels[:x_ndim]
    features = labels[x_ndim:]
    contracted = "".join(x_labels[a] for a in axis)
    kept = "".join(c for c in x_labels if c not in contracted)
    return Projection(x_labels, contracted + features, kept + features, features)


def einsum(equation: str, x_ndim: int, kernel_ndim: int) -> Projection:
    """`Einsum` (linen and nnx): the layer's own equation, its bias over the output axes the
    kernel gives, in output order (as Flax's `_get_bias_shape`)."""
    equation = equation.replace(" ", "")
    inputs, out = equation.split("->")
    x_labels, kernel_labels = inputs.split(",")
    if "..." in kernel_labels:
        raise UnsupportedLayer(f"einsum {equation!r}: an ellipsis in the kernel's axes")
    if "..." in x_labels:
        fill = _letters(x_ndim - len(x_labels.replace("...", "")), x_labels + kernel_labels + out)
        x_labels, out = x_labels.replace("...", fill), out.replace("...", fill)
    bias = "".join(c for c in out if c in kernel_labels)
    return Projection(x_labels, kernel_labels, out, bias)


# ---------------------------------------------------------------------------------------------
# convolutions: PEFT's Conv view, [out, in * window] with the window last


def conv_view(kernel: Array, spatial: int) -> Array:
    """Flax's conv kernel [*lead, *window, in, out] (`spatial` window axes) -> [*lead, out,
    in * prod(window)] (PEFT's `Conv2d` weight [out, in, kh, kw] flattened)."""
    lead = kernel.ndim - spatial - 2
    order = [lead + spatial + 1, lead + spatial, *range(lead, lead + spatial)]
    moved = jnp.transpose(kernel, [*range(lead), *order])
    return moved.reshape(*kernel.shape[:lead], kernel.shape[-1], -1)


def conv_kernel_from_view(view: Array, kernel_shape: tuple[int, ...]) -> Array:
    """The inverse of `conv_view` for a per-layer kernel of `kernel_shape` [*window, in, out]."""
    lead = view.ndim - 2
    *window, channels, out = kernel_shape
    shaped = view.reshape(*view.shape[:lead], out, channels, *window)
    spatial = len(window)
    order = [*range(lead + 2, lead + 2 + spatial), lead + 1, lead]
    return jnp.transpose(shaped, [*range(lead), *order])
