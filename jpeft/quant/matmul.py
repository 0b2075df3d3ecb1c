"""The linear op on a 4-bit weight: `x @ dequantize(q).T`, with a backward that keeps no float W.

`quantized_matmul` is a `jax.custom_vjp`. Its forward dequantizes the weight (or fuses the
dequantization into a Pallas kernel), and saves only `q` itself, the packed codes and block
scales, for the backward pass. The backward computes the input gradient `dY @ W` only: a
quantized weight is frozen, so it gets no gradient at all. A plain "dequantize, then dot" under
`jax.grad` would instead keep the float weight alive until the backward pass, which is exactly
the memory QLoRA exists to save.

Two implementations compute the same thing:
- `"reference"`: plain jnp (dequantize to the compute dtype, then one dot), on every backend;
- `"pallas"`: the fused kernels of `jpeft.quant.kernels`, which never write the float weight
  to memory; `"interpret"` runs them in Pallas' interpreter (CPU tests).
`"auto"` (the default) is the reference on every backend. The kernels are opt-in (`"pallas"`,
which falls back to the reference for shapes they do not support): compiled on an H200 (JAX 0.11,
`benchmarks/gpu_kernels.py`), their tiles for a 4096-wide input asked for more shared memory than
the GPU has, and they have not been compiled by Mosaic on a TPU. The environment variable
`JPEFT_QUANT_MATMUL` replaces `"auto"` with a fixed choice (`JPEFT_QUANT_MATMUL=pallas`).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

from jpeft.quant import codebooks
from jpeft.quant.formats import QuantizedTensor, block_absmax, dequantize

IMPLEMENTATIONS = ("auto", "reference", "pallas", "interpret")
ENV_VAR = "JPEFT_QUANT_MATMUL"
_GPUS = ("gpu", "cuda", "rocm")
_ACCELERATORS = (*_GPUS, "tpu")


def default_compute_dtype() -> jnp.dtype:
    """bfloat16 on GPU and TPU, float32 on CPU (where bfloat16 matmuls are emulated and slow)."""
    if jax.default_backend() in _ACCELERATORS:
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float32)


def quantized_matmul(
    x: jax.Array,
    q: QuantizedTensor,
    compute_dtype: jax.typing.DTypeLike | None = None,
    impl: str = "auto",
) -> jax.Array:
    """`x` [..., in] @ W.T -> [..., out] in x's dtype, for one quantized weight W [out, in].

    The weight is dequantized to `compute_dtype` (default: x's dtype) and x is cast to it, as
    bitsandbytes' `Linear4bit` does with its `compute_dtype`.
    """
    _check_operands(x, q, impl)
    dtype = jnp.dtype(x.dtype if compute_dtype is None else compute_dtype)
    return _quantized_matmul(x, q, dtype, _resolve(impl)).astype(x.dtype)


def quantized_matmul_transposed(
    g: jax.Array, q: QuantizedTensor, compute_dtype: jax.typing.DTypeLike | None = None
) -> jax.Array:
    """`g` [..., out] @ W -> [..., in] in g's dtype: the input gradient of `quantized_matmul`."""
    dtype = jnp.dtype(g.dtype if compute_dtype is None else compute_dtype)
    return _transposed(g, q, dtype, _resolve("auto")).astype(g.dtype)


def _check_operands(x: jax.Array, q: QuantizedTensor, impl: str) -> None:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if q.stack_shape or len(q.weight_shape) != 2:
        raise ValueError(
            f"quantized_matmul takes one [out, in] weight, got a quantized weight of shape "
            f"{q.shape}; index a stack of layers first (lax.scan does)"
        )
    if x.shape[-1] != q.weight_shape[1]:
        raise ValueError(
            f"input has {x.shape[-1]} features but the quantized weight {q.weight_shape} "
            f"takes {q.weight_shape[1]}"
        )


def _resolve(impl: str) -> str:
    """The implementation `impl` stands for; "auto" reads JPEFT_QUANT_MATMUL, then the backend."""
    if impl != "auto":
        return impl
    chosen = os.environ.get(ENV_VAR, "auto")
    if chosen not in IMPLEMENTATIONS:
        raise ValueError(f"{ENV_VAR}={chosen!r}; use one of {IMPLEMENTATIONS}")
    if chosen != "auto":
        return chosen
    return "reference"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _quantized_matmul(x, q, dtype, impl):
    return _forward(x, q, dtype, impl)


def _quantized_matmul_fwd(x, q, dtype, impl):
    return _forward(x, q, dtype, impl), q


def _quantized_matmul_bwd(dtype, impl, q, grad_out):
    # Only dX; None is a symbolic zero for the whole frozen weight (codes and scales).
    return _transposed(grad_out, q, dtype, impl).astype(grad_out.dtype), None


_quantized_matmul.defvjp(_quantized_matmul_fwd, _quantized_matmul_bwd)


def _forward(x: jax.Array, q: QuantizedTensor, dtype, impl: str) -> jax.Array:
    rows = x.reshape(-1, x.shape[-1]).astype(dtype)
    if _use_kernel(impl, rows.shape[0], q):
        from jpeft.quant import kernels

        out = kernels.fused_matmul(*_kernel_operands(rows, q), interpret=impl == "interpret")
    else:
        weight = dequantize(q, dtype)
        out = lax.dot_general(rows, weight, (((1,), (1,)), ((), ())))
    return out.reshape(*x.shape[:-1], q.weight_shape[0])


def _transposed(g: jax.Array, q: QuantizedTensor, dtype, impl: str) -> jax.Array:
    rows = g.reshape(-1, g.shape[-1]).astype(dtype)
    if _use_kernel(impl, rows.shape[0], q):
        from jpeft.quant import kernels

        out = kernels.fused_matmul_transposed(
            *_kernel_operands(rows, q), interpret=impl == "interpret"
        )
    else:
        out = rows @ dequantize(q, dtype)
    return out.reshape(*g.shape[:-1], q.weight_shape[1])


def _use_kernel(impl: str, num_rows: int, q: QuantizedTensor) -> bool:
    if impl == "reference":
        return False
    from jpeft.quant import kernels

    out_dim, in_dim = q.weight_shape
    return kernels.supports(num_rows, out_dim, in_dim, q.blocksize)


def _kernel_operands(rows: jax.Array, q: QuantizedTensor):
    """(rows, packed [out, in/2], scales [out, in/blocksize], codebook [16], blocksize)."""
    out_dim, in_dim = q.weight_shape
    packed = q.packed.reshape(out_dim, in_dim // 2)
    scales = block_absmax(q).reshape(out_dim, in_dim // q.blocksize)
    codebook = codebooks.CODES[q.quant_type]  # concrete: the kernels build it in
    return rows, packed, scales, codebook, q.blocksize
