"""Exports of a model with its adapter merged in: a Hugging Face checkpoint folder, GGUF files
for llama.cpp (the merged model, or a LoRA adapter alone)."""

from jpeft.export.gguf_lora import save_lora_gguf
from jpeft.export.gguf_model import save_merged_gguf
from jpeft.export.hf_checkpoint import save_merged_checkpoint
from jpeft.export.merged import merged_params

__all__ = ["merged_params", "save_lora_gguf", "save_merged_checkpoint", "save_merged_gguf"]
