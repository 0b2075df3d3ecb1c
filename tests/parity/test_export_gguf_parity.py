"""GGUF exports for llama.cpp, loaded back by jpeft, by transformers' GGUF loader and by llama.cpp.

The merged model in every outtype gives, loaded by jpeft and by transformers, exactly the logits of
jpeft's merged weights rounded the way the outtype rounds them (so names, layout, q/k permutation
and metadata are right), and stays within the outtype's stated quantization error of the exact
merged logits; from a GGUF base and a HF folder (tokenizer and chat template kept), for every
family. The LoRA file's pairs, scaled as llama.cpp scales them, give jpeft's merged delta for
plain LoRA, rsLoRA, rank/alpha patterns and PiSSA. llama.cpp itself (llama-cpp-python, skipped
only when it cannot be imported) runs the merged file and the base + LoRA files with jpeft's logits
and greedy tokens. Adapters a format cannot hold are refused, and nothing is left half-written.
"""

from __future__ import annotations

import json
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_bases import SMALL, build_base
from test_conformance import fresh, is_weight_method
from test_gguf import IDS, build_hf_model, gguf_name, permute, write_gguf
from tiny_models import random_causal_lm, save_word_level_llama

import jpeft
from jpeft import tree as jtree
from jpeft.export import gguf_model, save_lora_gguf, save_merged_gguf
from jpeft.export.gguf_model import OUTTYPES
from jpeft.export.merged import iter_hf_tensors
from jpeft.models.gguf_loading import gguf_tensor_name, hf_tensor_name, permute_rows, unpermute_rows

T = gguf.GGMLQuantizationType
FAST_COMPILE = {"xla_backend_optimization_level": 0}
EXACT = 1e-5  # max |logit difference| / max |logit| of two computations on the same weights
# The quantization error of each outtype on the tiny model below: 2.5 to 3 times what was
# measured (f16 8.1e-4, bf16 6.4e-3, q8_0 1.8e-2, q5_1 0.14, q5_0 0.20, q4_1 0.29, q4_0 0.33; a
# random model with no signal to keep and few weights to average the rounding over).
QUANTIZATION_ERROR = {
    "f32": EXACT,
    "f16": 2.5e-3,
    "bf16": 2e-2,
    "q8_0": 5e-2,
    "q5_1": 0.4,
    "q5_0": 0.5,
    "q4_1": 0.8,
    "q4_0": 0.9,
}
TEXT = "the weather is nice, and there are 3 cats"
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = [*LINEAR, "embed_tokens", "lm_head"]
PROMPT_METHODS = [n for n in sorted(jpeft.registered()) if not is_weight_method(n)]


