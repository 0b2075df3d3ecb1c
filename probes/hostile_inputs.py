"""The hostile-input probe: realistic mistakes and faults thrown at jpeft, each outcome classified.

    python probes/hostile_inputs.py            # every case (about 3 minutes on 2 CPU cores)
    python probes/hostile_inputs.py --only data,api --verbose

Each case is something a user does by mistake (a typo in a flag, the wrong folder, a damaged or
hand-edited file, an array of the wrong dtype) or something that happens to a run (a NaN, a
second run on the same folder, Ctrl-C). Outcomes:

    clean   refused: exit code 2 / a ValueError, one line naming the flag, field, file or tensor
    ok      an unusual but valid input that worked, with the right result
    SILENT  accepted where it must be refused, or a wrong result
    CRASH   a traceback, an exception type jpeft does not document, a multi-line error
    LOST    a file jpeft did not write was changed or removed

The probe exits with 1 when any case is SILENT, CRASH or LOST. It needs the test extra (torch,
transformers) for its tiny models: `pip install -e ".[test]"`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny models of the test suite

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from tiny_models import TOPIC_WORDS, TOPICS, WORDS, save_word_level_llama  # noqa: E402

import jpeft  # noqa: E402
from jpeft import cli  # noqa: E402

CLEAN, OK, SILENT, CRASH, LOST = "clean", "ok", "SILENT", "CRASH", "LOST"
BAD = (SILENT, CRASH, LOST)


@dataclasses.dataclass
class Case:
    group: str
    name: str
    run: Callable[[Path], tuple[str, str]]  # tmp folder -> (outcome, detail)


CASES: list[Case] = []


def case(group: str, name: str):
    def add(fn):
        CASES.append(Case(group, name, fn))
        return fn

    return add


# ---------------------------------------------------------------------------------------------
# how an outcome is judged


def run_cli(args: list[str]) -> tuple[int | None, str, str]:
    """`jpeft ARGS` in this process: (exit code or None for an escaped exception, stdout, the
    last stderr line or the exception)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code if isinstance(exit_.code, int) else 2
    except BaseException as exc:  # noqa: BLE001  (the probe classifies everything)
        return None, out.getvalue(), f"{type(exc).__name__}: {exc}"
    lines = [line.split("\r")[-1] for line in err.getvalue().strip().splitlines()]
    return code, out.getvalue(), "\n".join(line for line in lines if not line.startswith("train"))


def snapshot(paths: list[Path]) -> dict[str, bytes | None]:
    """The bytes of every file under `paths`: what the user owns."""
    files = {}
    for path in paths:
        for file in [path] if path.is_file() else sorted(path.rglob("*")):
            if file.is_file():
                files[str(file)] = file.read_bytes()
    return files


def cli_refuses(args: list[str], names: str, guard: list[Path] = (), code: int = 2):
    """Judge a command that must fail with `code` and a one-line message containing `names`,
    leaving the files under `guard` as they were."""
    before = snapshot(list(guard))
    got, _, message = run_cli(args)
    if snapshot(list(guard)) != before:
        return LOST, message
    if got is None or "Traceback" in message or len(message.splitlines()) != 1:
        return CRASH, message[-500:]
    if got == 0:
        return SILENT, "exit code 0"
    if got != code or names not in message:
        return CRASH, f"exit {got}: {message}"
    return CLEAN, message


def refuses(fn: Callable[[], object], names: str, errors=(ValueError, FileNotFoundError)):
    """Judge a call that must raise one of `errors` with a one-line message containing `names`."""
    try:
        fn()
    except errors as exc:
        message = str(exc)
        if names not in message or "\n" in message.strip():
            return CRASH, f"{type(exc).__name__}: {message[:400]}"
        return CLEAN, message
    except Exception as exc:  # noqa: BLE001
        return CRASH, f"{type(exc).__name__}: {str(exc)[:400]}"
    return SILENT, "no error"


# ---------------------------------------------------------------------------------------------
# shared material: a tiny model, its data, a finished run


