"""The `jpeft` command: `jpeft finetune` (the main job) and `jpeft generate`.

User mistakes (a missing model file, a data file without the needed columns, an unknown method, a
sequence length the model cannot take) print one line naming the problem and exit with code 2.
Set JPEFT_TRACEBACK=1 to see the full traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from jpeft.finetune.data import DataError
from jpeft.finetune.job import FinetuneConfig, JobError
from jpeft.finetune.methods import DEFAULT_LR, METHODS

REGEX_CHARACTERS = "\\.*+?()[]|^$"
USER_ERRORS = (JobError, DataError, FileNotFoundError, ValueError)


def finetune_parser(sub) -> None:
    parser = sub.add_parser("finetune", help="fine-tune a model and measure it before and after")
    defaults = FinetuneConfig()
    options = {
        "model": "HF checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct)",
        "data": "json/jsonl/csv with prompt/completion or text/label columns (default: BBC News)",
        "output_dir": "where metrics.json, loss.png and adapter/ go",
        "method": "the PEFT method: " + ", ".join(METHODS),
        "r": "LoRA rank",
        "lora_alpha": "LoRA alpha (scaling alpha / r)",
        "lora_dropout": "dropout on the LoRA branch",
        "target_modules": "module names (comma-separated), a regex, or all-linear "
        "(default: all-linear for lora, PEFT's defaults for ia3)",
        "train_layers": "LoRA/IA3 on the last N layers only, the layers below run without "
        "backward; 0 = all layers, default: the top 40%",
        "virtual_tokens": "virtual tokens of prompt-tuning, p-tuning and prefix-tuning",
        "steps": "optimizer steps",
        "batch_size": "examples per step",
        "seq_len": "tokens per example (prompt + answer)",
        "text_tokens": "article/text tokens kept in each prompt",
        "lr": "peak learning rate (AdamW, warm-up then cosine decay; default per method: "
        + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items())
        + ")",
        "warmup_steps": "linear warm-up steps",
        "test_size": "examples held out for the accuracy test",
        "eval_batch_size": "examples per evaluation forward",
        "seed": "seed of the split, init and order",
        "quantize": "load the base quantized to 4 bits, nf4 or fp4, double-quantized (QLoRA)",
    }
    none_default_kinds = {"train_layers": int, "lr": float}
    for field in dataclasses.fields(FinetuneConfig):
        default = getattr(defaults, field.name)
        kind = type(default) if default is not None else none_default_kinds.get(field.name, str)
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=kind,
            default=default,
            help=f"{options[field.name]} (default: {default})".replace("%", "%%"),
        )


def generate_parser(sub) -> None:
    parser = sub.add_parser("generate", help="greedy generation, with an optional adapter")
    parser.add_argument("prompt", help="the user message (the chat template is applied if any)")
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2)")
    parser.add_argument("--adapter", default=None, help="a PEFT adapter directory")
    parser.add_argument("--max-new-tokens", type=int, default=32)


def run_finetune(args: argparse.Namespace) -> None:
    from jpeft.finetune.job import run

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)}
    targets = options["target_modules"]
    if targets and targets != "all-linear" and not set(targets) & set(REGEX_CHARACTERS):
        options["target_modules"] = targets.split(",")  # names, not a regex
    run(FinetuneConfig(**options))


def run_generate(args: argparse.Namespace) -> None:
    import jax.numpy as jnp

    import jpeft
    from jpeft.finetune.job import default_model_path

    path = args.model or default_model_path()
    model, params = jpeft.models.from_pretrained(path)
    tokenizer = jpeft.models.load_tokenizer(path)
    adapter = jpeft.load_pretrained(args.adapter, params=params) if args.adapter else None
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": args.prompt}]
        ids = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
    else:
        ids = tokenizer.encode(args.prompt)
    prompt = jnp.asarray([ids], jnp.int32)
    tokens = model.generate(params, prompt, args.max_new_tokens, adapter=adapter)
    new = [int(t) for t in tokens[0, len(ids) :]]
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    print(tokenizer.decode(new, skip_special_tokens=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jpeft", description="parameter-efficient fine-tuning")
    sub = parser.add_subparsers(dest="command")
    finetune_parser(sub)
    generate_parser(sub)
    args = parser.parse_args(argv)
    if args.command is None:  # plain `jpeft` runs the main job
        args = parser.parse_args(["finetune"])
    commands = {"finetune": run_finetune, "generate": run_generate}
    try:
        commands[args.command](args)
    except USER_ERRORS as err:
        if os.environ.get("JPEFT_TRACEBACK"):
            raise
        print(f"jpeft {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