def relative_error(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


def jpeft_logits(path, ids=IDS) -> np.ndarray:
    """Logits of the file `path` as `jpeft.models.from_pretrained` loads it."""
    model, params = jpeft.models.from_pretrained(path)
    return np.asarray(jax.jit(model.apply, compiler_options=FAST_COMPILE)(params, jnp.asarray(ids)))


def transformers_logits(path, ids=IDS) -> np.ndarray:
    """Logits of the file `path` as transformers' GGUF loader loads it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        return model.eval()(torch.tensor(np.asarray(ids))).logits.numpy()


def perturbed(adapter, scale: float = 0.05):
    """Every trainable leaf moved away from its init by noise (numpy: no compile per shape)."""
    trainable, frozen = jpeft.partition(adapter)
    rng = np.random.default_rng(7)
    noise = lambda x: x + scale * rng.standard_normal(x.shape, np.float32)  # noqa: E731
    return jpeft.combine(jax.tree.map(noise, trainable), frozen)


def rounded(params, qtype):
    """`params` with every 2-D weight rounded through `qtype` as the export writes it (F16 where
    the block does not divide the rows); norms and biases unchanged."""
    block, _ = gguf.GGML_QUANT_SIZES[qtype]

    def round_leaf(path, x):
        x = np.asarray(x, np.float32)
        if "norm" in path or path.endswith("bias"):
            return x
        kind = qtype if x.shape[-1] % block == 0 else T.F16
        return gguf.quants.dequantize(gguf.quants.quantize(x, kind), kind).reshape(x.shape)

    return jtree.unflatten({p: round_leaf(p, x) for p, x in jtree.flatten(params).items()})


def reader_value(reader, key):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def describe(writer) -> None:
    """Descriptive `general.*` keys, and a file type that an export must not copy."""
    writer.add_name("Tiny Base")
    writer.add_license("apache-2.0")
    writer.add_tags(["tiny", "test"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)


class Tiny:
    """The tiny Llama of test_gguf (untied head, rows a multiple of every block), as a GGUF base
    and as a HF folder with the same byte-level BPE tokenizer, and a perturbed LoRA on every
    linear layer, the embedding table and the head."""

    def __init__(self, root):
        hf_model = build_hf_model("llama")
        self.gguf = write_gguf(root / "base.gguf", hf_model, edit=describe)
        self.folder = root / "hf"
        hf_model.save_pretrained(self.folder)
        jpeft.models.load_tokenizer(self.gguf).save_pretrained(self.folder)
        self.model, self.params = jpeft.models.from_pretrained(self.gguf)
        self.apply = jax.jit(self.model.apply, compiler_options=FAST_COMPILE)
        self.adapter = self.lora(jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        self.merged = jpeft.merge(self.params, self.adapter)
        self.logits = self.run(self.merged)

    def lora(self, config):
        adapter = jpeft.init_adapter(self.params, config, key=jax.random.key(0), model=self.model)
        return perturbed(adapter)

    def run(self, params, ids=IDS) -> np.ndarray:
        return np.asarray(self.apply(params, jnp.asarray(ids)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("tiny"))


# names and layout


def test_gguf_names_and_permutation_match_llama_cpp_converter(tiny):
    """Against test_gguf's own (independently written) copies of llama.cpp's name table and q/k
    permutation, for every tensor of the model, and as inverses of the loader's."""
    names = [name for name, _ in iter_hf_tensors(tiny.params)]
    assert len(names) == 3 + 2 * 9
    for name in names:
        assert gguf_tensor_name(name) == gguf_name(name)
        assert hf_tensor_name(gguf_tensor_name(name)) == name
    assert gguf_tensor_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    w = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
    np.testing.assert_array_equal(permute_rows(w, 4), permute(w, 4))
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, 4), 4), w)


# the merged model


@pytest.mark.parametrize("outtype", list(OUTTYPES))
def test_every_outtype_loads_back_in_jpeft_and_transformers(tiny, outtype, tmp_path):
    out = save_merged_gguf(
        tmp_path / "merged.gguf", tiny.gguf, tiny.params, tiny.adapter, outtype=outtype
    )
    qtype, file_type = OUTTYPES[outtype]
    reader = gguf.GGUFReader(out)
    assert reader_value(reader, "general.file_type") == file_type
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == qtype and types["blk.0.attn_norm.weight"] == T.F32
    logits = jpeft_logits(out)
    assert relative_error(logits, tiny.run(rounded(tiny.merged, qtype))) < EXACT
    assert relative_error(logits, tiny.logits) < QUANTIZATION_ERROR[outtype]
    assert relative_error(transformers_logits(out), logits) < EXACT