class Material:
    """Built once per probe run, in its own temporary folder."""

    def __init__(self, root: Path):
        self.root = root
        self.model = save_word_level_llama(root / "model")
        self.data = root / "topics.csv"
        rng = np.random.default_rng(0)
        rows = ["text,label"]
        for _ in range(60):
            topic = TOPICS[rng.integers(3)]
            words = rng.choice(TOPIC_WORDS[topic], 6).tolist() + rng.choice(WORDS[:2], 2).tolist()
            rows.append(f"{' '.join(rng.permutation(words))},{topic}")
        self.data.write_text("\n".join(rows) + "\n")
        self.finished = root / "finished"
        self.checkpoints = root / "checkpoints"
        code, _, message = run_cli(
            self.job(self.finished, "--steps", 2, "--checkpoint-dir", self.checkpoints)
        )
        assert code == 0, message
        self.jmodel, self.params = jpeft.models.from_pretrained(self.model)

    def job(self, out, *extra) -> list:
        return [
            "finetune",
            "--model",
            self.model,
            "--data",
            self.data,
            "--output-dir",
            out,
            "--seq-len",
            48,
            "--test-size",
            8,
            "--eval-batch-size",
            8,
            "--r",
            4,
            "--train-layers",
            0,
            "--lr",
            3e-2,
            "--steps",
            2,
            *extra,
        ]

    def adapter_copy(self, tmp: Path, method: str = "lora") -> Path:
        """A saved adapter of `method` on the tiny model, to be damaged by a case."""
        configs = {
            "lora": jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            "dora": jpeft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True),
            "ia3": jpeft.IA3Config(target_modules=["k_proj", "down_proj"]),
            "prompt": jpeft.PromptTuningConfig(num_virtual_tokens=4),
        }
        adapter = jpeft.init_adapter(
            self.params, configs[method], key=jax.random.key(0), model=self.jmodel
        )
        adapter = jax.tree.map(lambda x: x + 0.05, adapter)
        folder = tmp / f"adapter-{method}"
        jpeft.save_pretrained(adapter, folder)
        return folder


M: Material  # set in main


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def edit_tensors(folder: Path, change: Callable[[dict], None]) -> Path:
    path = folder / "adapter_model.safetensors"
    tensors = dict(load_file(path))
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def load_and_apply(folder: Path):
    adapter = jpeft.load_pretrained(folder, params=M.params)
    ids = jnp.ones((1, 6), jnp.int32)
    logits = M.jmodel.apply(M.params, ids, adapter=adapter)
    if not np.isfinite(np.asarray(logits)).all():
        raise AssertionError("non-finite logits")  # a silent wrong result, as CRASH
    return logits


# ---------------------------------------------------------------------------------------------
# the output folder and locks


@case("output folder", "a folder of the user's files")
def _(tmp):
    mine = tmp / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("work")
    return cli_refuses(M.job(mine), "not written by jpeft", [mine])


@case("output folder", "a folder of the user's files, with --overwrite")
def _(tmp):
    mine = tmp / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("work")
    return cli_refuses(M.job(mine, "--overwrite"), "not written by jpeft", [mine])


@case("output folder", "the working folder")
def _(tmp):
    (tmp / "keep.txt").write_text("x")
    with contextlib.chdir(tmp):
        return cli_refuses(M.job(".", "--overwrite"), "working folder", [tmp])


@case("output folder", "a parent of the working folder")
def _(tmp):
    (tmp / "sub").mkdir()
    (tmp / "keep.txt").write_text("x")
    with contextlib.chdir(tmp / "sub"):
        return cli_refuses(M.job("..", "--overwrite"), "working folder", [tmp])


@case("output folder", "the root folder")
def _(tmp):
    return cli_refuses(M.job("/", "--overwrite"), "working folder")


@case("output folder", "a file")
def _(tmp):
    notes = tmp / "notes.txt"
    notes.write_text("x")
    return cli_refuses(M.job(notes), "is a file", [notes])


@case("output folder", "a previous run's output without --overwrite")
def _(tmp):
    return cli_refuses(M.job(M.finished), "--overwrite", [M.finished])


@case("output folder", "a previous run's output holding a file of the user's")
def _(tmp):
    out = tmp / "out"
    assert run_cli(M.job(out))[0] == 0
    (out / "adapter" / "notes.md").write_text("mine")
    return cli_refuses(M.job(out, "--overwrite"), "notes.md", [out])


