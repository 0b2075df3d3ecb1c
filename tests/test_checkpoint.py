"""jpeft.checkpoint: train state saved on one mesh restores onto another, or onto one device."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from test_sharding import ADAPTERS, MODEL

import jpeft
from jpeft import sharding as js
from jpeft.checkpoint import CheckpointError, TrainCheckpointer


def sharded_state(params, mesh, optimizer):
    """A trained-looking adapter's trainable leaves and AdamW state, placed on `mesh`."""
    adapter = jpeft.init_adapter(params, ADAPTERS["lora"], key=jax.random.key(1))
    adapter = jax.tree.map(lambda x: x + 0.01, adapter)  # lora_B away from zero
    trainable = jpeft.partition(js.shard(adapter, mesh, like=params))[0]
    opt_state = js.init_optimizer(optimizer, trainable)
    updates, opt_state = optimizer.update(trainable, opt_state, trainable)  # moments non-zero
    return trainable, opt_state


@pytest.mark.slow  # 17 s: in the slow set
def test_state_saved_on_one_mesh_restores_onto_another_and_onto_one_device(tmp_path):
    params = MODEL.init(jax.random.key(0))
    optimizer = optax.adamw(1e-2)
    saved_on = js.make_mesh(data=2, fsdp=2, model=2)
    trainable, opt_state = sharded_state(params, saved_on, optimizer)
    checkpointer = TrainCheckpointer(str(tmp_path / "ckpt"), save_every=5)
    assert not checkpointer.save(3, trainable, opt_state)  # not a multiple of 5
    assert checkpointer.save(5, trainable, opt_state, {"loss": [1.0, 0.5]})
    checkpointer.wait()
    assert checkpointer.latest_step() == 5

    restored_on = js.make_mesh(data=1, fsdp=8, model=1)
    like_trainable, like_opt = sharded_state(params, restored_on, optimizer)
    got_trainable, got_opt, extra = checkpointer.restore(5, like_trainable, like_opt)
    assert extra == {"loss": [1.0, 0.5]}
    for got, like, want in zip(
        jax.tree.leaves((got_trainable, got_opt)),
        jax.tree.leaves((like_trainable, like_opt)),
        jax.tree.leaves((trainable, opt_state)),
        strict=True,
    ):
        assert got.sharding == like.sharding
        np.testing.assert_array_equal(got, want)

    single = jax.tree.map(np.asarray, (trainable, opt_state))
    on_one_device = jax.tree.map(jax.numpy.zeros_like, jax.device_put(single))
    got_trainable, got_opt, _ = checkpointer.restore(5, *on_one_device)
    restored = jax.tree.leaves((got_trainable, got_opt))
    for got, want in zip(restored, jax.tree.leaves(single), strict=True):
        assert len(got.sharding.device_set) == 1
        np.testing.assert_array_equal(got, want)
    checkpointer.close()


def test_resuming_with_another_adapter_is_refused(tmp_path):
    params = MODEL.init(jax.random.key(0))
    optimizer = optax.adamw(1e-2)
    mesh = js.make_mesh(data=2, fsdp=2, model=2)
    trainable, opt_state = sharded_state(params, mesh, optimizer)
    checkpointer = TrainCheckpointer(str(tmp_path / "ckpt"), save_every=1)
    checkpointer.save(1, trainable, opt_state)
    checkpointer.wait()
    other = jpeft.init_adapter(
        params, jpeft.LoraConfig(r=4, target_modules=["q_proj"]), key=jax.random.key(1)
    )
    other_trainable = jpeft.partition(other)[0]
    with pytest.raises(CheckpointError, match="another adapter or optimizer"):
        checkpointer.restore(1, other_trainable, optimizer.init(other_trainable))
    checkpointer.close()


def test_resuming_with_another_rank_is_refused(tmp_path):
    params = MODEL.init(jax.random.key(0))
    optimizer = optax.adamw(1e-2)
    mesh = js.make_mesh(data=2, fsdp=2, model=2)
    trainable, opt_state = sharded_state(params, mesh, optimizer)  # r=4
    checkpointer = TrainCheckpointer(str(tmp_path / "ckpt"), save_every=1)
    checkpointer.save(1, trainable, opt_state)
    checkpointer.wait()
    config = jpeft.LoraConfig(r=8, target_modules="all-linear")
    other = jpeft.partition(jpeft.init_adapter(params, config, key=jax.random.key(1)))[0]
    with pytest.raises(
        CheckpointError, match=r"lora_A.weight \[4, 128\] vs this run's .* \[8, 128\]"
    ):
        checkpointer.restore(1, other, optimizer.init(other))
    checkpointer.close()
