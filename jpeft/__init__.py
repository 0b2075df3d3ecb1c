"""jpeft: parameter-efficient fine-tuning for JAX, interoperable with Hugging Face PEFT."""

from jpeft import checkpoint, models, ops, sharding, train
from jpeft.adapter import (
    Adapter,
    init_adapter,
    inject,
    is_trainable,
    merge,
    partition,
    prompt_of,
    unmerge,
)
from jpeft.methods.ia3 import IA3Config
from jpeft.methods.lora import LoraConfig
from jpeft.methods.p_tuning import PromptEncoderConfig
from jpeft.methods.prefix_tuning import PrefixTuningConfig
from jpeft.methods.prompt_tuning import PromptTuningConfig
from jpeft.peft_format import load_pretrained, save_pretrained
from jpeft.train import optax_mask, trainable_mask
from jpeft.tree import combine

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "IA3Config",
    "LoraConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "checkpoint",
    "combine",
    "init_adapter",
    "inject",
    "is_trainable",
    "load_pretrained",
    "merge",
    "models",
    "ops",
    "optax_mask",
    "partition",
    "prompt_of",
    "save_pretrained",
    "sharding",
    "train",
    "trainable_mask",
    "unmerge",
]