@case("output folder", "an empty existing folder is used")
def _(tmp):
    (tmp / "out").mkdir()
    code, _, message = run_cli(M.job(tmp / "out"))
    return (OK, "") if code == 0 and (tmp / "out" / "metrics.json").is_file() else (CRASH, message)


@case("output folder", "a previous output replaced with --overwrite")
def _(tmp):
    out = tmp / "out"
    assert run_cli(M.job(out))[0] == 0
    code, _, message = run_cli(M.job(out, "--overwrite", "--steps", 3))
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    return (OK, "") if code == 0 and steps == 3 else (CRASH, message)


@case("output folder", "saved files readable by the group and others (umask 022)")
def _(tmp):
    umask = os.umask(0o022)
    try:
        assert run_cli(M.job(tmp / "out"))[0] == 0
    finally:
        os.umask(umask)
    modes = {str(p): p.stat().st_mode & 0o777 for p in (tmp / "out").rglob("*") if p.is_file()}
    wrong = {p: oct(m) for p, m in modes.items() if m != 0o644}
    return (SILENT, str(wrong)) if wrong else (OK, "")


def held_lock(folder: Path) -> subprocess.Popen:
    """A live process (another run) holding `folder`'s lock."""
    holder = subprocess.Popen(["sleep", "60"])
    owner = {"pid": holder.pid, "host": socket.gethostname(), "started": time.time()}
    Path(f"{folder}.lock").write_text(json.dumps(owner))
    return holder


@case("locks", "an output folder in use by another run")
def _(tmp):
    holder = held_lock(tmp / "out")
    try:
        return cli_refuses(M.job(tmp / "out"), "in use by another jpeft run")
    finally:
        holder.kill()


@case("locks", "a checkpoint folder in use by another run")
def _(tmp):
    holder = held_lock(tmp / "ck")
    try:
        args = M.job(tmp / "out", "--checkpoint-dir", tmp / "ck")
        return cli_refuses(args, "in use by another jpeft run")
    finally:
        holder.kill()


@case("locks", "a stale lock (its run is gone) is taken over")
def _(tmp):
    gone = subprocess.Popen(["true"])
    gone.wait()
    owner = {"pid": gone.pid, "host": socket.gethostname(), "started": 0}
    Path(f"{tmp / 'out'}.lock").write_text(json.dumps(owner))
    code, out, message = run_cli(M.job(tmp / "out"))
    return (OK, "") if code == 0 and "stale lock" in out else (CRASH, message)


# ---------------------------------------------------------------------------------------------
# checkpoints


def resume_refused(tmp, *change, names):
    return cli_refuses(
        M.job(tmp / "out", "--checkpoint-dir", M.checkpoints, *change), names, [M.checkpoints]
    )


@case("checkpoints", "resumed with another --lr")
def _(tmp):
    return resume_refused(tmp, "--lr", "1e-2", names="--lr: 0.03 there, 0.01 now")


@case("checkpoints", "resumed with more --steps")
def _(tmp):
    return resume_refused(tmp, "--steps", "5", names="--steps: 2 there, 5 now")


@case("checkpoints", "resumed with another --r")
def _(tmp):
    return resume_refused(tmp, "--r", "8", names="--r: 4 there, 8 now")


@case("checkpoints", "resumed with another --batch-size")
def _(tmp):
    return resume_refused(tmp, "--batch-size", "4", names="--batch-size")


@case("checkpoints", "resumed with another --method")
def _(tmp):
    return resume_refused(tmp, "--method", "ia3", names="--method")


@case("checkpoints", "resumed with other data")
def _(tmp):
    other = tmp / "other.csv"
    other.write_text(M.data.read_text().replace("market", "bank"))
    args = M.job(tmp / "out", "--checkpoint-dir", M.checkpoints)
    args[args.index("--data") + 1] = other
    return cli_refuses(args, "--data (training examples)", [M.checkpoints])


@case("checkpoints", "resumed on another model file")
def _(tmp):
    import shutil

    other = tmp / "model"
    shutil.copytree(M.model, other)
    weights = other / "model.safetensors"
    tensors = dict(load_file(weights))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})
    args = M.job(tmp / "out", "--checkpoint-dir", M.checkpoints)
    args[args.index("--model") + 1] = other
    return cli_refuses(args, "--model (file contents)", [M.checkpoints])


