"""Array fingerprints: the same for every sharding, different for any changed bit."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from t5x_like.checkpointing import integrity


def test_fingerprint_is_independent_of_sharding_and_placement():
    x = jax.random.normal(jax.random.key(0), (64, 48))
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
    placements = {"one_device": x, "host": np.asarray(x),
                  "4x2": jax.device_put(x, NamedSharding(mesh, P("a", "b"))),
                  "columns": jax.device_put(x, NamedSharding(mesh, P(None, "b"))),
                  "replicated": jax.device_put(x, NamedSharding(mesh, P()))}
    assert len(set(integrity.fingerprints(placements).values())) == 1


def test_any_changed_element_changes_the_fingerprint():
    x = np.asarray(jax.random.normal(jax.random.key(1), (32, 16)))
    expected = integrity.fingerprints({"x": x})
    flipped = x.copy()
    flipped.view(np.uint32)[5, 7] ^= 1                    # one bit of one element
    swapped = x.copy()
    swapped[0, 0], swapped[0, 1] = x[0, 1], x[0, 0]       # same values, other places
    signs = x.copy()
    signs[2, :2] = -signs[2, :2]                          # two sign bits
    for changed in (flipped, swapped, signs, x.reshape(16, 32)):
        assert integrity.mismatches(expected, {"x": changed}) == ["x"]
    assert integrity.mismatches(expected, {"x": x.copy()}) == []


def test_every_dtype_of_a_train_state():
    x = jax.random.normal(jax.random.key(2), (8, 4))
    arrays = {"f32": x, "bf16": x.astype(jnp.bfloat16), "i32": jnp.arange(5),
              "bool": x > 0, "step": jnp.int32(7), "u8": jnp.arange(4, dtype=jnp.uint8),
              "key": jax.random.key(3)}
    prints = integrity.fingerprints(arrays)
    assert set(prints) == set(arrays) and len(set(prints.values())) == len(arrays)
    assert all(0 <= v < 2**32 for v in prints.values())
