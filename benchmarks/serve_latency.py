"""`jpeft serve` under concurrent requests: latency and throughput, batched against one by one.

The main job's model (SmolLM2-135M-Instruct, from its GGUF file; `--model` for another) served
with `--adapters` random LoRA adapters (r=16 on q/v, saved to a temporary folder), over HTTP on
localhost. `--requests` completion requests (prompts of 20-40 tokens, `--max-tokens` new tokens,
adapters round-robin with the base model among them) are sent

- **all at once**: the server batches them into mixed-adapter generate calls;
- **one after another**: each waits for the previous answer (no batching possible).

Each way is run twice and the second timed (the first compiles). Reported: the median and 95th
percentile latency per request, the wall time and the completion tokens per second.

Run:  python benchmarks/serve_latency.py [--json benchmarks/serve_latency.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import jax
import numpy as np

import jpeft
from jpeft.finetune.job import default_model_path
from jpeft.serve.app import BackgroundServer, make_app
from jpeft.serve.engine import Engine

WORDS = "the market rose as the vote on the film tax passed and the team won the final".split()


def saved_adapters(params, count: int, directory: Path) -> dict[str, Path]:
    folders = {}
    config = jpeft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    for i in range(count):
        adapter = jpeft.init_adapter(params, config, key=jax.random.key(i))
        rng = np.random.default_rng(i)
        adapter = jax.tree.map(lambda x, rng=rng: x + 0.01 * rng.standard_normal(x.shape), adapter)
        folders[f"lora{i}"] = directory / f"lora{i}"
        jpeft.save_pretrained(adapter, folders[f"lora{i}"])
    return folders


def payloads(names: list[str], count: int, max_tokens: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        prompt = " ".join(rng.choice(WORDS, size=int(rng.integers(20, 40))))
        out.append({"model": names[i % len(names)], "prompt": prompt, "max_tokens": max_tokens})
    return out


async def post(session, url: str, body: dict) -> tuple[float, int]:
    start = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as response:
        answer = await response.json()
        assert response.status == 200, answer
    return time.perf_counter() - start, answer["usage"]["completion_tokens"]


async def at_once(url: str, bodies: list[dict]) -> list[tuple[float, int]]:
    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(post(session, url, b) for b in bodies))


async def one_by_one(url: str, bodies: list[dict]) -> list[tuple[float, int]]:
    async with aiohttp.ClientSession() as session:
        return [await post(session, url, b) for b in bodies]


def summary(results: list[tuple[float, int]], wall: float) -> dict:
    latencies = sorted(r[0] for r in results)
    return {
        "median_latency_s": statistics.median(latencies),
        "p95_latency_s": latencies[int(0.95 * (len(latencies) - 1))],
        "wall_s": wall,
        "completion_tokens_per_s": sum(r[1] for r in results) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    path = args.model or default_model_path()
    model, params = jpeft.models.from_pretrained(path)
    engine = Engine(model, params, jpeft.models.load_tokenizer(path), args.max_batch)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in saved_adapters(params, args.adapters, Path(tmp)).items():
            engine.load(name, folder)
        app = make_app(engine, "base", batch_window=0.05, max_batch=args.max_batch)
        bodies = payloads(["base", *engine.adapters], args.requests, args.max_tokens)
        with BackgroundServer(app) as url:
            for way, send in (("all_at_once", at_once), ("one_by_one", one_by_one)):
                asyncio.run(send(url, bodies))  # compiles the shapes this way uses
                start = time.perf_counter()
                timed = asyncio.run(send(url, bodies))
                results[way] = summary(timed, time.perf_counter() - start)
    results["batched_speedup"] = results["one_by_one"]["wall_s"] / results["all_at_once"]["wall_s"]
    results["setup"] = {**vars(args), "model": str(path), "device": str(jax.devices()[0])}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