@case("checkpoints", "a finished run's checkpoint gives that run's adapter")
def _(tmp):
    code, out, message = run_cli(M.job(tmp / "out", "--checkpoint-dir", M.checkpoints))
    same = code == 0 and load_file(tmp / "out/adapter/adapter_model.safetensors").keys()
    if not same or "the run had finished" not in out:
        return CRASH, message
    saved = load_file(M.finished / "adapter/adapter_model.safetensors")
    got = load_file(tmp / "out/adapter/adapter_model.safetensors")
    equal = all(np.array_equal(got[k], v) for k, v in saved.items())
    return (OK, "") if equal else (SILENT, "another adapter than the finished run's")


@case("checkpoints", "a checkpoint folder of other files")
def _(tmp):
    (tmp / "ck").mkdir()
    (tmp / "ck" / "weights.bin").write_text("x")
    return cli_refuses(M.job(tmp / "out", "--checkpoint-dir", tmp / "ck"), "no run_identity", [tmp])


@case("checkpoints", "a checkpoint path that is a file")
def _(tmp):
    (tmp / "ck").write_text("x")
    return cli_refuses(M.job(tmp / "out", "--checkpoint-dir", tmp / "ck"), "is a file", [tmp])


# ---------------------------------------------------------------------------------------------
# numbers that cannot be trusted


@case("numbers", "a learning rate that diverges (1e30)")
def _(tmp):
    args = M.job(tmp / "out", "--lr", "1e30", "--steps", 20, "--warmup-steps", 0)
    outcome, message = cli_refuses(args, "not finite", code=1)
    if outcome == CLEAN and (tmp / "out").exists():
        return SILENT, "an output was written"
    return outcome, message


for flags, names in [
    (("--lr", "0"), "--lr 0.0"),
    (("--lr=-1e-3",), "--lr -0.001"),
    (("--lr", "nan"), "--lr nan"),
    (("--lr", "inf"), "--lr inf"),
    (("--lora-alpha", "inf"), "--lora-alpha inf"),
]:
    case("numbers", " ".join(flags))(
        lambda tmp, flags=flags, names=names: cli_refuses(M.job(tmp / "o", *flags), names)
    )

# ---------------------------------------------------------------------------------------------
# options

for flags, names in [
    (("--steps", "0"), "--steps 0"),
    (("--steps", "-5"), "--steps -5"),
    (("--batch-size", "0"), "--batch-size 0"),
    (("--eval-batch-size", "0"), "--eval-batch-size 0"),
    (("--seq-len", "0"), "--seq-len 0"),
    (("--seq-len", "4096"), "--seq-len 4096"),
    (("--text-tokens", "0"), "--text-tokens 0"),
    (("--warmup-steps", "-1"), "--warmup-steps -1"),
    (("--r", "0"), "--r 0"),
    (("--virtual-tokens", "0"), "--virtual-tokens 0"),
    (("--checkpoint-every", "0"), "--checkpoint-every 0"),
    (("--seed", "-1"), "--seed -1"),
    (("--lora-dropout", "1"), "--lora-dropout 1.0"),
    (("--lora-dropout", "-0.1"), "--lora-dropout -0.1"),
    (("--target-modules", "q_proj("), "not a valid regex"),
    (("--target-modules", "nothing_here"), "nothing_here"),
    (("--quantize", "int8"), "--quantize 'int8'"),
    (("--remat", "half"), "--remat 'half'"),
    (("--method", "superlora"), "superlora"),
    (("--train-layers", "-1"), "--train-layers -1"),
    (("--train-layers", "99"), "--train-layers 99"),
    (("--test-size", "0"), "--test-size"),
    (("--test-size", "100000"), "--test-size"),
    (("--mesh", "data=3"), "--mesh"),
    (("--mesh", "foo"), "--mesh"),
    (("--steps", "ten"), "invalid int value"),
]:
    case("options", " ".join(flags))(
        lambda tmp, flags=flags, names=names: cli_refuses(M.job(tmp / "o", *flags), names)
    )


