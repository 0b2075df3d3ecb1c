"""Training checkpoints with orbax: the trainable adapter leaves, the optimizer state and the step.

Saves are asynchronous (training goes on while the arrays are written) and atomic (orbax writes a
temporary directory and renames it when every process has finished, so a run killed mid-save
leaves the previous checkpoint as the latest). Restoring builds each array directly with the
sharding it is given, so a checkpoint written on one mesh restores onto any other.

Only what training changes is saved: the frozen base weights come from the model checkpoint and
the adapter's config from the run's options. Leaves are stored as a flat list, in the order of
the adapter and optimizer-state trees, with their key paths and shapes in the JSON metadata to
check that a resumed run has the same structure.

A checkpoint folder belongs to one run: given an `identity` (what decides the result: the model
and data fingerprints, the method config, seed, batch size, schedule), the first checkpointer of
a folder records it in `run_identity.json`, and a later one with another identity is refused,
naming the entries that differ. A folder that holds other files and no identity is refused too.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jpeft.tree import path_str

IDENTITY_FILE = "run_identity.json"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run resuming from it."""


class TrainCheckpointer:
    """Periodic train-state checkpoints in `directory` (a local path or a gs:// bucket).

    `save_every`: save when `step % save_every == 0` (and always when `force=True`);
    `keep`: how many of the latest checkpoints to keep; `identity`: JSON-able entries that
    decide the result (see the module docstring), checked against the folder's.
    """

    def __init__(
        self,
        directory: str,
        *,
        save_every: int,
        keep: int = 2,
        identity: Mapping[str, Any] | None = None,
    ):
        if save_every < 1:
            raise ValueError(f"checkpoint interval must be at least 1 step, got {save_every}")
        if "://" not in directory:
            directory = os.path.abspath(directory)
        self.directory = directory
        self.save_every = save_every
        self._closed = False
        if identity is not None:
            _claim(epath.Path(directory), json.loads(json.dumps(identity)))
        self._manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
        )

    def latest_step(self) -> int | None:
        """The last completely written step, or None when there is none."""
        return self._manager.latest_step()

    def save(
        self, step: int, trainable: Any, opt_state: Any, extra: dict | None = None, force=False
    ) -> bool:
        """Start saving the state after `step` steps; returns whether a save was started.

        `extra` is JSON metadata stored with it (e.g. the loss history), copied now: the
        write happens later, while the caller goes on changing its own objects.
        """
        if step % self.save_every and not force:
            return False
        arrays, paths = _flat(trainable, opt_state)
        meta = {
            "step": step,
            "paths": paths,
            "shapes": [list(np.shape(x)) for x in arrays],
            "extra": copy.deepcopy(extra or {}),
        }
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
            force=True,  # the interval is decided above (orbax would also save a first step)
        )

    def restore(self, step: int, trainable: Any, opt_state: Any) -> tuple[Any, Any, dict]:
        """The state saved at `step`, shaped and sharded like `trainable` and `opt_state`
        (arrays or `jax.ShapeDtypeStruct`s with shardings); returns (trainable, opt_state,
        extra)."""
        leaves, paths = _flat(trainable, opt_state)
        meta = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta
        here = [[p, list(np.shape(x))] for p, x in zip(paths, leaves, strict=True)]
        there = [list(pair) for pair in zip(meta["paths"], meta["shapes"], strict=True)]
        if here != there:
            pairs = zip(there, here, strict=False)  # the shorter list ends the search
            i = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
            first = (
                f"its leaf {there[i][0]} {there[i][1]} vs this run's {here[i][0]} {here[i][1]}"
                if i is not None
                else f"{len(there)} leaves vs this run's {len(here)}"
            )
            raise CheckpointError(
                f"the checkpoint at {self.directory}/{step} holds another adapter or optimizer: "
                f"{first}; resume with the options it was written with, or use a new "
                "--checkpoint-dir"
            )
        target = [
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
            for x in leaves
        ]
        restored = self._manager.restore(
            step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(target))
        )
        arrays = list(restored.arrays)
        n = len(jax.tree.leaves(trainable))
        trainable = jax.tree.unflatten(jax.tree.structure(trainable), arrays[:n])
        opt_state = jax.tree.unflatten(jax.tree.structure(opt_state), arrays[n:])
        return trainable, opt_state, meta["extra"]

    def wait(self) -> None:
        """Block until the last save has been written completely."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish the saves in flight and release the manager (again: nothing)."""
        if self._closed:
            return
        self._manager.wait_until_finished()
        self._manager.close()
        self._closed = True


def _flat(trainable: Any, opt_state: Any) -> tuple[list, list[str]]:
    """The leaves of both trees in order, and their key paths ("adapter/..." / "opt_state/...")."""
    leaves, paths = [], []
    for prefix, tree in (("adapter", trainable), ("opt_state", opt_state)):
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            leaves.append(leaf)
            paths.append(f"{prefix}/{path_str(key_path)}")
    return leaves, paths


def _claim(folder: epath.Path, identity: dict[str, Any]) -> None:
    """Record `identity` in a new or empty `folder`, or check it against the one recorded there
    (CheckpointError naming each differing entry, or the folder's other files)."""
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} is a file; give a folder path")
    record = folder / IDENTITY_FILE
    if record.exists():
        try:
            recorded = json.loads(record.read_text())
        except ValueError as err:
            raise CheckpointError(f"{record} is not valid JSON ({err}); is it damaged?") from None
        differing = [
            f"{key}: {recorded.get(key)!r} there, {identity.get(key)!r} now"
            for key in sorted(set(recorded) | set(identity))
            if recorded.get(key) != identity.get(key)
        ]
        if differing:
            raise CheckpointError(
                f"the checkpoints in {folder} belong to another run ({'; '.join(differing)}); "
                "resume with the options they were written with, or use a new checkpoint folder"
            )
        return
    if folder.exists() and any(folder.iterdir()):
        raise CheckpointError(
            f"checkpoint folder {folder} holds files and no {IDENTITY_FILE}: it was not made by "
            "this run; give a new or empty folder"
        )
    if jax.process_index() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{IDENTITY_FILE}.tmp"
        temporary.write_text(json.dumps(identity, indent=2, sort_keys=True))
        temporary.rename(record)
