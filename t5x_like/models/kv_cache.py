"""The key/value cache of autoregressive decoding, shared by every model family.

Decoding feeds a model a few new positions at a time: the whole prompt once
(prefill), then one generated token per step. Every self-attention layer keeps the
keys and values of all positions it has seen in a *preallocated* buffer
[B, T, kv_heads, head_dim] (Flax collection 'cache', variables `cached_key` and
`cached_value`), writes the new positions at a slot index, and attends from the new
queries to the whole buffer through a mask that says which slots each query may
see. Preallocated rather than grown, so every step has the same shapes: the decode
loop compiles once and runs inside one `lax.while_loop`.

Cross-attention (encoder-decoder) caches the keys and values of the encoded input
once, at the first decoder call (`cross_key` / `cross_value`), and reads them back at
every later step instead of projecting the encoder output again.

What a slot is, is the model's business: the decoder-only model left-aligns
prompts of different lengths so that all rows write the same slot at each step (one
scalar index, one `dynamic_update_slice`), and masks each row's left padding.

Beam search reorders a model's decoding state along its beams after every step,
within each example (so under a mesh the cache stays on its batch shard). A state
field declared `same_for_every_beam()` (the encoded input's cross-attention
keys/values, the encoder padding) is identical for all beams of an example, so it
is repeated once and never reordered: that saves copying it at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

Array = jax.Array


SAME_FOR_EVERY_BEAM = 'same_for_every_beam'


def same_for_every_beam():
    """A decoding-state field that beam search need not reorder (see the top)."""
    return flax.struct.field(metadata={SAME_FOR_EVERY_BEAM: True})


def split_cross_attention(cache: Mapping[str, Any]) -> tuple[dict, dict]:
    """A 'cache' collection -> (self-attention part, cross-attention part)."""
    flat = traverse_util.flatten_dict(cache)
    cross = {k: v for k, v in flat.items() if k[-1] in ('cross_key', 'cross_value')}
    rest = {k: v for k, v in flat.items() if k not in cross}
    return traverse_util.unflatten_dict(rest), traverse_util.unflatten_dict(cross)


def merge(*caches: Mapping[str, Any]) -> dict:
    """The inverse of `split_cross_attention`."""
    flat = {}
    for cache in caches:
        flat.update(traverse_util.flatten_dict(cache))
    return traverse_util.unflatten_dict(flat)


@flax.struct.dataclass
class CacheWrite:
    """What an attention layer needs to run new positions against its cache.

    index: scalar int32, the slot of the first new position (the others follow).
    mask_Bx1xQxT: bool, broadcastable; True where new query q may attend to slot t.
      Its last dimension is the cache length T (the buffer is created that long).
    """

    index: Array
    mask_Bx1xQxT: Array

    @property
    def length(self) -> int:
        return self.mask_Bx1xQxT.shape[-1]


def causal_mask(*, first_slot_B: Array | None, index: Array, q_len: int,
                length: int) -> Array:
    """[B|1, 1, Q, T]: query q (at slot index + q) sees slots first_slot..index + q.

    `first_slot_B` is each row's first real slot (its left padding); None means 0.
    """
    slots_T = jnp.arange(length, dtype=jnp.int32)
    query_slots_Q = index + jnp.arange(q_len, dtype=jnp.int32)
    mask = slots_T[None, None, None, :] <= query_slots_Q[None, None, :, None]
    if first_slot_B is not None:
        mask = mask & (slots_T[None, :] >= first_slot_B[:, None])[:, None, None, :]
    return mask


def write(module: nn.Module, k_BxQxGxD: Array, v_BxQxGxD: Array, step: CacheWrite, *,
          logical_axes: Sequence[str]) -> tuple[Array, Array]:
    """Stores this call's keys/values at slot `step.index`; returns the whole buffers.

    Call from inside an attention module's compact method with the 'cache'
    collection mutable. The buffers are created (zeros, `step.length` slots) on the
    first call and sharded like the keys (`logical_axes`, e.g. batch over the data
    axes and kv heads over `model`).
    """
    batch, _, heads, head_dim = k_BxQxGxD.shape
    shape = (batch, step.length, heads, head_dim)
    cached_k = module.variable('cache', 'cached_key', jnp.zeros, shape, k_BxQxGxD.dtype)
    cached_v = module.variable('cache', 'cached_value', jnp.zeros, shape, v_BxQxGxD.dtype)
    start = (0, step.index, 0, 0)
    cached_k.value = nn.with_logical_constraint(
        jax.lax.dynamic_update_slice(cached_k.value, k_BxQxGxD.astype(cached_k.value.dtype),
                                     start), logical_axes)
    cached_v.value = nn.with_logical_constraint(
        jax.lax.dynamic_update_slice(cached_v.value, v_BxQxGxD.astype(cached_v.value.dtype),
                                     start), logical_axes)
    return cached_k.value, cached_v.value


def cross_attention_kv(module: nn.Module,
                       project: Callable[[], tuple[Array, Array]] | None
                       ) -> tuple[Array, Array]:
    """Keys/values of the encoded input: computed and stored by `project()` on the
    first decoder call, read back from the cache when `project` is None."""
    if project is None:
        return (module.get_variable('cache', 'cross_key'),
                module.get_variable('cache', 'cross_value'))
    k, v = project()
    module.put_variable('cache', 'cross_key', k)
    module.put_variable('cache', 'cross_value', v)
    return k, v
