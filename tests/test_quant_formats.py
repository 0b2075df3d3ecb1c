"""bitsandbytes 4-bit formats: jpeft's bytes and values against bitsandbytes' own, on CPU."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jpeft import quant
from jpeft.quant import codebooks
from jpeft.quant.torch_sum import torch_cpu_mean

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

# Each shape meets both 4-bit types and both settings of double quantization; (33, 70) every pair.
CASES = [
    ((64, 128), "nf4", True),
    ((64, 128), "fp4", False),
    ((33, 70), "nf4", False),
    ((33, 70), "nf4", True),
    ((33, 70), "fp4", False),
    ((33, 70), "fp4", True),
    ((1, 4097), "nf4", True),
    ((1, 4097), "fp4", False),
    ((300, 200), "nf4", False),
    ((300, 200), "fp4", True),
]
SWEEP_SHAPE = (301, 199)
NESTED = 256
SWEEP = [
    (32, "nf4", True),
    (128, "fp4", False),
    (256, "nf4", False),
    (512, "fp4", True),
    (1024, "nf4", False),
    (2048, "fp4", False),
    (4096, "nf4", True),
]


def _torch_sums_like_jpeft() -> bool:
    x = np.abs(np.random.default_rng(0).standard_normal(5000)).astype(np.float32)
    return np.asarray(torch_cpu_mean(x)).tobytes() == torch.from_numpy(x).mean().numpy().tobytes()


TORCH_SUMS_LIKE_JPEFT = _torch_sums_like_jpeft()


@pytest.fixture(autouse=True, scope="module")
def eager_torch():
    """bitsandbytes wraps its odd-shape dequantization in torch.compile; eager is the same math
    and saves seconds of compilation per shape."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch._dynamo.config, "disable", True)
        yield