@case("options", "generate --max-new-tokens 0")
def _(tmp):
    return cli_refuses(["generate", "hi", "--model", M.model, "--max-new-tokens", 0], "0")


@case("options", "generate --adapter that is not a folder")
def _(tmp):
    args = ["generate", "hi", "--model", M.model, "--adapter", tmp / "none"]
    return cli_refuses(args, "adapter_config.json")


for values, names in [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"stepz": 3}', "stepz"),
    ('{"steps": "80"}', "steps = '80'"),
    ('{"lr": true}', "lr = True"),
    ('{"r": 4.0}', "r = 4.0"),
    ('{"target_modules": [1]}', "target_modules"),
    ('{"overwrite": "yes"}', "overwrite"),
]:

    def config_file(tmp, values=values, names=names):
        (tmp / "run.json").write_text(values)
        return cli_refuses(["finetune", "--config", tmp / "run.json"], names)

    case("config file", values)(config_file)

# ---------------------------------------------------------------------------------------------
# data files


def data_refused(tmp, name: str, content: bytes | None, names: str, *flags):
    """A job on the data file `name` holding `content` (None: no such file)."""
    path = tmp / name
    if content is not None:
        path.write_bytes(content)
    args = M.job(tmp / "o", *flags)
    args[args.index("--data") + 1] = path
    return cli_refuses(args, names, [path])


GOOD_ROWS = "".join(f"{' '.join(TOPIC_WORDS[t])},{t}\n" for t in TOPICS * 6)
for name, content, names in [
    ("none.csv", None, "not found"),
    ("data.txt", b"text,label\n", "use .json, .jsonl or .csv"),
    ("empty.csv", b"", "has no rows"),
    ("header.csv", b"text,label\n", "has no rows"),
    ("wide.csv", f"text,label\n{GOOD_ROWS}a,b,c\n".encode(), "line 20: 3 fields"),
    ("nolabel.csv", f"text,label\n{GOOD_ROWS}market shares,\n".encode(), "line 20: empty"),
    ("columns.csv", b"sentence,topic\nthe market,money\n", "'text' and 'label'"),
    ("bad.jsonl", b'{"text": "a", "label": "money"}\n{"text": "b",\n', "line 2: not valid JSON"),
    ("list.jsonl", b'{"text": "a", "label": "money"}\n[1, 2]\n', "line 2: not a JSON object"),
    ("nested.json", b'[{"text": "a", "label": ["x"]}]', "is a list"),
    ("null.jsonl", b'{"text": "a", "label": null}\n', "is null"),
    ("latin1.csv", f"text,label\n{GOOD_ROWS}caf\xe9 market,money\n".encode("latin-1"), "not UTF-8"),
    ("labels.csv", b"text,label\n" + b"a b,money\nc d,money-2\n" * 10, "distinct tokens"),
]:
    case("data files", name)(
        lambda tmp, name=name, content=content, names=names: data_refused(tmp, name, content, names)
    )


@case("data files", "--skip-bad-rows drops and counts them")
def _(tmp):
    path = tmp / "mixed.csv"
    path.write_text(f"text,label\n{GOOD_ROWS * 3}a,b,c\nmarket shares,\n")
    args = M.job(tmp / "o", "--skip-bad-rows")
    args[args.index("--data") + 1] = path
    code, out, message = run_cli(args)
    return (OK, "") if code == 0 and "skipped 2 bad rows" in out else (CRASH, message)


# ---------------------------------------------------------------------------------------------
# model files


def model_copy(tmp: Path) -> Path:
    import shutil

    return Path(shutil.copytree(M.model, tmp / "model"))


def damaged_weight(tmp: Path, change: Callable[[dict], None]) -> Path:
    model = model_copy(tmp)
    tensors = dict(load_file(model / "model.safetensors"))
    change(tensors)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model


@case("model files", "a missing model path")
def _(tmp):
    return refuses(lambda: jpeft.models.from_pretrained(tmp / "nothing"), "nothing")


@case("model files", "a folder without config.json")
def _(tmp):
    model = model_copy(tmp)
    (model / "config.json").unlink()
    return refuses(lambda: jpeft.models.from_pretrained(model), "config.json")


