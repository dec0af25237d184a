import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t5x_like import partitioning


def test_mesh_fills_the_minus_one_axis():
    assert partitioning.resolve_mesh_shape(num_devices=8, data=-1, fsdp=2, model=2) == (2, 2, 2)
    assert partitioning.resolve_mesh_shape(num_devices=8, data=1, fsdp=-1, model=1) == (1, 8, 1)
    mesh = partitioning.make_mesh(data=2, fsdp=-1, model=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}


@pytest.mark.parametrize("shape", [dict(data=3, fsdp=-1, model=1),
                                   dict(data=-1, fsdp=-1, model=1),
                                   dict(data=2, fsdp=2, model=1)])
def test_impossible_mesh_is_a_clear_error(shape):
    with pytest.raises(ValueError, match="devices|-1"):
        partitioning.resolve_mesh_shape(num_devices=8, **shape)


def test_unknown_preset_and_unknown_mesh_axis_are_named():
    with pytest.raises(ValueError, match="'fsdpp'"):
        partitioning.resolve_rules("fsdpp")
    with pytest.raises(ValueError, match="'tensor'"):
        partitioning.resolve_rules([("mlp", "tensor")])


@pytest.mark.parametrize("preset,param,activation,expected_param,expected_act", [
    ("data_parallel", ("embed", "mlp"), ("batch", "length", "embed"),
     P(None, None), P(("data", "fsdp"), None, None)),
    ("fsdp", ("embed", "mlp"), ("batch", "length", "embed"),
     P("fsdp", None), P(("data", "fsdp"), None, None)),
    ("tensor_parallel", ("embed", "mlp"), ("batch", "length", "mlp"),
     P(None, "model"), P(("data", "fsdp"), None, "model")),
    ("fsdp_tp", ("vocab", "embed"), ("batch", "length", "vocab"),
     P("model", "fsdp"), P(("data", "fsdp"), None, "model")),
])
def test_presets_map_logical_axes(preset, param, activation, expected_param, expected_act):
    part = partitioning.Partitioner(rules=preset, devices=jax.devices()[:1])
    assert part.logical_to_mesh_spec(param) == expected_param
    # An activation's `embed` must not reuse `fsdp`, which its batch dim already took.
    assert part.logical_to_mesh_spec(activation) == expected_act


def test_host_local_batch_becomes_sharded_global_array():
    part = partitioning.Partitioner(data_parallelism=4, fsdp_parallelism=2)
    local = {"tokens": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    global_batch = partitioning.host_local_to_global(local, part)["tokens"]
    assert global_batch.shape == (8, 3)
    assert global_batch.sharding.spec == P(("data", "fsdp"), None)
    assert len(global_batch.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(global_batch), local["tokens"])
