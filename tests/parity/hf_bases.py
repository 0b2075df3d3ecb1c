"""The tiny random transformers bases the weight-method parity tests share (LoRA, IA3).

Each family has randomized biases so a bias handled wrongly changes the logits; jpeft loads the
same safetensors checkpoint transformers saved.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

import jpeft

SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.1,
)

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=4)),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
    # sliding and global layers with their own RoPE bases, softcapped logits
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            head_dim=16,
            sliding_window=4,
            sliding_window_pattern=2,
            query_pre_attn_scalar=12,
            final_logit_softcapping=3.0,
            rope_local_base_freq=100.0,
            eos_token_id=None,  # greedy generations run their full length, as jpeft's
        ),
    ),
}


def build_base(family: str, path, sizes: dict = SMALL):
    """Save a tiny random `family` model at `path`; (path, jpeft model, params, ids [2, 9]).

    `sizes`: the config's dimensions (SMALL, or larger ones where a library needs them).
    """
    config_cls, overrides = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**sizes, **overrides})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    hf.save_pretrained(path, safe_serialization=True)
    model, params = jpeft.models.from_pretrained(path)
    ids = np.random.default_rng(1).integers(0, sizes["vocab_size"], (2, 9))
    return path, model, params, ids


def load_hf(path):
    """The saved transformers model, eager attention, eval mode."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager"
    ).eval()


def perturb_torch(model) -> None:
    """Move every trainable PEFT parameter away from its init (B non-zero, m != ||W||...)."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def torch_logits(model, ids) -> np.ndarray:
    """Logits [batch, seq, vocab] of a transformers/PEFT model, without gradients."""
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()
