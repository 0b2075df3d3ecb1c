"""The `jpeft` command: `jpeft finetune` (the main job), `jpeft generate`, `jpeft serve` and
`jpeft export`.

User mistakes (a missing model file, a data file without the needed columns, an unknown method, a
sequence length the model cannot take, a bad adapter file: every ValueError jpeft raises on user
input) print one line naming the problem and exit with code 2. A run that stops early prints what
it kept: code 1 when the loss became NaN/inf, 130 on Ctrl-C, 143 on SIGTERM. Set
JPEFT_TRACEBACK=1 to see the full traceback instead. Any other exception is a bug in jpeft and
shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

from jpeft.finetune.options import FinetuneConfig, JobError, check_types
from jpeft.finetune.stopping import RunStopped, Terminated
from jpeft.method import registered

REGEX_CHARACTERS = "\\.*+?()[]|^$"
USER_ERRORS = (OSError, ValueError)  # JobError, DataError, CheckpointError are ValueErrors


class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors in one line (not the whole usage block first), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def finetune_parser(sub) -> None:
    parser = sub.add_parser("finetune", help="fine-tune a model and measure it before and after")
    defaults = FinetuneConfig()
    options = {
        "model": "HF checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct)",
        "data": "json/jsonl/csv with prompt/completion or text/label columns (default: BBC News)",
        "output_dir": "where metrics.json, loss.png and adapter/ go: a new or empty folder, or "
        "a previous jpeft output with --overwrite",
        "overwrite": "replace the previous jpeft output in --output-dir (only one jpeft wrote)",
        "method": "the PEFT method, one of the registered methods: "
        + "; ".join(f"{name} ({m.job_help})" for name, m in registered().items()),
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
        + ", ".join(f"{name} {m.default_lr:g}" for name, m in registered().items())
        + ")",
        "warmup_steps": "linear warm-up steps",
        "test_size": "examples held out for the accuracy test",
        "eval_batch_size": "examples per evaluation forward",
        "seed": "seed of the split, init and order",
        "skip_bad_rows": "drop malformed data rows (empty label, extra fields, bad JSON, "
        "undecodable bytes) and report how many, instead of stopping at the first",
        "quantize": "load the base quantized to 4 bits, nf4 or fp4, double-quantized (QLoRA)",
        "mesh": "shard over a device mesh, e.g. data=2,fsdp=-1,model=1 (-1: the remaining "
        "devices; the product is the device count of all hosts)",
        "distributed": "start JAX's multi-host runtime first and run the same command on every "
        "host (TPU pods are detected; elsewhere set JAX_COORDINATOR_ADDRESS=host:port, "
        "JAX_NUM_PROCESSES and JAX_PROCESS_ID)",
        "checkpoint_dir": "save the train state there (orbax, async, atomic; a path or gs://); "
        "rerunning the command resumes from the latest checkpoint",
        "checkpoint_every": "steps between checkpoints",
        "remat": "activation checkpointing per layer: dots (keep matmul outputs), full (keep "
        "layer inputs only) or none",
        "report_to": "live training dashboards: tensorboard, wandb, both comma-separated, or none "
        "(loss, learning rate, tokens/s per step; scores, parameter counts and the run config); "
        "W&B runs offline when no API key is configured",
        "logging_dir": "the dashboards' folder (outside --output-dir): each run writes to a new "
        "<logging-dir>/<date-time>-<method>/ (tensorboard --logdir <logging-dir> shows them)",
    }
    parser.add_argument(
        "--config",
        default=None,
        help="a JSON file of these options (keys with underscores); flags given override it",
    )
    hints = typing.get_type_hints(FinetuneConfig)
    for field in dataclasses.fields(FinetuneConfig):
        default = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{options[field.name]} (default: {default})".replace("%", "%%")
        if hints[field.name] is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        kinds = typing.get_args(hints[field.name]) or (hints[field.name],)
        kind = next((t for t in (int, float) if t in kinds), str)  # what argparse converts to
        parser.add_argument(flag, type=kind, default=default, help=help_text)


def config_file_options(path: str) -> dict:
    """The options in a `--config` JSON file; ValueError naming unknown keys or bad JSON."""
    try:
        with open(path) as f:
            values = json.load(f)
    except OSError as err:
        raise ValueError(f"--config {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--config {path} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a JSON object of options")
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown options {unknown}; known: {sorted(known)}")
    check_types(values, f"--config {path}")
    return values


def generate_parser(sub) -> None:
    parser = sub.add_parser("generate", help="greedy generation, with an optional adapter")
    parser.add_argument("prompt", help="the user message (the chat template is applied if any)")
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2)")
    parser.add_argument("--adapter", default=None, help="a PEFT adapter directory")
    parser.add_argument(
        "--adapter-name", default=None, help="which adapter of a multi-adapter directory"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="at least 1")


def serve_parser(sub) -> None:
    parser = sub.add_parser("serve", help="serve completions for LoRA adapters over HTTP")
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2)")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a LoRA adapter to serve as model NAME (repeat for more; more load at run time)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=16, help="requests per generate call")
    parser.add_argument(
        "--batch-window-ms", type=float, default=10.0, help="how long to gather a batch"
    )


EXPORT_FORMATS = {
    "hf": "a merged Hugging Face checkpoint folder (config, safetensors, tokenizer)",
    "gguf": "a merged GGUF file for llama.cpp",
    "gguf-lora": "the LoRA adapter alone as a llama.cpp GGUF LoRA file",
}


def export_parser(sub) -> None:
    parser = sub.add_parser("export", help="write a fine-tuned model for deployment tools")
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2)")
    parser.add_argument("--adapter", default=None, help="a PEFT adapter directory to merge in")
    parser.add_argument(
        "--adapter-name", default=None, help="which adapter of a multi-adapter directory"
    )
    parser.add_argument("--out", required=True, help="the new folder (hf) or file (gguf) to write")
    parser.add_argument(
        "--format",
        default="hf",
        choices=list(EXPORT_FORMATS),
        help="; ".join(f"{name}: {text}" for name, text in EXPORT_FORMATS.items()),
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="hf: float32, float16 or bfloat16 (default: the loaded model's, float32)",
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="hf: larger checkpoints are written in shards"
    )
    parser.add_argument(
        "--quantize",
        default=None,
        choices=["nf4", "fp4"],
        help="hf: load the base 4-bit and keep it 4-bit (bitsandbytes format) in the export",
    )
    parser.add_argument(
        "--outtype", default=None, help="gguf: the tensor type, e.g. f32, f16, bf16, q8_0"
    )
    parser.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="hf, gguf: write no tokenizer (for a base folder without one)",
    )


def run_export(args: argparse.Namespace) -> None:
    import jpeft
    from jpeft import export
    from jpeft.export.hf_checkpoint import parse_size
    from jpeft.export.merged import EXPORT_DTYPES
    from jpeft.export.staging import check_new
    from jpeft.finetune.job import default_model_path

    path = args.model or default_model_path()
    if args.dtype is not None and args.dtype not in EXPORT_DTYPES:
        raise JobError(f"--dtype {args.dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    parse_size(args.max_shard_size)
    if args.format == "gguf-lora" and args.adapter is None:
        raise JobError("--format gguf-lora exports an adapter: give --adapter DIR")
    if args.format != "hf" and (args.dtype or args.quantize):
        raise JobError(
            f"--dtype and --quantize apply to --format hf; for {args.format} use --outtype"
        )
    if args.format == "hf" and args.outtype:
        raise JobError("--outtype applies to the gguf formats; for --format hf use --dtype")
    check_new(args.out, "--out")
    _, params = jpeft.models.from_pretrained(path, quantize=args.quantize)
    adapter = chosen_adapter(args, params)
    gguf_options = {} if args.outtype is None else {"outtype": args.outtype}
    if args.format == "hf":
        written = export.save_merged_checkpoint(
            args.out,
            path,
            params,
            adapter,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            keep_4bit=args.quantize is not None,
            tokenizer=not args.no_tokenizer,
        )
    elif args.format == "gguf":
        written = export.save_merged_gguf(
            args.out, path, params, adapter, tokenizer=not args.no_tokenizer, **gguf_options
        )
    else:
        written = export.save_lora_gguf(args.out, adapter, params, base=path, **gguf_options)
    print(f"wrote {written}")


def run_serve(args: argparse.Namespace) -> None:
    from jpeft.finetune.job import default_model_path

    adapters = {}
    for entry in args.adapter:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise JobError(f"--adapter {entry!r}: use NAME=DIR")
        if name in adapters:
            raise JobError(f"--adapter {name}: given twice")
        adapters[name] = path
    if args.max_batch < 1 or args.batch_window_ms < 0:
        raise JobError("--max-batch must be >= 1 and --batch-window-ms >= 0")
    try:
        from jpeft.serve import serve
    except ImportError as err:
        raise JobError(f"jpeft serve needs aiohttp ({err}): pip install 'jpeft[serve]'") from None
    serve(
        args.model or default_model_path(),
        adapters,
        args.host,
        args.port,
        args.max_batch,
        args.batch_window_ms / 1000,
    )


def run_finetune(args: argparse.Namespace, explicit: set[str]) -> None:
    """`explicit`: the options given as flags; they win over the `--config` file's."""
    from jpeft.finetune.job import run

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)}
    if args.config:
        from_file = config_file_options(args.config)
        options.update({k: v for k, v in from_file.items() if k not in explicit})
    targets = options["target_modules"]
    if (
        isinstance(targets, str)
        and targets != "all-linear"
        and not set(targets) & set(REGEX_CHARACTERS)
    ):
        options["target_modules"] = targets.split(",")  # names, not a regex
    run(FinetuneConfig(**options))


