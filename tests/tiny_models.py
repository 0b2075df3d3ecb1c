"""Tiny random transformers models for the tests that compare jpeft with transformers."""

from __future__ import annotations

import torch
import transformers

# A tiny Llama for jpeft's own model (`jpeft.models.from_hf_config`), for tests that need no
# transformers counterpart.
TINY_LLAMA = dict(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=64,
)


def random_causal_lm(config_cls: str, config_kwargs: dict, seed: int = 0):
    """A tiny transformers CausalLM (eager attention, eval mode) with randomized norms and biases,
    so that a weight mapped to the wrong place changes the logits."""
    config = getattr(transformers, config_cls)(**config_kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()
