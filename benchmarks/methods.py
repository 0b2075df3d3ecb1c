"""Every registered `jpeft finetune` method on the same model and data: the README's table.

Runs `jpeft finetune --method M` once per method, each in its own process, with the main job's
defaults (SmolLM2-135M-Instruct, BBC News, 80 steps of batch 8, the same seed and test split) and
the method's default learning rate. For each run it records the trainable parameters, the size of
the saved adapter file, the mean train step time (compilation excluded: the first step is
dropped), the process's peak resident memory, and the accuracy before and after, then prints a
markdown table. Results are kept in `--results` (JSON), so methods can be run in several sittings:

    python benchmarks/methods.py [--methods lora ia3 ...] [--results benchmarks/methods.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jpeft

METHODS = tuple(jpeft.registered())

COLUMNS = (
    "method",
    "trainable params",
    "adapter file",
    "step time",
    "peak RSS",
    "accuracy before",
    "accuracy after",
)


def run_method(method: str, extra: list[str]) -> dict:
    """One `jpeft finetune` run in a child process; its metrics plus size, step time and RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "jpeft.cli", "finetune", "--method", method]
        command += ["--output-dir", str(out), *extra]
        start = time.perf_counter()
        child = subprocess.Popen(command)
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{method}: jpeft finetune failed ({status})")
        metrics = json.loads((out / "metrics.json").read_text())
        adapter_bytes = (out / "adapter" / "adapter_model.safetensors").stat().st_size
    steps = metrics["step_seconds"][1:]
    return {
        "method": method,
        "trainable_params": metrics["trainable_params"],
        "total_params": metrics["total_params"],
        "adapter_bytes": adapter_bytes,
        "step_seconds": sum(steps) / len(steps),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "accuracy_before": metrics["accuracy_before"],
        "accuracy_after": metrics["accuracy_after"],
        "lr": metrics["config"]["lr"],
        "wall_seconds": time.perf_counter() - start,
    }


def table(results: dict[str, dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for method, r in results.items():
        share = 100 * r["trainable_params"] / r["total_params"]
        cells = (
            f"{method} (lr {r['lr']:g})",
            f"{r['trainable_params']:,} ({share:.2f}%)",
            f"{r['adapter_bytes'] / 1e6:.2f} MB",
            f"{r['step_seconds']:.2f} s",
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB",
            f"{r['accuracy_before']:.3f}",
            f"{r['accuracy_after']:.3f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--results", default="benchmarks/methods.json")
    parser.add_argument("extra", nargs="*", help="more `jpeft finetune` options, after --")
    args = parser.parse_args()
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.exists() else {}
    for method in args.methods:
        results[method] = run_method(method, args.extra)
        path.write_text(json.dumps(results, indent=2))
        print(table(results), flush=True)


if __name__ == "__main__":
    main()