def chosen_adapter(args: argparse.Namespace, params):
    """The adapter `--adapter` (and `--adapter-name`) name, loaded on `params`; None without one.
    JobError for a multi-adapter folder without `--adapter-name`."""
    import jpeft

    if not args.adapter:
        return None
    adapter = jpeft.load_pretrained(args.adapter, params, adapter_name=args.adapter_name)
    if isinstance(adapter, dict):
        raise JobError(
            f"--adapter {args.adapter} holds several adapters ({', '.join(adapter)}); choose one "
            "with --adapter-name"
        )
    return adapter


def run_generate(args: argparse.Namespace) -> None:
    import jax.numpy as jnp

    import jpeft
    from jpeft.finetune.job import default_model_path

    if args.max_new_tokens < 1:
        raise JobError(f"--max-new-tokens {args.max_new_tokens}: must be an integer >= 1")
    path = args.model or default_model_path()
    model, params = jpeft.models.from_pretrained(path)
    tokenizer = jpeft.models.load_tokenizer(path)
    adapter = chosen_adapter(args, params)
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


def explicit_options(argv: list[str] | None) -> set[str]:
    """The option names (underscored) that appear as flags in `argv`."""
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="jpeft", description="parameter-efficient fine-tuning")
    sub = parser.add_subparsers(dest="command")
    finetune_parser(sub)
    generate_parser(sub)
    serve_parser(sub)
    export_parser(sub)
    args = parser.parse_args(argv)
    if args.command is None:  # plain `jpeft` runs the main job
        args = parser.parse_args(["finetune"])
    try:
        if args.command == "finetune":
            run_finetune(args, explicit_options(argv))
        elif args.command == "serve":
            run_serve(args)
        elif args.command == "export":
            run_export(args)
        else:
            run_generate(args)
    except (*USER_ERRORS, RunStopped, KeyboardInterrupt, Terminated) as err:
        if os.environ.get("JPEFT_TRACEBACK"):
            raise
        message, code = stop_report(err)
        print(f"jpeft {args.command}: {message}", file=sys.stderr)
        return code
    return 0


def stop_report(err: BaseException) -> tuple[str, int]:
    """The one line and exit code for an error or early stop."""
    if isinstance(err, RunStopped):
        return f"stopped: {err}", err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C); nothing was written", 130
    if isinstance(err, Terminated):
        return "terminated (SIGTERM); nothing was written", 143
    return f"error: {err}", 2


if __name__ == "__main__":
    sys.exit(main())