def test_gguf_base_keeps_its_tokenizer_and_descriptive_metadata(tiny, tmp_path):
    out = save_merged_gguf(tmp_path / "tuned.gguf", tiny.gguf, tiny.params, tiny.adapter)
    base, ours = gguf.GGUFReader(tiny.gguf), gguf.GGUFReader(out)
    tokenizer_keys = [k for k in base.fields if k.startswith("tokenizer.")]
    assert len(tokenizer_keys) >= 8
    for key in tokenizer_keys:
        assert reader_value(ours, key) == reader_value(base, key), key
    assert reader_value(ours, "general.name") == "tuned"
    assert reader_value(ours, "general.type") == "model"
    assert reader_value(ours, "general.license") == "apache-2.0"
    assert reader_value(ours, "general.tags") == ["tiny", "test"]
    assert reader_value(ours, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert "output.weight" in {t.name for t in ours.tensors}  # the head is not tied
    theirs = jpeft.models.load_tokenizer(tiny.gguf)
    tokenizer = jpeft.models.load_tokenizer(out)
    assert tokenizer(TEXT).input_ids == theirs(TEXT).input_ids
    assert tokenizer.chat_template == theirs.chat_template


def test_hf_folder_base_writes_its_bpe_tokenizer(tiny, tmp_path):
    """The HF folder holds the GGUF base's tokenizer: the export writes the same vocabulary,
    merges, special tokens and chat template, and GPT-2's pre-tokenizer (its ByteLevel regex)."""
    _, params = jpeft.models.from_pretrained(tiny.folder)
    out = save_merged_gguf(tmp_path / "m.gguf", tiny.folder, params, tiny.adapter, outtype="f32")
    base, ours = gguf.GGUFReader(tiny.gguf), gguf.GGUFReader(out)
    for key in ("model", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id"):
        key = f"tokenizer.ggml.{key}"
        assert reader_value(ours, key) == reader_value(base, key), key
    assert reader_value(ours, "tokenizer.ggml.pre") == "gpt-2"
    assert reader_value(ours, "tokenizer.ggml.add_bos_token") is False
    assert reader_value(ours, "tokenizer.chat_template") == reader_value(
        base, "tokenizer.chat_template"
    )
    original = jpeft.models.load_tokenizer(tiny.folder)
    tokenizer = jpeft.models.load_tokenizer(out)
    assert tokenizer(TEXT).input_ids == original(TEXT).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(
        chat, tokenize=False
    )
    assert relative_error(jpeft_logits(out), tiny.logits) < EXACT


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_family(family, tmp_path):
    """llama and Mistral become llama.cpp's llama architecture, q/k rows permuted; Qwen2/3 keep
    their rows. Mistral's sliding window (4) is dropped with a warning: compare 4 positions.
    transformers' GGUF loader reads Qwen3 with its default head_dim (128), not the file's."""
    path, model, params, ids = build_base(family, tmp_path / "base")
    config = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    adapter = perturbed(jpeft.init_adapter(params, config, key=jax.random.key(0), model=model))
    ids = jnp.asarray(ids[:, :4] if family == "mistral" else ids)
    apply = jax.jit(model.apply, compiler_options=FAST_COMPILE)
    merged = jpeft.merge(params, adapter)
    expected = np.asarray(apply(merged, ids))
    export = dict(adapter=adapter, outtype="f32", tokenizer=False)
    if family == "mistral":
        with pytest.warns(UserWarning, match="sliding_window=4 is not written"):
            out = save_merged_gguf(tmp_path / "out.gguf", path, params, **export)
    else:
        out = save_merged_gguf(tmp_path / "out.gguf", path, params, **export)
    reader = gguf.GGUFReader(out)
    arch = reader_value(reader, "general.architecture")
    assert arch == ("llama" if family in ("llama", "mistral") else family)
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").data
    merged_q = np.asarray(merged["model"]["layers"]["self_attn"]["q_proj"]["weight"][0])
    heads = model.config.num_attention_heads
    np.testing.assert_array_equal(q, permute_rows(merged_q, heads) if arch == "llama" else merged_q)
    assert ("output.weight" in {t.name for t in reader.tensors}) != model.config.tie_word_embeddings
    assert relative_error(jpeft_logits(out, ids), expected) < EXACT
    if family != "qwen3":  # transformers' loader ignores qwen3.attention.key_length (16 here)
        assert relative_error(transformers_logits(out, ids), expected) < EXACT
    if family == "llama":  # rows of 48 (down_proj's) are no whole Q8_0 blocks: F16, as llama.cpp
        out = save_merged_gguf(tmp_path / "q8.gguf", path, params, **{**export, "outtype": "q8_0"})
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
        assert (types["blk.0.attn_q.weight"], types["blk.0.ffn_down.weight"]) == (T.Q8_0, T.F16)
        rounded_logits = np.asarray(apply(rounded(merged, T.Q8_0), ids))
        assert relative_error(jpeft_logits(out, ids), rounded_logits) < EXACT


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    ],
    ids=["linear", "llama3"],
)
def test_rope_scaling(rope, tmp_path):
    """Linear scaling is metadata; Llama 3.1's becomes `rope_freqs.weight` (which transformers'
    GGUF loader ignores, so jpeft's reading it back is the check)."""
    rope = {"rope_theta": 10000.0, "original_max_position_embeddings": 8192, **rope}
    # head_dim 32: its longest wavelength passes 8192, so the factor shows in rope_freqs
    sizes = {**SMALL, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32}
    random_causal_lm("LlamaConfig", {**sizes, "rope_parameters": rope}).save_pretrained(tmp_path)
    model, params = jpeft.models.from_pretrained(tmp_path)
    out = save_merged_gguf(tmp_path / "m.gguf", tmp_path, params, outtype="f32", tokenizer=False)
    reader = gguf.GGUFReader(out)
    names = {t.name for t in reader.tensors}
    assert ("rope_freqs.weight" in names) == (rope["rope_type"] == "llama3")
    assert (reader_value(reader, "llama.rope.scaling.type") == "linear") == (
        rope["rope_type"] == "linear"
    )
    reloaded, _ = jpeft.models.from_pretrained(out)
    assert reloaded.config.rope_scaling.rope_type == rope["rope_type"]
    ids = np.arange(1, 31).reshape(2, 15)
    expected = np.asarray(model.apply(params, jnp.asarray(ids)))
    assert relative_error(jpeft_logits(out, ids), expected) < EXACT


