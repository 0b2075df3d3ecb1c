"""jpeft: parameter-efficient fine-tuning for JAX, interoperable with Hugging Face PEFT."""

from jpeft import models, ops, train
from jpeft.adapter import (
    Adapter,
    init_adapter,
    inject,
    is_trainable,
    merge,
    partition,
    unmerge,
)
from jpeft.methods.lora import LoraConfig
from jpeft.peft_format import load_pretrained, save_pretrained
from jpeft.train import optax_mask, trainable_mask
from jpeft.tree import combine

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "LoraConfig",
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
    "save_pretrained",
    "train",
    "trainable_mask",
    "unmerge",
]
