"""The main job's adapter exported every way, each export loaded back by the tool that deploys it.

The base is the main job's model (SmolLM2-135M-Instruct from its Q4_1 GGUF file; `--model` for
another) and the adapter the job wrote (`--adapter`, default `jpeft-output/adapter`). Each export
is compared with jpeft's own float32 logits of the base with the adapter applied, on the chat
prompts below (max |difference| relative to the largest logit), and by its greedy continuation
(`--new-tokens` tokens, how many leading tokens agree):

- `jpeft export --format hf` (float32 and bfloat16), loaded by transformers' `from_pretrained`;
- `jpeft export --format gguf` (f32, f16, q8_0), loaded by transformers' GGUF loader and by
  llama.cpp (llama-cpp-python, when it is installed);
- `jpeft export --format gguf-lora`, applied by llama.cpp to the base GGUF file itself.

Run:  python benchmarks/export_roundtrip.py [--json benchmarks/export_roundtrip.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
import transformers

import jpeft
from jpeft import export
from jpeft.finetune.job import default_model_path

PROMPTS = [
    "Which topic is this article about? Shares in the bank rose after profits beat forecasts.",
    "Which topic is this article about? The film won three awards at the festival last night.",
    "Write one sentence about the election.",
]
GGUF_TYPES = ("f32", "f16", "q8_0")


def chat_ids(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )


def relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def agreeing_prefix(actual: list[int], expected: list[int]) -> int:
    count = 0
    for a, b in zip(actual, expected, strict=False):
        if a != b:
            break
        count += 1
    return count


class Reference:
    """jpeft's float32 logits and greedy tokens of the base with the adapter, per prompt."""

    def __init__(self, model, params, adapter, prompts: list[list[int]], new_tokens: int):
        self.prompts, self.new_tokens = prompts, new_tokens
        self.logits, self.greedy = [], []
        for ids in prompts:
            batch = jnp.asarray([ids], jnp.int32)
            self.logits.append(np.asarray(model.apply(params, batch, adapter=adapter))[0])
            tokens = model.generate(params, batch, new_tokens, adapter=adapter)
            self.greedy.append([int(t) for t in tokens[0, len(ids) :]])

    def compare(self, logits_of, greedy_of) -> dict:
        """Worst relative logit difference and least agreeing greedy prefix over the prompts."""
        diffs, agree = [], []
        for ids, logits, greedy in zip(self.prompts, self.logits, self.greedy, strict=True):
            diffs.append(relative_difference(logits_of(ids), logits))
            agree.append(agreeing_prefix(greedy_of(ids, self.new_tokens), greedy))
        return {
            "max_relative_logit_difference": max(diffs),
            "greedy_tokens_agreeing": f"{min(agree)}/{self.new_tokens}",
        }


def transformers_side(model) -> tuple:
    model = model.eval()

    def logits_of(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().numpy()

    def greedy_of(ids, n):
        """Argmax continuation, past end-of-turn tokens as jpeft's and llama.cpp's run here."""
        tokens = list(ids)
        for _ in range(n):
            tokens.append(int(logits_of(tokens)[-1].argmax()))
        return tokens[len(ids) :]

    return logits_of, greedy_of


def llama_cpp_side(model_path: Path, lora_path: Path | None = None) -> tuple:
    import llama_cpp

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain_cpu_buffers():
        """llama.cpp's AMX kernels crash on some CPUs (llama.cpp issue #20824)."""
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = plain_cpu_buffers
    try:
        llm = llama_cpp.Llama(
            model_path=str(model_path),
            lora_path=None if lora_path is None else str(lora_path),
            n_ctx=512,
            logits_all=True,
            verbose=False,
            n_threads=2,
        )
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults

    def logits_of(ids):
        llm.reset()
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)], np.float32)

    def greedy_of(ids, n):
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(n):
            out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
            llm.eval(out[-1:])
        return out

    return logits_of, greedy_of


def timed(fn, *args, **kwargs) -> tuple:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", default="jpeft-output/adapter")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    base = args.model or default_model_path()
    model, params = jpeft.models.from_pretrained(base)
    adapter = jpeft.load_pretrained(args.adapter, params)
    tokenizer = jpeft.models.load_tokenizer(base)
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    reference = Reference(model, params, adapter, prompts, args.new_tokens)
    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = None
    results: dict = {"model": str(base), "adapter": args.adapter, "llama_cpp": llama_version}
    work = Path(tempfile.mkdtemp(prefix="jpeft-export-"))
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        folder, seconds = timed(
            export.save_merged_checkpoint, work / f"hf-{dtype}", base, params, adapter, dtype=dtype
        )
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        results[f"hf {dtype} -> transformers"] = {
            "export_s": seconds,
            **reference.compare(*transformers_side(hf)),
        }
    for outtype in GGUF_TYPES:
        file, seconds = timed(
            export.save_merged_gguf,
            work / f"merged-{outtype}.gguf",
            base,
            params,
            adapter,
            outtype=outtype,
        )
        row = {"export_s": seconds, "size_mb": round(file.stat().st_size / 2**20, 1)}
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            file.parent, gguf_file=file.name, dtype=torch.float32
        )
        row["transformers"] = reference.compare(*transformers_side(hf))
        if llama_version:
            row["llama.cpp"] = reference.compare(*llama_cpp_side(file))
        results[f"gguf {outtype}"] = row
    lora, seconds = timed(export.save_lora_gguf, work / "lora.gguf", adapter, params, base=base)
    row = {"export_s": seconds, "size_mb": round(lora.stat().st_size / 2**20, 2)}
    if llama_version:
        row["llama.cpp (base GGUF + LoRA GGUF)"] = reference.compare(*llama_cpp_side(base, lora))
        row["llama.cpp (base GGUF alone)"] = reference.compare(*llama_cpp_side(base))
    results["gguf-lora"] = row
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
