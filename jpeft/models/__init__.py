"""Llama-family models (Llama, Mistral, Qwen2, Qwen3) and Hugging Face checkpoint loading."""

from jpeft.models.hf_loading import (
    config_from_hf,
    from_hf_config,
    from_pretrained,
    iter_checkpoint_tensors,
    place_tensors,
)
from jpeft.models.llama import LlamaForCausalLM, ModelConfig, param_shapes
from jpeft.models.rope import RopeScaling

__all__ = [
    "LlamaForCausalLM",
    "ModelConfig",
    "RopeScaling",
    "config_from_hf",
    "from_hf_config",
    "from_pretrained",
    "iter_checkpoint_tensors",
    "param_shapes",
    "place_tensors",
]
