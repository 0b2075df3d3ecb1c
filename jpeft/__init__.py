"""jpeft: parameter-efficient fine-tuning for JAX, interoperable with Hugging Face PEFT.

Every registered method's config class is exported here by name (`jpeft.LoraConfig`,
`jpeft.LoHaConfig`, ...), from the registry: a method file in `jpeft/methods/` is all it takes.
"""

from jpeft import (
    checkpoint,
    export,
    injection,
    memory,
    methods,
    mixed,
    models,
    ops,
    sharding,
    train,
)
from jpeft.adapter import Adapter, is_trainable, partition
from jpeft.hotswap import pad_to
from jpeft.injection import init_adapter, inject, merge, prepare, prompt_of, unmerge
from jpeft.method import PromptMethod, WeightMethod, register, registered
from jpeft.peft_format import load_pretrained, save_pretrained
from jpeft.train import optax_mask, trainable_mask
from jpeft.tree import combine
from jpeft.weighted_adapter import add_weighted_adapter

__version__ = "0.1.0"

_CONFIGS = {method.config_class.__name__: method.config_class for method in registered().values()}
globals().update(_CONFIGS)

__all__ = [
    *sorted(_CONFIGS),
    "Adapter",
    "PromptMethod",
    "WeightMethod",
    "add_weighted_adapter",
    "checkpoint",
    "combine",
    "export",
    "init_adapter",
    "injection",
    "inject",
    "is_trainable",
    "load_pretrained",
    "memory",
    "merge",
    "methods",
    "mixed",
    "models",
    "ops",
    "optax_mask",
    "pad_to",
    "partition",
    "prepare",
    "prompt_of",
    "register",
    "registered",
    "save_pretrained",
    "sharding",
    "train",
    "trainable_mask",
    "unmerge",
]
