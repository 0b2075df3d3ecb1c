"""`from_pretrained`: a model from a Hugging Face checkpoint directory or a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jpeft import sharding
from jpeft.gguf_file import is_gguf_path
from jpeft.models import bnb_checkpoint, gguf_loading, hf_loading
from jpeft.models.llama import LlamaForCausalLM, Params
from jpeft.quant import QuantConfig


def from_pretrained(
    path: str | Path,
    dtype: Any = None,
    *,
    quantize: str | None = None,
    double_quant: bool = False,
    blocksize: int = 64,
    mesh: Any = None,
    rules: Any = None,
) -> tuple[LlamaForCausalLM, Params]:
    """Load a HF checkpoint directory (config.json + safetensors) or a `.gguf` file (see
    `gguf_loading.load_gguf`) as `(model, params)`.

    quantize: "nf4" or "fp4" quantizes every linear weight but `lm_head` to bitsandbytes'
        4-bit format while loading, tensor by tensor, so host memory holds the quantized model
        and one float tensor at a time; `double_quant` and `blocksize` as in bitsandbytes.
        A checkpoint that transformers saved with a bitsandbytes 4-bit `quantization_config`
        loads quantized as it is, without this argument.
    dtype: of the float params, and the compute dtype of the model (its activations and the
        quantized matmuls). Default: float32; for a quantized model bfloat16 on GPU and TPU and
        float32 on CPU (`jpeft.quant.default_compute_dtype`).
    mesh: a `jax.sharding.Mesh`: each leaf goes straight to its shards by the partition `rules`
        (default: the family's, see `jpeft.sharding`), so no device ever holds a whole model;
        on several hosts each host reads the checkpoint and places its own devices' parts.
    """
    quantization = None
    if quantize is not None:
        quantization = QuantConfig(quantize, blocksize, double_quant)
    place = None
    if mesh is not None:
        place = sharding.loading_placer(mesh, rules)
    if is_gguf_path(path):
        dtype = hf_loading.default_dtype(dtype, quantization is not None)
        return gguf_loading.load_gguf(path, dtype, quantization=quantization, place=place)
    hf_config = hf_loading.read_config(path)
    model = hf_loading.from_hf_config(hf_config)
    tensors = hf_loading.iter_checkpoint_tensors(path)
    saved = bnb_checkpoint.saved_quantization(hf_config, str(path))
    if saved is not None:
        bnb_checkpoint.check_request(saved, quantization, str(path))
        tensors = bnb_checkpoint.combine_4bit_weights(tensors, hf_loading.checkpoint_keys(path))
    dtype = hf_loading.default_dtype(dtype, saved is not None or quantization is not None)
    params = hf_loading.place_tensors(model.config, tensors, dtype, str(path), quantization, place)
    return model, params