# the LoRA adapter alone

# None: the `tiny` fixture's LoRA (every linear layer, the table and the head).
LORA_CASES = {
    "lora": None,
    "rslora_patterns": dict(
        r=8, lora_alpha=4, use_rslora=True, rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3}
    ),
    "pissa": dict(r=4, lora_alpha=8, init_lora_weights="pissa"),
}


def lora_deltas(path) -> dict[str, np.ndarray]:
    """GGUF weight name -> the delta llama.cpp adds to it: alpha / r * B A (r = B's columns;
    on token_embd, A is stored transposed, [vocab, r])."""
    reader = gguf.GGUFReader(path)
    alpha = reader_value(reader, "adapter.lora.alpha")
    arrays = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    deltas = {}
    for name in {n.rsplit(".", 1)[0] for n in arrays}:
        lora_a, lora_b = arrays[f"{name}.lora_a"], arrays[f"{name}.lora_b"]
        product = lora_a @ lora_b.T if name == "token_embd.weight" else lora_b @ lora_a
        deltas[name] = alpha / lora_b.shape[1] * product
    return deltas


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_pairs_scaled_as_llama_cpp_scales_them_give_the_merge(tiny, case, tmp_path):

    if LORA_CASES[case] is None:
        adapter, merged = tiny.adapter, tiny.merged
    else:
        targets = ["q_proj", "k_proj", "o_proj", "down_proj"]
        adapter = tiny.lora(jpeft.LoraConfig(target_modules=targets, **LORA_CASES[case]))
        merged = jpeft.merge(tiny.params, adapter)
    config = adapter.config
    out = save_lora_gguf(tmp_path / "lora.gguf", adapter, tiny.params, base=tiny.gguf)
    reader = gguf.GGUFReader(out)
    assert reader_value(reader, "general.type") == "adapter"
    assert reader_value(reader, "adapter.type") == "lora"
    assert reader_value(reader, "general.architecture") == "llama"
    saved_alpha = config.lora_alpha * (2 if case == "pissa" else 1)  # PEFT's saved form
    assert reader_value(reader, "adapter.lora.alpha") == pytest.approx(saved_alpha)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    rank = 2 * config.r if case == "pissa" else config.r
    assert shapes["blk.0.attn_q.weight.lora_a"] == (rank, 256)
    assert shapes["blk.0.attn_q.weight.lora_b"] == (256, rank)
    base = dict(iter_hf_tensors(tiny.params))
    heads = {"attn_q": 4, "attn_k": 2}
    deltas = lora_deltas(out)
    assert len(deltas) == len(adapter.weights)
    for hf_name, weight in iter_hf_tensors(merged):
        name = gguf_tensor_name(hf_name)
        if name not in deltas:
            continue
        delta = deltas[name]
        if name.split(".")[-2] in heads:
            delta = unpermute_rows(delta, heads[name.split(".")[-2]])
        expected = np.asarray(weight) - np.asarray(base[hf_name])
        np.testing.assert_allclose(
            delta, expected, atol=1e-5 * np.abs(expected).max(), err_msg=name
        )
    if case == "lora":  # a QLoRA adapter: made on 4-bit params, it is the same file
        _, params_4bit = jpeft.models.from_pretrained(tiny.gguf, quantize="nf4")
        again = save_lora_gguf(tmp_path / "qlora.gguf", adapter, params_4bit, base=tiny.gguf)
        for ours, theirs in zip(reader.tensors, gguf.GGUFReader(again).tensors, strict=True):
            np.testing.assert_array_equal(ours.data, theirs.data)


# llama.cpp itself (llama-cpp-python), on the merged file and on the base + LoRA files

