"""A LoRA adapter alone as a llama.cpp GGUF LoRA file (what `convert_lora_to_gguf.py` writes),
which llama.cpp applies to the base GGUF at run time (`llama-cli --lora`), so one base file
serves many adapters.

Format: `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, and per
adapted weight `<gguf name>.lora_a` [r, in] and `.lora_b` [out, r] (`blk.3.attn_q.weight.lora_a`);
on the embedding table `token_embd.weight.lora_a` is PEFT's `lora_embedding_A` transposed
[vocab, r] and `.lora_b` [dim, r]. For the llama architecture the rows of a q/k `lora_b` are
permuted like the base weight's.

Scaling: llama.cpp adds `alpha / r * B A x` per pair, `r` the pair's rank (`B A x` when alpha is
0); PEFT's scaling is `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA, with per-module r
and alpha from `rank_pattern` / `alpha_pattern`. The file's alpha is the config's `lora_alpha`,
and where a module's PEFT scaling differs from `alpha / r`, the ratio is folded into its
`lora_b`, so llama.cpp computes PEFT's delta exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFType, GGUFWriter, Keys

from jpeft.adapter import Adapter
from jpeft.export.gguf_model import (
    GgufTensor,
    base_config,
    check_fits,
    gguf_architecture,
    host_array,
    outtype_types,
    tensor_type,
    write_gguf,
)
from jpeft.export.merged import is_tied
from jpeft.method import method_for
from jpeft.methods.lora import A_KEY, B_KEY, EMB_A_KEY, EMB_B_KEY, Lora, is_embedding
from jpeft.methods.lora import to_saved as plain_lora
from jpeft.methods.trainable_tokens import LORA_ROWS_KEY
from jpeft.models.gguf_loading import PERMUTED_QK_ARCHITECTURES, gguf_tensor_name, rotary_heads
from jpeft.models.llama import ModelConfig

_MERGED_HINT = "export the merged model instead (save_merged_gguf, `jpeft export --format gguf`)"


def save_lora_gguf(
    out_file: str | os.PathLike,
    adapter: Adapter,
    params: Mapping[str, Any],
    *,
    base: str | os.PathLike | None = None,
    outtype: str = "f32",
) -> Path:
    """Write LoRA `adapter` (made on `params`) as a llama.cpp GGUF LoRA file `out_file`; returns
    its path. Written whole or not at all; `out_file` must be new.

    base: the checkpoint folder or GGUF file `params` were loaded from (its architecture and
        head counts); default: the adapter's `base_model_name_or_path`, if that is a local path.
    outtype: the type of the lora_a / lora_b tensors (see gguf_model.OUTTYPES; F16 where a
        type's block does not divide the rank).
    ValueError for what a llama.cpp LoRA cannot hold: other methods, DoRA, trainable tokens,
    `modules_to_save` copies and biases, a head or table LoRA on a tied-embedding model.
    """
    qtype, _ = outtype_types(outtype)
    tied = is_tied(params)
    check_expressible(adapter, tied)
    base = _base_path(adapter, base)
    _, config = base_config(base, tied)
    check_fits(params, config, base)
    arch = gguf_architecture(config)
    adapter = plain_lora(adapter)  # PiSSA / OLoRA: the plain LoRA PEFT saves, on the base
    alpha = float(adapter.config.lora_alpha)
    tensors = [
        GgufTensor(name, array.shape, tensor_type(name, array.shape, qtype), lambda a=array: a)
        for name, array in lora_tensors(adapter, config, arch, alpha)
    ]

    def metadata(writer: GGUFWriter) -> None:
        writer.add_type(GGUFType.ADAPTER)
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(Path(out_file).stem)
        writer.add_quantization_version(GGML_QUANT_VERSION)

    return write_gguf(out_file, arch, metadata, tensors)


def check_expressible(adapter: Adapter, tied: bool) -> None:
    """ValueError, with the reason and what to do, for an adapter llama.cpp's LoRA cannot apply
    as jpeft and PEFT do (`tied`: the model's head reads the embedding table)."""
    config = adapter.config
    if method_for(config).is_prompt_learning:
        raise ValueError(
            f"a {config.peft_type} adapter adds virtual tokens or an attention prefix, which "
            "neither a llama.cpp LoRA file nor merged weights can hold; ship the adapter folder "
            "(PEFT format, jpeft.save_pretrained) for PeftModel.from_pretrained"
        )
    if config.peft_type != Lora.peft_type:  # AdaLoRA's config is a LoraConfig too
        raise ValueError(
            f"a {config.peft_type} adapter cannot be written as a llama.cpp LoRA file, which "
            f"holds only low-rank pairs B A added to the weights; {_MERGED_HINT}"
        )
    if config.use_dora:
        raise ValueError(
            "a DoRA adapter (use_dora=True) rescales each output row by its magnitude over the "
            f"row norm of W + s B A, which llama.cpp's LoRA (W x + s B A x) cannot; {_MERGED_HINT}"
        )
    tokens = [m for m, pieces in adapter.weights.items() if LORA_ROWS_KEY in pieces]
    if tokens or adapter.overrides:
        replaced = tokens or sorted(adapter.overrides)
        raise ValueError(
            f"the adapter replaces {replaced[:3]} (trainable_token_indices, modules_to_save or "
            f"trainable biases), which a llama.cpp LoRA file cannot carry; {_MERGED_HINT}"
        )
    tied_targets = [m for m in adapter.weights if m in ("lm_head", "model.embed_tokens")]
    if tied and tied_targets:
        raise ValueError(
            f"the adapter targets {tied_targets} of a model whose head is tied to the embedding "
            "table: llama.cpp runs that head on token_embd.weight itself, so it applies a table "
            "LoRA to the head too (and aborts: the shapes do not fit) and has no output.weight "
            f"for a head LoRA; {_MERGED_HINT}"
        )


def _base_path(adapter: Adapter, base: str | os.PathLike | None) -> str | os.PathLike:
    """`base`, else the adapter's `base_model_name_or_path` when it names a local path."""
    if base is not None:
        return base
    named = adapter.config.base_model_name_or_path
    if named is None or not Path(named).exists():
        raise ValueError(
            f"the adapter's base_model_name_or_path ({named!r}) is not a local checkpoint folder "
            "or GGUF file; pass base= (the one the params were loaded from): a llama.cpp LoRA "
            "records the base's architecture, and llama's q/k rows are permuted by head count"
        )
    return named


def llama_cpp_scaling(alpha: float, rank: int) -> float:
    """The factor llama.cpp multiplies a rank-`rank` pair by for file alpha `alpha`."""
    return alpha / rank if alpha else 1.0


def lora_tensors(
    adapter: Adapter, config: ModelConfig, arch: str, alpha: float
) -> list[tuple[str, np.ndarray]]:
    """`(gguf name, float32 array)` of every lora_a / lora_b, PEFT's scaling folded into lora_b
    where llama.cpp's `alpha / r` differs from it (see the module docstring)."""
    permuted = arch in PERMUTED_QK_ARCHITECTURES
    tensors = []
    for module, pieces in adapter.weights.items():
        weight = f"{module}.weight"
        name = gguf_tensor_name(weight)
        if name is None:
            raise ValueError(f"{module} has no GGUF name; llama.cpp cannot apply a LoRA there")
        if is_embedding(pieces):
            lora_a = np.ascontiguousarray(host_array(pieces[EMB_A_KEY], None).T)
            lora_b, rank = host_array(pieces[EMB_B_KEY], None), lora_a.shape[1]
        else:
            heads = rotary_heads(weight, config) if permuted else None
            lora_a = host_array(pieces[A_KEY], None)
            lora_b, rank = host_array(pieces[B_KEY], heads), lora_a.shape[0]
        ratio = adapter.config.scaling_for(module) / llama_cpp_scaling(alpha, rank)
        tensors += [(f"{name}.lora_a", lora_a), (f"{name}.lora_b", lora_b * np.float32(ratio))]
    return tensors
