"""Tiny random transformers models for the tests that compare jpeft with transformers."""

from __future__ import annotations

import tokenizers
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


# The word-level vocabulary of `save_word_level_llama` and a topic task over it.
WORDS = "the a market shares bank profit film actor music award vote minister party election"
WORDS = WORDS.split()
TOPICS = ["money", "show", "state"]
TOPIC_WORDS = {"money": WORDS[2:6], "show": WORDS[6:10], "state": WORDS[10:14]}


def save_word_level_llama(path):
    """A tiny Llama with a word-level tokenizer over WORDS and TOPICS, saved as a HF directory
    at `path` (tied embeddings, a random base with signal in it, so a small adapter learns fast).
    """
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS, *TOPICS])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        initializer_range=0.3,  # a random base with signal in it, so a small LoRA learns fast
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path