def weight(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Weights like a layer's, plus rounding edge cases: an all-zero stretch, and in the first and
    last 32 elements values exactly on every NF4 and FP4 midpoint and on the absmax, +1 and -1."""
    rng = np.random.default_rng(seed)
    rows = shape[0] if len(shape) > 1 else 1
    scale = rng.uniform(0.005, 0.05, size=(rows, 1)).astype(np.float32)
    w = (rng.standard_normal((rows, int(np.prod(shape)) // rows)) * scale).reshape(-1)
    w = w.astype(np.float32)
    ties = np.concatenate([codebooks.bucket_bounds(t)[0] for t in quant.QUANT_TYPES])
    edge = np.concatenate([[1.0], ties, [-1.0]]).astype(np.float32)
    n = w.size
    if n >= 4 * edge.size:
        w[: edge.size] = edge
        w[n - edge.size :] = edge[::-1]
    w[n // 3 : n // 3 + min(256, n // 3)] = 0.0
    return w.reshape(shape)


def bnb_quantize(w: np.ndarray, quant_type: str, blocksize: int, double_quant: bool):
    return F.quantize_4bit(
        torch.from_numpy(w),
        blocksize=blocksize,
        quant_type=quant_type,
        compress_statistics=double_quant,
    )


def assert_same_bits(ours: jax.Array, theirs) -> None:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert ours.tobytes() == theirs.tobytes()


def assert_matches_bnb(w: np.ndarray, quant_type: str, blocksize: int, double_quant: bool):
    if double_quant and not TORCH_SUMS_LIKE_JPEFT:
        pytest.skip("torch on this CPU sums float32 in another order than its AVX2 build")
    q = quant.quantize(w, quant_type, blocksize, double_quant)
    packed, state = bnb_quantize(w, quant_type, blocksize, double_quant)
    assert_same_bits(q.packed, packed.numpy().reshape(-1))
    assert_same_bits(q.absmax, state.absmax.numpy())
    if double_quant:
        assert_same_bits(q.nested_absmax, state.state2.absmax.numpy())
        assert_same_bits(q.nested_code, state.state2.code.numpy())
        assert_same_bits(q.offset, state.offset.numpy())
    expected = F.dequantize_4bit(packed, state).numpy()
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), expected)
    return q


@pytest.mark.parametrize(("shape", "quant_type", "double_quant"), CASES)
def test_quantize_and_dequantize_match_bnb(shape, quant_type, double_quant):
    assert_matches_bnb(weight(shape), quant_type, 64, double_quant)


@pytest.mark.parametrize(("blocksize", "quant_type", "double_quant"), SWEEP)
def test_every_blocksize_matches_bnb(blocksize, quant_type, double_quant):
    assert_matches_bnb(weight(SWEEP_SHAPE, seed=blocksize), quant_type, blocksize, double_quant)


@pytest.mark.parametrize(
    "w",
    [
        np.zeros((20, 64), np.float32),
        np.tile(np.float32([0.25, -0.5, 0.5, 0.0]), (20, 16)),
        np.linspace(-2, 1, 45, dtype=np.float32).reshape(1, 45),
    ],
    ids=["all_zero", "equal_absmax", "one_block"],
)
def test_degenerate_weights_match_bnb(w):
    """All-zero blocks, and absmax deviations that are all zero (bitsandbytes computes 0 / 0)."""
    assert_matches_bnb(w, "fp4", 64, double_quant=True)


def test_bfloat16_weight_matches_bnb():
    w = jnp.asarray(weight((33, 70), seed=3), jnp.bfloat16)
    q = quant.quantize(w, "nf4", 64, double_quant=True)
    torch_w = torch.from_numpy(np.array(w.astype(jnp.float32))).to(torch.bfloat16)
    packed, state = F.quantize_4bit(torch_w, quant_type="nf4", compress_statistics=True)
    assert q.dtype == "bfloat16"
    assert_same_bits(q.packed, packed.numpy().reshape(-1))
    out = quant.dequantize(q)
    assert out.dtype == jnp.bfloat16
    expected = F.dequantize_4bit(packed, state).float().numpy()
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), expected)


def reciprocal_sensitive(bounds: np.ndarray, scale: np.float32, side: str) -> np.ndarray:
    """float32 values near bound * scale that fall on different sides of a bound when divided by
    `scale` and when multiplied by its rounded reciprocal."""
    near = (bounds.astype(np.float64) * scale).astype(np.float32).view(np.int32)
    candidates = (near[:, None] + np.arange(-16, 17)).astype(np.int32).view(np.float32).ravel()
    divided = np.searchsorted(bounds, candidates / scale, side)
    multiplied = np.searchsorted(bounds, candidates * (np.float32(1) / scale), side)
    return candidates[divided != multiplied]


@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
def test_full_blocks_use_reciprocal_partial_block_divides(quant_type):
    scale = np.float32(3.0)
    tricky = {
        t: reciprocal_sensitive(codebooks.bucket_bounds(t)[0], scale, "left")
        for t in quant.QUANT_TYPES
    }
    assert tricky[quant_type].size > 0
    block = np.zeros(64, np.float32)
    values = np.concatenate([[scale], *tricky.values()])
    block[: values.size] = values
    w = np.concatenate([block, block[:40]]).reshape(1, 104)
    assert_matches_bnb(w, quant_type, 64, double_quant=False)


def absmax_probe_weight() -> np.ndarray:
    """[668, 64]: one block per row, its absmax first and zeros after. The absmaxes are placed so
    that, minus their mean, they sit next to the 8-bit thresholds of double quantization, where
    scaling by the nested absmax's rounded reciprocal and dividing by it disagree."""
    thresholds = codebooks.dynamic_thresholds()
    targets = np.unique(thresholds[thresholds > -0.2])[::2]
    rows = 3 * NESTED - 100
    pinned = np.arange(rows) % NESTED == 0
    free = np.argsort(np.arange(rows) % NESTED, kind="stable")[rows // NESTED + 1 :]
    absmax = np.where(pinned, np.float32(1.0), np.float32(0.3))
    for _ in range(80):
        offset = torch.from_numpy(absmax).mean().numpy()
        near = (targets * (np.float32(1) - offset) + offset).astype(np.float32).view(np.int32)
        probes = (near[:, None] + np.arange(-2, 3)).astype(np.int32).view(np.float32).ravel()
        absmax[free[: probes.size]] = probes[: free.size]
    w = np.zeros((rows, 64), np.float32)
    w[:, 0] = absmax
    return w


def test_double_quant_scales_by_reciprocal():
    if not TORCH_SUMS_LIKE_JPEFT:
        pytest.skip("torch on this CPU sums float32 in another order than its AVX2 build")
    w = absmax_probe_weight()
    deviations = w[:, 0] - torch.from_numpy(w[:, 0]).mean().numpy()
    thresholds = codebooks.dynamic_thresholds()
    for start in range(0, w.shape[0], NESTED):
        block = deviations[start : start + NESTED]
        tricky = reciprocal_sensitive(thresholds, np.abs(block).max(), "right")
        assert np.isin(block, tricky).any()
    assert_matches_bnb(w, "nf4", 64, double_quant=True)


@settings(max_examples=25, deadline=None)
@given(
    data=hnp.arrays(
        np.float32,
        (33, 70),
        elements=st.one_of(
            st.just(0.0),
            st.floats(2.0**-60, 2.0**60, width=32),
            st.floats(-(2.0**60), -(2.0**-60), width=32),
            st.sampled_from([float(b) for b in codebooks.bucket_bounds("nf4")[0]]),
        ),
    ),
    quant_type=st.sampled_from(quant.QUANT_TYPES),
    double_quant=st.booleans(),
)
def test_any_weights_match_bnb(data, quant_type, double_quant):
    """Any finite weights whose scaled values stay normal floats; (33, 70) is compiled above."""
    assert_matches_bnb(data, quant_type, 64, double_quant)


def linear4bit_state(w: np.ndarray, quant_type: str, blocksize: int, double_quant: bool):
    """bitsandbytes' own `Linear4bit` quantizes `w` on CPU; returns the layer's weight and its
    state dict (torch tensors)."""
    layer = bnb.nn.Linear4bit(
        w.shape[1], w.shape[0], bias=False, compress_statistics=double_quant, quant_type=quant_type
    )
    layer.weight = bnb.nn.Params4bit(
        torch.from_numpy(w.copy()),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        module=layer,
    )
    layer = layer.to("cpu")
    return layer.weight, layer.state_dict()


LAYER_CASES = [((33, 70), "nf4", 64, True), (SWEEP_SHAPE, "fp4", 128, False)]


@pytest.mark.parametrize(("shape", "quant_type", "blocksize", "double_quant"), LAYER_CASES)
def test_from_bnb_reads_linear4bit_state_dict(shape, quant_type, blocksize, double_quant):
    w = weight(shape, seed=blocksize)
    param, state = linear4bit_state(w, quant_type, blocksize, double_quant)
    prefixed = {f"model.layers.0.mlp.down_proj.{key}": value for key, value in state.items()}
    q = quant.from_bnb(prefixed, prefix="model.layers.0.mlp.down_proj.")
    assert (q.quant_type, q.blocksize, q.weight_shape) == (quant_type, blocksize, shape)
    assert q.dtype == "float32" and q.double_quant == double_quant
    expected = F.dequantize_4bit(param.data, param.quant_state).numpy()
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), expected)
    for key, value in quant.to_bnb(q).items():
        assert_same_bits(value, state[key].numpy())