# llama.cpp's max |logit difference| / max |logit| to jpeft on the same (rounded) weights, about
# 3x what was measured (1.2e-6, 6.6e-4, 2.5e-2): f32 computes in f32; with f16 / q8_0 weights
# llama.cpp rounds the activations it multiplies them with to f16 / q8_0 too.
LLAMA_CPP_ERROR = {"f32": 1e-4, "f16": 3e-3, "q8_0": 6e-2}
GREEDY_STEPS = 8


@pytest.fixture(scope="module")
def llama_cpp():
    """llama-cpp-python, loading models without extra CPU buffer types: its AMX kernels crash on
    q8_0 / q4_0 weights on some CPUs (llama.cpp issue #20824; they crash here on test_gguf's own
    q8_0 files too), so the plain CPU kernels run."""
    module = pytest.importorskip("llama_cpp")
    defaults = module.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module.llama_cpp, "llama_model_default_params", without_extra_buffers)
        yield module


def llama_cpp_run(llama_cpp, model_file, prompt, lora_file=None):
    """llama.cpp's logits [len(prompt), vocab] for `prompt`, and its greedy continuation."""
    llm = llama_cpp.Llama(
        model_path=str(model_file),
        lora_path=None if lora_file is None else str(lora_file),
        n_ctx=32,
        n_batch=32,
        n_threads=1,
        type_k=llama_cpp.GGML_TYPE_F32,  # the default f16 cache would round k and v
        type_v=llama_cpp.GGML_TYPE_F32,
        logits_all=True,
        verbose=False,
    )
    llm.eval([int(i) for i in prompt])
    logits, tokens = np.array(llm.scores[: len(prompt)]), []
    for _ in range(GREEDY_STEPS):
        tokens.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval([tokens[-1]])
    return logits, tokens


def jpeft_greedy(run, params, prompt) -> list[int]:
    """jpeft's greedy continuation of `prompt`: one fixed-length buffer (causal: the tokens after
    a position do not change its logits), so one compile."""
    ids = np.zeros((1, len(prompt) + GREEDY_STEPS), np.int32)
    ids[0, : len(prompt)] = prompt
    for n in range(len(prompt), ids.shape[1]):
        ids[0, n] = run(params, ids)[0, n - 1].argmax()
    return ids[0, len(prompt) :].tolist()


@pytest.mark.parametrize("outtype", list(LLAMA_CPP_ERROR))
def test_llama_cpp_runs_the_merged_export(tiny, llama_cpp, outtype, tmp_path):
    out = save_merged_gguf(
        tmp_path / "m.gguf", tiny.gguf, tiny.params, tiny.adapter, outtype=outtype
    )
    weights = rounded(tiny.merged, OUTTYPES[outtype][0])
    expected = tiny.run(weights)
    for prompt, want in zip(IDS, expected, strict=True):
        logits, tokens = llama_cpp_run(llama_cpp, out, prompt)
        assert relative_error(logits, want) < LLAMA_CPP_ERROR[outtype]
        if outtype == "f32":  # rounded activations can flip this random model's close calls
            assert tokens == jpeft_greedy(tiny.run, weights, prompt)


def test_llama_cpp_applies_the_lora_file_to_the_base(tiny, llama_cpp, tmp_path):
    """The fixture's LoRA covers the embedding table and the head too, in llama.cpp as well."""
    lora = save_lora_gguf(tmp_path / "lora.gguf", tiny.adapter, tiny.params, base=tiny.gguf)
    logits, tokens = llama_cpp_run(llama_cpp, tiny.gguf, IDS[0], lora)
    assert relative_error(logits, tiny.logits[0]) < LLAMA_CPP_ERROR["f32"]
    assert tokens == jpeft_greedy(tiny.run, tiny.merged, IDS[0])
    base_logits, _ = llama_cpp_run(llama_cpp, tiny.gguf, IDS[0])
    assert relative_error(base_logits, tiny.logits[0]) > 0.1  # the LoRA does change them