@case("model files", "config.json that is not JSON")
def _(tmp):
    model = model_copy(tmp)
    (model / "config.json").write_text("{oops")
    return refuses(lambda: jpeft.models.from_pretrained(model), "config.json")


@case("model files", "a truncated safetensors file")
def _(tmp):
    model = model_copy(tmp)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return refuses(lambda: jpeft.models.from_pretrained(model), "model.safetensors")


@case("model files", "an integer weight")
def _(tmp):
    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)

    model = damaged_weight(tmp, to_int)
    return refuses(lambda: jpeft.models.from_pretrained(model), "model.norm.weight")


@case("model files", "a NaN in a weight")
def _(tmp):
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan

    model = damaged_weight(tmp, poison)
    return refuses(lambda: jpeft.models.from_pretrained(model), "mlp.up_proj.weight")


@case("model files", "a NaN in a weight quantized to nf4 while loading")
def _(tmp):
    def poison(t):
        t["model.layers.0.self_attn.q_proj.weight"][0, 0] = np.inf

    model = damaged_weight(tmp, poison)
    return refuses(
        lambda: jpeft.models.from_pretrained(model, quantize="nf4"), "self_attn.q_proj.weight"
    )


@case("model files", "quantize() of a weight with NaN")
def _(tmp):
    weight = np.ones((64, 64), np.float32)
    weight[1, 2] = np.nan
    return refuses(lambda: jpeft.quant.quantize(weight, name="my.weight"), "my.weight")


@case("model files", "a .gguf file of junk bytes")
def _(tmp):
    junk = tmp / "model.gguf"
    junk.write_bytes(b"GGUF" + struct.pack("<I", 3) + os.urandom(64))
    return refuses(lambda: jpeft.models.from_pretrained(junk), "model.gguf")


@case("model files", "a float dtype that is not one (int8)")
def _(tmp):
    return refuses(lambda: jpeft.models.from_pretrained(M.model, dtype=jnp.int8), "dtype")


# ---------------------------------------------------------------------------------------------
# adapter files


def adapter_refused(tmp, method: str, names: str, config=None, tensors=None):
    folder = M.adapter_copy(tmp, method)
    if config:
        edit_config(folder, **config)
    if tensors:
        edit_tensors(folder, tensors)
    return refuses(lambda: load_and_apply(folder), names)


def set_key(key, value):
    def change(tensors):
        tensors[key] = value

    return change


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
for name, method, names, config, tensors in [
    ("r as a string", "lora", "r", {"r": "4"}, None),
    ("r as true", "lora", "r", {"r": True}, None),
    ("r = 0", "lora", "r", {"r": 0}, None),
    ("r disagreeing with the tensors", "lora", "q_proj", {"r": 8}, None),
    ("rank_pattern disagreeing", "lora", "q_proj", {"rank_pattern": {"q_proj": 2}}, None),
    ("lora_alpha as text", "lora", "lora_alpha", {"lora_alpha": "big"}, None),
    ("target_modules a number", "lora", "target_modules", {"target_modules": 5}, None),
    ("an unknown peft_type", "lora", "SUPERLORA", {"peft_type": "SUPERLORA"}, None),
    ("use_dora without magnitudes", "lora", "magnitude", {"use_dora": True}, None),
    ("magnitudes without use_dora", "dora", "magnitude", {"use_dora": False}, None),
    ("lora_A without lora_B", "lora", "lora_B", None, lambda t: t.pop(f"{Q0}.lora_B.weight")),
    ("an unknown tensor", "lora", "mystery", None, set_key(f"{Q0}.mystery.weight", np.ones(3))),
    (
        "an integer tensor",
        "lora",
        "lora_A",
        None,
        set_key(f"{Q0}.lora_A.weight", np.ones((4, 32), np.int32)),
    ),
    (
        "a NaN tensor",
        "lora",
        "lora_B",
        None,
        set_key(f"{Q0}.lora_B.weight", np.full((32, 4), np.nan, np.float32)),
    ),
    (
        "an inf tensor",
        "ia3",
        "ia3_l",
        None,
        set_key(
            "base_model.model.model.layers.0.mlp.down_proj.ia3_l",
            np.full((1, 64), np.inf, np.float32),
        ),
    ),
    (
        "a transposed lora_A",
        "lora",
        "q_proj",
        None,
        set_key(f"{Q0}.lora_A.weight", np.ones((32, 4), np.float32)),
    ),
    (
        "prompt rows disagreeing with num_virtual_tokens",
        "prompt",
        "num_virtual_tokens",
        {"num_virtual_tokens": 6},
        None,
    ),
    ("prompt width disagreeing with token_dim", "prompt", "token_dim", {"token_dim": 48}, None),
    (
        "a target the model does not have",
        "lora",
        "q_proj",
        None,
        lambda t: t.update({k.replace("layers.0", "layers.7"): v for k, v in list(t.items())}),
    ),
]:
    case("adapter files", name)(
        lambda tmp, method=method, names=names, config=config, tensors=tensors: adapter_refused(
            tmp, method, names, config, tensors
        )
    )