@pytest.mark.parametrize(("shape", "quant_type", "blocksize", "double_quant"), LAYER_CASES)
def test_to_bnb_equals_linear4bit_state_dict(shape, quant_type, blocksize, double_quant):
    if double_quant and not TORCH_SUMS_LIKE_JPEFT:
        pytest.skip("torch on this CPU sums float32 in another order than its AVX2 build")
    w = weight(shape, seed=blocksize)
    q = quant.quantize(w, quant_type, blocksize, double_quant)
    ours = quant.to_bnb(q)
    _, theirs = linear4bit_state(w, quant_type, blocksize, double_quant)
    assert list(ours) == list(theirs)
    for key in theirs:
        assert_same_bits(ours[key], theirs[key].numpy())
    tensors = {key: torch.tensor(value) for key, value in ours.items() if key != "weight"}
    state = F.QuantState.from_dict(tensors, device=torch.device("cpu"))
    loaded = F.dequantize_4bit(torch.tensor(ours["weight"]), state).numpy()
    np.testing.assert_array_equal(loaded, np.asarray(quant.dequantize(q)))


def test_quant_state_json_is_bitsandbytes_layout():
    q = quant.quantize(weight((33, 70)), "nf4", 64, double_quant=True)
    meta = json.loads(bytes(quant.to_bnb(q)["weight.quant_state.bitsandbytes__nf4"]))
    assert list(meta) == [
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    ]
    assert meta["shape"] == [33, 70] and meta["nested_blocksize"] == 256
    assert np.float32(meta["nested_offset"]) == np.asarray(q.offset)