@pytest.mark.parametrize("case", ["qwen2", "qwen3"])
def test_llama_cpp_runs_qwen_exports(llama_cpp, case, tmp_path):
    """Qwen2 (q/k/v biases, tied head) and Qwen3 (q/k norms, head_dim 128): rows not permuted."""
    gguf_base = write_gguf(tmp_path / "base.gguf", build_hf_model(case))
    model, params = jpeft.models.from_pretrained(gguf_base)
    config = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR)
    adapter = perturbed(jpeft.init_adapter(params, config, key=jax.random.key(0), model=model))
    merged = jpeft.merge(params, adapter)
    run = jax.jit(model.apply, compiler_options=FAST_COMPILE)
    expected = np.asarray(run(merged, jnp.asarray(IDS[:1])))[0]
    greedy = jpeft_greedy(lambda p, i: np.asarray(run(p, jnp.asarray(i))), merged, IDS[0])
    merged_file = save_merged_gguf(tmp_path / "m.gguf", gguf_base, params, adapter, outtype="f32")
    lora_file = save_lora_gguf(tmp_path / "l.gguf", adapter, params, base=gguf_base)
    for files in ((merged_file, None), (gguf_base, lora_file)):
        logits, tokens = llama_cpp_run(llama_cpp, files[0], IDS[0], files[1])
        assert relative_error(logits, expected) < LLAMA_CPP_ERROR["f32"]
        assert tokens == greedy


# HF pre-tokenizers (tokenizer.json) and llama.cpp's names for them, written here from the
# regexes llama.cpp's llama-vocab.cpp quotes.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(regex: str) -> dict:
    split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, {**_BYTE_LEVEL, "use_regex": False}]}


PRE_TOKENIZERS = {
    "gpt-2": {**_BYTE_LEVEL, "use_regex": True},
    "llama-bpe": _split_then_bytes(_LLAMA3),
    "qwen2": _split_then_bytes(_LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")),
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {**_BYTE_LEVEL, "use_regex": True},
        ],
    },
}
DIGITS_TEXT = "I've 12 cats, 1212 dogs...\n  and 3412!"


