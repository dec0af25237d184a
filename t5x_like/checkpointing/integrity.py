"""Content fingerprints of arrays, equal for every sharding: a checkpoint's integrity check.

A checkpoint records one 32-bit fingerprint per array when it is saved and compares
it with the fingerprint of what it restores (checkpointing/checkpoints.py), so flipped or
overwritten bytes anywhere between the devices at save time and the devices at
restore time (disk, network file system, our own resharding) are caught, and the
checkpoint is set aside instead of training on garbage.

Why a fingerprint of the values rather than a checksum of each file: the files are
Orbax's (OCDBT chunks written by every process, renamed into place by its own
commit), so a per-file manifest would need a hook inside Orbax's commit and a second
read of every byte to verify. The fingerprint is a function of the *global* array
alone (dtype, shape and every bit), computed where the array already is, by one
jitted reduction over all arrays: each element's bits, XOR'd with a hash of its
position and passed through a 32-bit mixer (murmur3's finaliser), are summed with
wraparound, and the CRC of the dtype and shape is XOR'd in on the host. Integer sums are exact in any order, so a 4x2 mesh, one device or two
processes all get the same number and every process reaches the same verdict. Any
change to one element changes the sum; changes to several cancel with probability
about 2^-32. Its cost (a pass over the state in device memory) is in
benchmarks/RESULTS.md ("Checkpoint integrity").
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Bumped if the function below ever changes: a fingerprint is only compared with one
# of the same version.
VERSION = 1

_GOLDEN = np.uint32(0x9E3779B1)       # odd multiplier spreading positions (Knuth)


def _mix(x_u32: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: every input bit affects every output bit."""
    x_u32 = x_u32 ^ (x_u32 >> 16)
    x_u32 = x_u32 * np.uint32(0x85EBCA6B)
    x_u32 = x_u32 ^ (x_u32 >> 13)
    x_u32 = x_u32 * np.uint32(0xC2B2AE35)
    return x_u32 ^ (x_u32 >> 16)


def _bits_as_uint32(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 elements (8-byte types gain a trailing axis of 2)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
    bits = _bits_as_uint32(x)
    position = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):       # row-major index, no reshape (no resharding)
        position = position + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) \
            * np.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    return jnp.sum(_mix(bits ^ (position * _GOLDEN)), dtype=jnp.uint32)


@jax.jit
def _fingerprints(leaves: Sequence[jax.Array]) -> jax.Array:
    return jnp.stack([_fingerprint(x) for x in leaves]) if leaves else \
        jnp.zeros((0,), jnp.uint32)


def fingerprints(arrays: Mapping[str, Any]) -> dict[str, int]:
    """{name: fingerprint} of each array (jax or numpy), computed where it lives.

    Every process must call it with the same names (a collective when the arrays
    span processes).
    """
    # One computation per set of devices (a jitted function takes arrays of one set).
    groups: dict[Any, list[str]] = {}
    for name, value in arrays.items():
        devices = tuple(sorted(d.id for d in value.sharding.device_set)) \
            if isinstance(value, jax.Array) else None
        groups.setdefault(devices, []).append(name)
    result = {}
    for names in groups.values():
        values = _fingerprints([jnp.asarray(arrays[n]) for n in names])
        # A fully replicated result: every process holds the whole vector.
        host = np.asarray(values.addressable_data(0))
        result.update({n: int(v) ^ _layout_tag(arrays[n]) for n, v in zip(names, host)})
    return result


def _layout_tag(array: Any) -> int:
    return zlib.crc32(f"{array.dtype}{tuple(array.shape)}".encode())


def mismatches(expected: Mapping[str, int], arrays: Mapping[str, Any]) -> list[str]:
    """Names of arrays whose fingerprint differs from `expected` (or is not in it)."""
    actual = fingerprints(arrays)
    return sorted(n for n, value in actual.items() if expected.get(n) != value)
