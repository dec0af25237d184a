import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t5x_like.parallel import partitioning


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


def test_unknown_logical_axis_is_named_and_the_table_names_only_mesh_axes():
    part = partitioning.Partitioner(devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="'embedd'"):
        part.logical_to_mesh_spec(("embedd", "mlp"))
    for _, axes in partitioning.LOGICAL_AXIS_RULES:
        assert set(axes if isinstance(axes, tuple) else (axes,)) <= {*partitioning.MESH_AXES, None}


# Each former rules preset is now just its mesh shape (8 devices); same specs.
@pytest.mark.parametrize("mesh,param,activation,expected_param,expected_act", [
    (dict(data_parallelism=8), ("embed", "mlp"), ("batch", "length", "embed"),
     P(None, None), P(("data", "fsdp"), None, None)),
    (dict(data_parallelism=1, fsdp_parallelism=8), ("embed", "mlp"),
     ("batch", "length", "embed"), P("fsdp", None), P(("data", "fsdp"), None, None)),
    (dict(data_parallelism=1, tensor_parallelism=8), ("embed", "mlp"),
     ("batch", "length", "mlp"), P(None, "model"), P(("data", "fsdp"), None, "model")),
    (dict(data_parallelism=1, fsdp_parallelism=4, tensor_parallelism=2), ("vocab", "embed"),
     ("batch", "length", "vocab"), P("model", "fsdp"), P(("data", "fsdp"), None, "model")),
], ids=["data_parallel", "fsdp", "tensor_parallel", "fsdp_tp"])
def test_mesh_shape_alone_maps_logical_axes(mesh, param, activation, expected_param,
                                            expected_act):
    part = partitioning.Partitioner(**mesh)
    assert part.logical_to_mesh_spec(param) == expected_param
    # An activation's `embed` must not reuse `fsdp`, which its batch dim already took.
    assert part.logical_to_mesh_spec(activation) == expected_act


def test_an_fsdp_mesh_really_splits_parameters():
    """The defect the single table fixes: the batch split over fsdp while the
    parameters, under rules that disagreed with the mesh, silently stayed whole."""
    part = partitioning.Partitioner(data_parallelism=1, fsdp_parallelism=8)
    assert part.sharding(("embed", "mlp")).spec == P("fsdp", None)
    assert part.strategy == "FSDP" and "FSDP" in repr(part)
    assert partitioning.Partitioner(data_parallelism=8).strategy == "data parallel"
    assert partitioning.Partitioner(data_parallelism=2, fsdp_parallelism=2,
                                    tensor_parallelism=2).strategy == "DP x FSDP x TP"


def test_host_local_batch_becomes_sharded_global_array():
    part = partitioning.Partitioner(data_parallelism=4, fsdp_parallelism=2)
    local = {"tokens": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    global_batch = partitioning.global_batch(local, part)["tokens"]
    assert global_batch.shape == (8, 3)
    assert global_batch.sharding.spec == P(("data", "fsdp"), None)
    assert len(global_batch.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(global_batch), local["tokens"])
