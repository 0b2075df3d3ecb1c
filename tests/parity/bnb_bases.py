"""bitsandbytes 4-bit (QLoRA) versions of the tiny transformers bases in `hf_bases`, on CPU.

transformers quantizes on load (`BitsAndBytesConfig(load_in_4bit=True)`) without CUDA: every
`nn.Linear` becomes a `bitsandbytes.nn.Linear4bit` except `lm_head` (the output embeddings, the
last parameter and tied weights are skipped; passing `llm_int8_skip_modules` replaces that default
list). Embeddings, norms and biases stay float32. On CPU a `Linear4bit` forward is
`F.linear(x, dequantize_4bit(weight), bias)` in the compute dtype (float32 here), so its logits
equal those of the float model whose linear weights are the dequantized ones, bit for bit.

transformers always uses bitsandbytes' default blocksize (64); other blocksizes are made by
quantizing the float checkpoint's weights with `bitsandbytes.nn.Params4bit` directly, which gives
the same bytes as transformers at 64. A model loaded from a saved 4-bit checkpoint cannot be saved
again (transformers 5.23 raises NotImplementedError, huggingface/transformers#45743): save the
model quantized on load instead.
"""

from __future__ import annotations

import bitsandbytes as bnb
import numpy as np
import torch
import transformers
from bitsandbytes.functional import dequantize_4bit
from hf_bases import SMALL
from safetensors.torch import load_file

# Every linear layer's input size a multiple of the blocksizes tested (64, 128): bitsandbytes'
# native CPU dequantize kernel (0.50, used on AVX-512 machines) starts a new block at each row,
# so its values are wrong for rows that are not whole blocks, which real models never have.
QLORA_SIZES = dict(SMALL, hidden_size=128, intermediate_size=256)
BNB_CONFIGS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
TRANSFORMERS_BLOCKSIZE = 64


def bnb_config(quant_type: str, double_quant: bool) -> transformers.BitsAndBytesConfig:
    """The 4-bit config: `quant_type` "nf4" or "fp4", float32 compute, uint8 storage."""
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.uint8,
    )


def quantized_hf(
    path,
    quant_type: str = "nf4",
    double_quant: bool = False,
    blocksize: int = TRANSFORMERS_BLOCKSIZE,
):
    """The float32 checkpoint at `path` quantized to 4 bits on load; eager attention, eval mode."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=bnb_config(quant_type, double_quant),
        dtype=torch.float32,
        device_map="cpu",
        attn_implementation="eager",
    )
    if blocksize != TRANSFORMERS_BLOCKSIZE:
        _requantize(model, load_file(f"{path}/model.safetensors"), blocksize)
    return _float32_compute(model).eval()


def load_quantized_hf(path):
    """A saved bitsandbytes 4-bit checkpoint (config.json has `quantization_config`), eval mode."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map="cpu", attn_implementation="eager"
    )
    return _float32_compute(model).eval()


def save_quantized(
    path,
    out_dir,
    quant_type: str = "nf4",
    double_quant: bool = False,
    blocksize: int = TRANSFORMERS_BLOCKSIZE,
):
    """Write the checkpoint at `path`, quantized, as transformers saves it; returns `out_dir`.

    Per quantized linear `<m>`: `<m>.weight` uint8 [out * in / 2, 1], `<m>.weight.absmax`
    float32 [blocks] (uint8 when double-quantized, then also `.nested_absmax` float32 and
    `.nested_quant_map` float32 [256]), `<m>.weight.quant_map` float32 [16] and
    `<m>.weight.quant_state.bitsandbytes__<quant_type>`, uint8 bytes of a JSON header.
    """
    quantized_hf(path, quant_type, double_quant, blocksize).save_pretrained(
        out_dir, safe_serialization=True
    )
    return out_dir


def dequantized_weights(model) -> dict[str, np.ndarray]:
    """`<module path>.weight` -> float32 [out, in] for every 4-bit linear, as bitsandbytes sees it.

    Works on the bare model and on a PEFT model wrapping it (paths then carry PEFT's prefixes).
    """
    return {
        f"{name}.weight": dequantize_4bit(m.weight.data, m.weight.quant_state).numpy()
        for name, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


def _requantize(model, float_weights: dict[str, torch.Tensor], blocksize: int) -> None:
    """Quantize every 4-bit linear again from its float weight, with `blocksize`."""
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.weight = bnb.nn.Params4bit(
                float_weights[f"{name}.weight"],
                requires_grad=False,
                blocksize=blocksize,
                compress_statistics=m.weight.compress_statistics,
                quant_type=m.weight.quant_type,
                quant_storage=torch.uint8,
                module=m,
            ).to("cpu")


def _float32_compute(model):
    """Keep the dequantize-then-float32-matmul path on every CPU.

    On CPUs with AVX512-BF16, bitsandbytes repacks the weights of a `Linear4bit` in eval mode
    and computes its no-grad forward in bfloat16; turning that off keeps logits float32-exact.
    """
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model
