"""Llama-family models (Llama, Mistral, Qwen2, Qwen3); HF checkpoint and GGUF loading."""

from jpeft.models.gguf_loading import load_gguf
from jpeft.models.hf_loading import (
    config_from_hf,
    from_hf_config,
    iter_checkpoint_tensors,
    place_tensors,
)
from jpeft.models.inputs import checked
from jpeft.models.llama import LlamaForCausalLM, ModelConfig, param_shapes
from jpeft.models.pretrained import from_pretrained
from jpeft.models.rope import RopeScaling
from jpeft.tokenizer import load_tokenizer

__all__ = [
    "LlamaForCausalLM",
    "ModelConfig",
    "RopeScaling",
    "checked",
    "config_from_hf",
    "from_hf_config",
    "from_pretrained",
    "iter_checkpoint_tensors",
    "load_gguf",
    "load_tokenizer",
    "param_shapes",
    "place_tensors",
]