_BOS = "<|im_start|>"
BOS_FIRST = {  # a post-processor that starts each text with BOS (id 1), as Llama 3's does
    "type": "TemplateProcessing",
    "single": [
        {"SpecialToken": {"id": _BOS, "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
    ],
    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {_BOS: {"id": _BOS, "ids": [1], "tokens": [_BOS]}},
}


def with_pre_tokenizer(folder, pre_tokenizer, out):
    """A copy of HF folder `folder` whose tokenizer pre-tokenizes with `pre_tokenizer` and merges
    "1 2" (in place of "Ġt he"), so that how digits are grouped shows in the tokens; with Llama 3's
    pre-tokenizer it also adds a BOS, as Llama 3 does."""
    shutil.copytree(folder, out)
    file = out / "tokenizer.json"
    data = json.loads(file.read_text())
    data["pre_tokenizer"] = pre_tokenizer
    if pre_tokenizer == PRE_TOKENIZERS["llama-bpe"]:
        data["post_processor"] = BOS_FIRST
    model = data["model"]
    model["vocab"]["12"] = model["vocab"].pop("Ġthe")
    model["merges"] = [m for m in model["merges"] if m != ["Ġt", "he"]] + [["1", "2"]]
    file.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("name", list(PRE_TOKENIZERS))
def test_llama_cpp_tokenizes_as_the_hf_tokenizer(tiny, llama_cpp, name, tmp_path):
    folder = with_pre_tokenizer(tiny.folder, PRE_TOKENIZERS[name], tmp_path / "hf")
    out = save_merged_gguf(tmp_path / "m.gguf", folder, tiny.params, outtype="f32")
    reader = gguf.GGUFReader(out)
    assert reader_value(reader, "tokenizer.ggml.pre") == name
    assert reader_value(reader, "tokenizer.ggml.add_bos_token") == (name == "llama-bpe")
    expected = transformers.AutoTokenizer.from_pretrained(folder)(DIGITS_TEXT).input_ids
    merged_digits = tiny.model.config.vocab_size - 1  # the id of "12"
    assert (merged_digits in expected) == (name in ("gpt-2", "llama-bpe"))
    assert (expected[0] == 1) == (name == "llama-bpe")
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    assert llm.tokenize(DIGITS_TEXT.encode(), add_bos=True, special=False) == expected


# what the formats cannot hold, and failures


@pytest.fixture(scope="module")
def word_base(tmp_path_factory):
    """The word-level tiny Llama (tied head, a WordLevel tokenizer): (dir, model, params, ids)."""
    path = save_word_level_llama(tmp_path_factory.mktemp("word"))
    model, params = jpeft.models.from_pretrained(path)
    return path, model, params, None


@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_prompt_adapters_are_refused(word_base, name, tmp_path):
    path, _, params, _ = word_base
    adapter = fresh(word_base, name)
    with pytest.raises(ValueError, match="cannot be exported merged.*adapter folder"):
        save_merged_gguf(tmp_path / "m.gguf", path, params, adapter)
    with pytest.raises(ValueError, match=f"a {adapter.config.peft_type} adapter adds virtual"):
        save_lora_gguf(tmp_path / "l.gguf", adapter, params, base=path)
    assert list(tmp_path.iterdir()) == []


def _lora(**options) -> jpeft.LoraConfig:
    return jpeft.LoraConfig(**{"r": 2, "target_modules": ["q_proj"], **options})


LORA_REFUSALS = {
    "dora": (_lora(use_dora=True), r"DoRA adapter \(use_dora=True\).*save_merged_gguf"),
    "modules_to_save": (_lora(modules_to_save=["lm_head"]), r"replaces \['lm_head.weight'\]"),
    "tokens": (_lora(trainable_token_indices=[3, 4]), "trainable_token_indices"),
    "tied_table": (_lora(target_modules=["embed_tokens"]), r"\['model.embed_tokens'\] of a model"),
    "loha": (jpeft.LoHaConfig(r=2, target_modules=["q_proj"]), "a LOHA adapter cannot be"),
    "adalora": (
        jpeft.AdaLoraConfig(init_r=2, target_modules=["q_proj"], total_step=10),
        "a ADALORA adapter cannot be written as a llama.cpp LoRA",
    ),
}


@pytest.mark.parametrize("case", list(LORA_REFUSALS))
def test_lora_gguf_refuses_what_llama_cpp_cannot_apply(word_base, case, tmp_path):
    path, model, params, _ = word_base
    config, message = LORA_REFUSALS[case]
    adapter = jpeft.init_adapter(params, config, key=jax.random.key(0), model=model)
    with pytest.raises(ValueError, match=message):
        save_lora_gguf(tmp_path / "l.gguf", adapter, params, base=path)
    assert list(tmp_path.iterdir()) == []


def test_bad_paths_outtypes_and_bases(tiny, word_base, tmp_path):
    (tmp_path / "taken.gguf").write_bytes(b"x")
    lora = dict(adapter=tiny.adapter, params=tiny.params)
    for export in (
        lambda out, **kw: save_merged_gguf(out, tiny.gguf, tiny.params, **kw),
        lambda out, **kw: save_lora_gguf(out, **lora, base=tiny.gguf, **kw),
    ):
        with pytest.raises(ValueError, match="taken.gguf already exists"):
            export(tmp_path / "taken.gguf")
        with pytest.raises(ValueError, match=r"outtype 'q4_k'.*\['f32', 'f16', 'bf16', 'q8_0'"):
            export(tmp_path / "new.gguf", outtype="q4_k")
    with pytest.raises(ValueError, match="do not fit the config of base .*pass the base"):
        save_merged_gguf(tmp_path / "new.gguf", word_base[0], tiny.params)
    with pytest.raises(ValueError, match="base_model_name_or_path.*pass base="):
        save_lora_gguf(tmp_path / "new.gguf", **lora)
    with pytest.raises(ValueError, match="is a WordLevel model; jpeft writes byte-level BPE"):
        save_merged_gguf(tmp_path / "new.gguf", word_base[0], word_base[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]


def test_hf_base_without_tokenizer_needs_tokenizer_false(tmp_path):
    path, _, params, _ = build_base("qwen2", tmp_path / "base")
    with pytest.raises(ValueError, match="cannot export the tokenizer .*tokenizer=False"):
        save_merged_gguf(tmp_path / "m.gguf", path, params)
    assert not (tmp_path / "m.gguf").exists()


def test_a_failure_while_writing_leaves_nothing(tiny, tmp_path, monkeypatch):
    calls = []

    def failing_quantize(data, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise OSError("disk full")
        return gguf.quants.quantize(data, qtype)

    monkeypatch.setattr(gguf_model, "quantize", failing_quantize)
    with pytest.raises(OSError, match="disk full"):
        save_merged_gguf(tmp_path / "m.gguf", tiny.gguf, tiny.params, tiny.adapter)
    assert list(tmp_path.iterdir()) == []