def test_quantized_tensor_is_a_pytree_and_jits():
    w = jnp.asarray(weight((33, 70)))
    q = quant.quantize(w, "nf4", 64, double_quant=True)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 5
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (rebuilt.quant_type, rebuilt.weight_shape, rebuilt.double_quant) == (
        "nf4",
        (33, 70),
        True,
    )
    plain = quant.quantize(w, "fp4", 64)
    assert len(jax.tree_util.tree_leaves(plain)) == 2 and not plain.double_quant
    jitted = jax.jit(lambda x: quant.quantize(x, "fp4", 64))(w)
    assert_same_bits(jitted.packed, plain.packed)
    assert_same_bits(jitted.absmax, plain.absmax)


@pytest.mark.parametrize("n", [6, 13, 130, 20_000, 2_100_000])
def test_torch_cpu_mean_follows_torch(n):
    """Floats only, vectors with leftovers, one cascade level, levels 1-2, all four levels."""
    if not TORCH_SUMS_LIKE_JPEFT:
        pytest.skip("torch on this CPU sums float32 in another order than its AVX2 build")
    x = np.abs(np.random.default_rng(n).standard_normal(n) * 3).astype(np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = torch.from_numpy(x).mean().numpy()
    finally:
        torch.set_num_threads(threads)
    assert_same_bits(torch_cpu_mean(x), expected)


def test_codebooks_are_bitsandbytes_tables():
    for quant_type, code in codebooks.CODES.items():
        assert_same_bits(code, F.get_4bit_type(quant_type, device="cpu").numpy())
    assert_same_bits(codebooks.dynamic_map(), F.create_dynamic_map().numpy())


def test_dynamic_thresholds_are_bnb_code_boundaries():
    """Each threshold and the float just below it, coded by bitsandbytes' CPU kernel."""
    thresholds = codebooks.dynamic_thresholds()
    below = np.nextafter(thresholds, np.float32(-2))
    z = np.concatenate([[1.0], thresholds, below]).astype(np.float32)
    codes, _ = F.quantize_blockwise(torch.from_numpy(z), blocksize=4096)
    np.testing.assert_array_equal(codes.numpy(), np.searchsorted(thresholds, z, side="right"))


def test_quantize_rejects_bad_arguments():
    w = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        quant.quantize(w, "int4")
    with pytest.raises(ValueError, match=r"blocksize 100 .*\(32, 64, 128, 256, 512, 1024"):
        quant.quantize(w, "nf4", blocksize=100)
    with pytest.raises(ValueError, match="takes float32, bfloat16, float16 weights, got int32"):
        quant.quantize(np.ones((4, 8), np.int32))
    with pytest.raises(ValueError, match="empty"):
        quant.quantize(np.ones((0, 8), np.float32))


def test_from_bnb_names_missing_keys():
    state = quant.to_bnb(quant.quantize(weight((33, 70)), "nf4", 64, True), prefix="lin.")
    partial = {k: v for k, v in state.items() if not k.endswith(("nested_absmax", "quant_map"))}
    with pytest.raises(ValueError) as error:
        quant.from_bnb(partial, prefix="lin.")
    for key in ["lin.weight.quant_map", "lin.weight.nested_absmax", "lin.weight.nested_quant_map"]:
        assert key in str(error.value)
    with pytest.raises(ValueError, match="needs exactly one of"):
        quant.from_bnb({"lin.weight": state["lin.weight"]}, prefix="lin.")
    short = dict(state, **{"lin.weight": state["lin.weight"][:-1]})
    with pytest.raises(ValueError, match="lin.weight has 1154 elements, the quant_state implies"):
        quant.from_bnb(short, prefix="lin.")
