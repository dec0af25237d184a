"""Splash attention (the TPU Pallas kernel) against the einsum path, on CPU.

The kernel runs in Pallas interpret mode (the same kernel code, executed by the
CPU) under `shard_map` on an 8-device mesh: batch rows over data x fsdp, heads over
the model axis. Before, the kernel was vmapped with no shard_map (XLA refuses to
partition a Mosaic kernel), lengths that were not a multiple of its block failed,
and the only test compared the einsum path with itself (splash fell back on CPU).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.parallel import partitioning
from t5x_like.models import attention

B, L, H, G, D = 4, 200, 4, 2, 64      # 200: not a multiple of the 256 block it pads to


def _inputs():
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, L, H, D), jnp.float32)
    k = jax.random.normal(keys[1], (B, L, G, D), jnp.float32)
    v = jax.random.normal(keys[2], (B, L, G, D), jnp.float32)
    segments = np.zeros((B, L), np.int32)       # packed rows, then padding (segment 0)
    segments[:, :90], segments[:, 90:150], segments[:, 150:190] = 1, 2, 3
    segments[1, :] = 1                            # one row: a single sequence, no padding
    return q, k, v, jnp.asarray(segments)


def _splash_and_einsum(causal, segments, q, k, v):
    partitioner = partitioning.Partitioner(data_parallelism=2, fsdp_parallelism=2,
                                           tensor_parallelism=2)

    def attend(impl, q, k, v):
        return attention.attend(q, k, v, implementation=impl, scale=D ** -0.5,
                                causal=causal, segment_ids_BxL=segments)
    with jax.set_mesh(partitioner.mesh), nn.logical_axis_rules(partitioner.rules), \
            attention.compiling_for("tpu", interpret_kernels=True):
        assert attention.choose_implementation(
            "splash", dtype=jnp.float32, has_bias=False, has_prefix=False,
            dropout=False) == "splash"
        splash = jax.jit(lambda *a: attend("splash", *a))
        einsum = jax.jit(lambda *a: attend("xla", *a))
        sharding = partitioner.sharding(("batch", "length", "heads", "kv"))
        q = jax.device_put(q, sharding)
        hlo = splash.lower(q, k, v).as_text()         # the kernel runs per shard
        assert "manual_computation" in hlo or "SPMDFullToShardShape" in hlo
        return splash, einsum, q


@pytest.mark.parametrize("causal", [True, False])
def test_splash_under_shard_map_equals_einsum_on_packed_rows(causal):
    q, k, v, segments = _inputs()
    real = np.asarray(segments) > 0
    splash, einsum, q = _splash_and_einsum(causal, segments, q, k, v)
    out, ref = np.asarray(splash(q, k, v)), np.asarray(einsum(q, k, v))
    np.testing.assert_allclose(out[real], ref[real], atol=2e-5)

    # Attending across segments would move segment 1's outputs when the others'
    # values change: in the packed rows (not row 1, one sequence) they must not move.
    moved = np.asarray(splash(q, k, v.at[:, 90:].multiply(-3.0)))
    packed = [0, 2, 3]
    np.testing.assert_allclose(moved[packed, :90], out[packed, :90], atol=1e-6)


def test_splash_gradients_equal_einsums():
    q, k, v, segments = _inputs()
    real = (segments > 0)[..., None, None]
    splash, einsum, q = _splash_and_einsum(True, segments, q, k, v)

    def grads(fn):
        loss = lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v), 0.0) ** 2)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads(splash), grads(einsum)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                                   atol=1e-4 * float(jnp.abs(want).max()))