@case("adapter files", "adapter_config.json missing")
def _(tmp):
    folder = M.adapter_copy(tmp)
    (folder / "adapter_config.json").unlink()
    return refuses(lambda: load_and_apply(folder), "adapter_config.json")


@case("adapter files", "adapter_config.json not JSON")
def _(tmp):
    folder = M.adapter_copy(tmp)
    (folder / "adapter_config.json").write_text("{")
    return refuses(lambda: load_and_apply(folder), "adapter_config.json")


@case("adapter files", "adapter_config.json a list")
def _(tmp):
    folder = M.adapter_copy(tmp)
    (folder / "adapter_config.json").write_text("[]")
    return refuses(lambda: load_and_apply(folder), "adapter_config.json")


@case("adapter files", "a truncated safetensors file")
def _(tmp):
    folder = M.adapter_copy(tmp)
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return refuses(lambda: load_and_apply(folder), "adapter_model.safetensors")


@case("adapter files", "only a pickled adapter_model.bin")
def _(tmp):
    folder = M.adapter_copy(tmp)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    return refuses(lambda: load_and_apply(folder), "never unpickles")


@case("adapter files", "a CLI generate with a damaged adapter is one line")
def _(tmp):
    folder = edit_config(M.adapter_copy(tmp), r="4")
    return cli_refuses(["generate", "hi", "--model", M.model, "--adapter", folder], "r")


# ---------------------------------------------------------------------------------------------
# the API


def api_refused(names, call):
    return refuses(call, names)


IDS = jnp.ones((2, 6), jnp.int32)
for name, names, call in [
    ("float input_ids", "input_ids", lambda: M.jmodel.apply(M.params, IDS.astype(jnp.float32))),
    ("1-D input_ids", "input_ids", lambda: M.jmodel.apply(M.params, IDS[0])),
    ("an empty batch", "input_ids", lambda: M.jmodel.apply(M.params, IDS[:0])),
    ("an empty sequence", "input_ids", lambda: M.jmodel.apply(M.params, IDS[:, :0])),
    (
        "an attention_mask of another shape",
        "attention_mask",
        lambda: M.jmodel.apply(M.params, IDS, attention_mask=jnp.ones((2, 5), jnp.int32)),
    ),
    ("ids past the vocabulary", "vocab_size", lambda: M.jmodel.apply(M.params, IDS * 999)),
    ("negative ids", "vocab_size", lambda: M.jmodel.apply(M.params, -IDS)),
    (
        "an int as the dropout key",
        "dropout_key",
        lambda: M.jmodel.apply(M.params, IDS, dropout_key=3),
    ),
    (
        "a float array as the dropout key",
        "dropout_key",
        lambda: M.jmodel.apply(M.params, IDS, dropout_key=jnp.ones(2)),
    ),
    (
        "generate with max_new_tokens=-1",
        "max_new_tokens",
        lambda: M.jmodel.generate(M.params, IDS, -1),
    ),
    (
        "generate past the positions",
        "max_position_embeddings",
        lambda: M.jmodel.generate(M.params, IDS, 1000),
    ),
    (
        "init with an integer dtype",
        "dtype",
        lambda: M.jmodel.init(jax.random.key(0), dtype=jnp.int32),
    ),
    (
        "ids past the vocabulary inside jit (checked)",
        "vocab_size",
        lambda: jpeft.models.checked(jax.jit(dataclasses.replace(M.jmodel, check_ids=True).apply))(
            M.params, IDS * 999
        ),
    ),
]:
    case("api", name)(lambda tmp, names=names, call=call: api_refused(names, call))


