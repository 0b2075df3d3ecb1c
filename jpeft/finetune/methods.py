"""The PEFT config each `jpeft finetune --method` trains, with the job's per-method defaults.

- lora: all seven projections of the top `--train-layers` layers (default 40%); the layers below
  run without a backward pass.
- ia3: PEFT's IA3 targets for the architecture (k/v or q/v projections and down_proj, down_proj
  scaling its input) on the same top layers.
- prompt-tuning: `--virtual-tokens` embeddings initialised from the task instruction's tokens
  (PEFT's TEXT init), so training starts from a prompt that already describes the task.
- p-tuning: PEFT's MLP prompt encoder.
- prefix-tuning: a key/value prefix in every layer, starting from zeros (PEFT's default N(0, 1)
  prefix scrambles a pretrained model's attention: SmolLM2's loss starts near 9 with it).

Prompt methods change the input of the first layer (or every layer), so they always train
through all layers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jpeft
from jpeft.methods import ia3

TRAIN_LAYER_SHARE = 0.4  # default --train-layers: adapt the top 40% of the layers
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Peak learning rates for the job's short runs (80 steps), one per method.
DEFAULT_LR = {
    "lora": 2e-3,
    "ia3": 1e-2,
    "prompt-tuning": 3e-2,
    "p-tuning": 3e-3,
    "prefix-tuning": 1e-2,
}
METHODS = tuple(DEFAULT_LR)


class MethodError(ValueError):
    """An option that does not fit the chosen method."""


def adapter_config(
    options: Any, model: Any, model_path: str, instruction: str
) -> jpeft.config.PeftConfig:
    """The PEFT config for `options.method` (a FinetuneConfig) on `model`."""
    common = dict(task_type="CAUSAL_LM", base_model_name_or_path=model_path)
    layers = model.config.num_hidden_layers
    if options.method == "lora":
        train_layers = top_layers(options.train_layers, layers)
        targets = options.target_modules or "all-linear"
        if train_layers and targets == "all-linear":
            targets = list(LINEAR_NAMES)  # layers_to_transform needs a list of names, as in PEFT
        return jpeft.LoraConfig(
            layers_to_transform=train_layers,
            r=options.r,
            lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout,
            target_modules=targets,
            **common,
        )
    if options.method == "ia3":
        model_type = model.config.model_type
        names = options.target_modules or ia3.DEFAULT_TARGETS.get(model_type)
        if names is None or isinstance(names, str):
            raise MethodError(
                "--method ia3 needs --target-modules as a comma-separated list of module names "
                f"for model type {model_type!r}"
            )
        feedforward = [n for n in ia3.DEFAULT_FEEDFORWARD.get(model_type, ()) if n in names]
        return jpeft.IA3Config(
            target_modules=layer_regex(names, top_layers(options.train_layers, layers)),
            feedforward_modules=feedforward,
            **common,
        )
    tokens = options.virtual_tokens
    if options.method == "prompt-tuning":
        return jpeft.PromptTuningConfig(
            num_virtual_tokens=tokens,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=instruction,
            tokenizer_name_or_path=model_path,
            **common,
        )
    if options.method == "p-tuning":
        return jpeft.PromptEncoderConfig(num_virtual_tokens=tokens, **common)
    return jpeft.PrefixTuningConfig(num_virtual_tokens=tokens, init_weights="zero", **common)


def top_layers(train_layers: int | None, layers: int) -> list[int] | None:
    """The indices of the top `train_layers` layers (None: the top 40%; 0: all, as None)."""
    if train_layers is None:
        train_layers = max(1, round(TRAIN_LAYER_SHARE * layers))
    if not 0 <= train_layers <= layers:
        raise MethodError(f"--train-layers {train_layers}: the model has {layers} layers")
    return list(range(layers - train_layers, layers)) if train_layers else None


def layer_regex(names: Sequence[str], layers: list[int] | None) -> str | list[str]:
    """PEFT target_modules for `names` in `layers` only: a full-match regex (IA3 has no
    `layers_to_transform`), or the plain names for all layers."""
    if layers is None:
        return list(names)
    alternatives = "|".join(re.escape(name) for name in names)
    indices = "|".join(str(i) for i in layers)
    return rf"model\.layers\.({indices})\.\w+\.({alternatives})"
