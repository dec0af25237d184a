import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from t5x_like.checkpointing import checkpoints
from t5x_like.parallel import partitioning


def sharded_state(mesh):
    w = jax.device_put(jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8) / 7,
                       NamedSharding(mesh, P("fsdp", None)))
    b = jax.device_put(jnp.linspace(-1, 1, 8, dtype=jnp.bfloat16), NamedSharding(mesh, P()))
    return {"step": jnp.asarray(5, jnp.int32), "params": {"w": w, "b": b}}


def test_async_save_and_sharded_restore_are_bitwise(tmp_path):
    mesh = partitioning.make_mesh(data=1, fsdp=8, model=1)
    state = sharded_state(mesh)
    ckpt = checkpoints.Checkpointer(directory=str(tmp_path))
    ckpt.save(5, state, data_position={"step": 5, "seed": 0})
    ckpt.close()

    restorer = checkpoints.Checkpointer(directory=str(tmp_path))
    assert restorer.latest_step() == 5 and restorer.all_steps() == [5]
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, data_position = restorer.restore(5, abstract_state=abstract)
    assert data_position == {"step": 5, "seed": 0}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    restorer.close()


def test_keeps_only_the_latest_checkpoints(tmp_path):
    state = {"x": jnp.ones((4,))}
    ckpt = checkpoints.Checkpointer(directory=str(tmp_path), max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, state, data_position={"step": step})
    ckpt.close()
    assert checkpoints.Checkpointer(directory=str(tmp_path)).all_steps() == [2, 3]