# ---------------------------------------------------------------------------------------------
# interrupts (the installed `jpeft` command, as a user runs it)


def start(args: list) -> subprocess.Popen:
    """The `jpeft` command's entry point with Ctrl-C handled, as in a terminal."""
    launch = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "print('started', file=sys.stderr, flush=True); "
        "sys.argv[0] = 'jpeft'; from jpeft_launcher import main; sys.exit(main())"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", launch, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr.readline() == "started\n"  # Ctrl-C is handled from here on
    return process


def judge_stop(process: subprocess.Popen, code: int, out: Path) -> tuple[str, str]:
    _, err = process.communicate(timeout=120)
    last = err.strip().splitlines()[-1].split("\r")[-1] if err.strip() else ""
    if "Traceback" in err or process.returncode != code:
        return CRASH, f"exit {process.returncode}: {err[-400:]}"
    if out.exists() or Path(f"{out}.lock").exists():
        return SILENT, "left an output or a lock"
    return CLEAN, last


for delay in (0.2, 1.0, 2.0, 2.5, 3.0, 4.0):

    def ctrl_c(tmp, delay=delay):
        process = start(M.job(tmp / "out", "--steps", 100000))
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        return judge_stop(process, 130, tmp / "out")

    case("interrupts", f"Ctrl-C after {delay} s")(ctrl_c)

for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):

    def mid_training(tmp, signum=signum, code=code):
        checkpoints = tmp / "ck"
        process = start(M.job(tmp / "out", "--steps", 100000, "--checkpoint-dir", checkpoints))
        deadline = time.monotonic() + 120
        while not any(p.name.isdigit() for p in checkpoints.glob("*")):
            if process.poll() is not None or time.monotonic() > deadline:
                return CRASH, "no checkpoint came"
            time.sleep(0.05)
        time.sleep(0.5)
        process.send_signal(signum)
        outcome, last = judge_stop(process, code, tmp / "out")
        return (outcome, last) if "is kept" in last or outcome != CLEAN else (SILENT, last)

    case("interrupts", f"{signal.Signals(signum).name} while training")(mid_training)


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated groups")
    parser.add_argument("--verbose", action="store_true", help="print every case's message")
    parser.add_argument("--json", help="write the outcomes to this file")
    args = parser.parse_args()
    groups = set(args.only.split(",")) if args.only else None
    chosen = [c for c in CASES if groups is None or c.group in groups]
    global M
    results = []
    with tempfile.TemporaryDirectory() as root:
        print(f"building the tiny model and a finished run; {len(chosen)} cases")
        M = Material(Path(root))
        for number, c in enumerate(chosen):
            tmp = Path(root) / f"case{number}"
            tmp.mkdir()
            start_time = time.perf_counter()
            try:
                outcome, detail = c.run(tmp)
            except Exception as exc:  # noqa: BLE001  (a case's own set-up failing)
                outcome, detail = CRASH, f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - start_time
            results.append({"group": c.group, "case": c.name, "outcome": outcome, "detail": detail})
            if args.verbose or outcome in BAD:
                print(f"{outcome:7} {c.group} / {c.name} ({seconds:.1f} s): {detail}")
    table: dict[str, dict[str, int]] = {}
    for r in results:
        counts = table.setdefault(r["group"], dict.fromkeys((CLEAN, OK, *BAD), 0))
        counts[r["outcome"]] += 1
    print(f"\n{'group':16}" + "".join(f"{k:>8}" for k in (CLEAN, OK, *BAD)))
    for group, counts in table.items():
        print(f"{group:16}" + "".join(f"{n:>8}" for n in counts.values()))
    totals = {k: sum(c[k] for c in table.values()) for k in (CLEAN, OK, *BAD)}
    print(f"{'all ' + str(len(results)):16}" + "".join(f"{n:>8}" for n in totals.values()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if any(totals[k] for k in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
