"""Multi-slice meshes: the `data` axis spans slices (DCN), everything else stays in one."""

import jax
import numpy as np
import pytest

from t5x_like.parallel import partitioning


def test_cpu_devices_split_into_consecutive_slices():
    devices = jax.devices()[:8]
    part = partitioning.Partitioner(data_parallelism=1, fsdp_parallelism=-1,
                                    devices=devices, num_slices=2)
    assert dict(part.mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
    assert part.data_shards == 8
    grid = part.mesh.devices
    assert {d.id for d in grid[0].flat} == {d.id for d in devices[:4]}
    assert {d.id for d in grid[1].flat} == {d.id for d in devices[4:]}
    assert "slices=2" in repr(part)


def test_per_slice_axes_and_minus_one_fill():
    mesh = partitioning.make_mesh(data=-1, fsdp=2, model=1, num_slices=2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "model": 1}   # 2 slices x 2 per slice
    with pytest.raises(ValueError, match="num_slices=3"):
        partitioning.make_mesh(num_slices=3)


def test_one_step_is_the_same_on_two_slices_as_on_one():
    from t5x_like.training import optimizers
    from t5x_like.training import trainer
    from t5x_like.models import t5
    model = t5.EncoderDecoderModel(config=t5.T5Config(
        vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
        num_encoder_layers=1, num_decoder_layers=1))
    optimizer = optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule())
    lengths = {"encoder_input_tokens": 8, "decoder_input_tokens": 4,
               "decoder_target_tokens": 4, "decoder_loss_weights": 4}
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(1, 64, (8, n), dtype=np.int32) for k, n in lengths.items()}
    batch["decoder_loss_weights"] = np.ones((8, 4), np.int32)

    def one_step(part):
        layout = trainer.state_layout(model=model, optimizer=optimizer, partitioner=part,
                                      feature_lengths=lengths)
        state = trainer.init_train_state(model=model, optimizer=optimizer, partitioner=part,
                                         feature_lengths=lengths, seed=0, layout=layout)
        step = trainer.jit_train_step(
            trainer.make_train_step(model=model, optimizer=optimizer), partitioner=part,
            layout=layout, batch_feature_names=tuple(lengths))
        _, metrics = step(state, partitioning.global_batch(batch, part))
        return float(metrics["loss"]), float(metrics["grad_norm"])

    single = one_step(partitioning.Partitioner(data_parallelism=2,
                                               fsdp_parallelism=4))
    multi = one_step(partitioning.Partitioner(data_parallelism=1,
                                              fsdp_parallelism=4, num_slices=2))
    np.testing.assert_allclose(multi, single, rtol=1e-5)


def test_tpu_slices_are_told_apart_by_slice_index():
    pytest.importorskip("libtpu")
    from t5x_like.parallel import topologies
    tpu = topologies.parse("v5e:2x2", num_slices=2)
    part = partitioning.Partitioner(data_parallelism=1, fsdp_parallelism=-1,
                                    devices=topologies.compile_only_devices(tpu),
                                    num_slices=2)
    assert dict(part.mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
    for row, devices in enumerate(part.mesh.devices):
        assert {d.slice_index for d in devices.flat} == {row}
