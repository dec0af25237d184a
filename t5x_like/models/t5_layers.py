"""The layers only T5 uses: its attention, relative position biases, and the
encoder and decoder layers built from them (Flax Linen).

T5 (Mesh TensorFlow) initialisation: attention logits are *not* divided by
sqrt(head_dim); instead the query kernel starts smaller. The layer modules
(`EncoderLayer`, `DecoderLayer`) take the shared relative position bias and masks
as arguments, so `layers.apply_stack` can loop or `nn.scan` over them.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.models import attention, kv_cache
from t5x_like.models.layers import (BLE, BLHK, DenseGeneral, MlpBlock, RMSNorm,
                                    truncated_normal_init)

Array = jax.Array


def fan_avg_uniform_init(key, shape, dtype=jnp.float32):
    """Glorot-uniform over the two axes of a 2-D table (used for relpos biases)."""
    fan_avg = (shape[0] + shape[1]) / 2.0
    limit = math.sqrt(3.0 / fan_avg)
    return jax.random.uniform(key, shape, jnp.float32, -limit, limit).astype(dtype)


class MultiHeadDotProductAttention(nn.Module):
    """Multi-head attention with T5 scaling (none on logits; smaller q init).

    `mask_Bx1xQxK` is boolean (True = may attend) and broadcastable;
    `bias_1xHxQxK` is an additive float32 bias (relative positions) or None.

    Decoding (kv_cache.py): with `cache_write`, self-attention writes this call's
    keys/values into the cache and attends to all of it under the write's mask; with
    `cache_cross`, cross-attention projects `inputs_kv` once and stores the result,
    and later calls pass `inputs_kv=None` to read it back.
    """

    num_heads: int
    head_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    attention_impl: str = 'xla'  # see models/attention.py
    recompute_weights: bool = False  # see attention.attend

    @nn.compact
    def __call__(
        self,
        inputs_q_BxQxD: Array,
        inputs_kv_BxKxD: Array,
        *,
        mask_Bx1xQxK: Array | None,
        bias_1xHxQxK: Array | None,
        enable_dropout: bool,
        cache_write: kv_cache.CacheWrite | None = None,
        cache_cross: bool = False,
    ) -> Array:
        emb_dim = inputs_q_BxQxD.shape[-1]
        inner_dim = self.num_heads * self.head_dim
        proj = functools.partial(
            DenseGeneral,
            features=(self.num_heads, self.head_dim),
            kernel_axes=('embed', 'heads', 'kv'),
            dtype=self.dtype,
        )
        q_init = truncated_normal_init((emb_dim * self.head_dim) ** -0.5)
        kv_init = truncated_normal_init(emb_dim**-0.5)
        q_BxQxHxK = nn.with_logical_constraint(
            proj(kernel_init=q_init, name='query')(inputs_q_BxQxD), BLHK)

        def project_kv():
            return (nn.with_logical_constraint(
                        proj(kernel_init=kv_init, name='key')(inputs_kv_BxKxD), BLHK),
                    nn.with_logical_constraint(
                        proj(kernel_init=kv_init, name='value')(inputs_kv_BxKxD), BLHK))

        if cache_cross:
            k_BxKxHxK, v_BxKxHxK = kv_cache.cross_attention_kv(
                self, None if inputs_kv_BxKxD is None else project_kv)
        else:
            k_BxKxHxK, v_BxKxHxK = project_kv()
        if cache_write is not None:
            k_BxKxHxK, v_BxKxHxK = kv_cache.write(self, k_BxKxHxK, v_BxKxHxK, cache_write,
                                                  logical_axes=BLHK)
            mask_Bx1xQxK = cache_write.mask_Bx1xQxT

        dropout_fn = None
        if enable_dropout and self.dropout_rate > 0:
            dropout_fn = functools.partial(nn.Dropout(self.dropout_rate), deterministic=False)
        # T5 scales nothing: the 1/sqrt(head_dim) lives in the query init instead.
        ctx_BxQxHxK = attention.attend(
            q_BxQxHxK, k_BxKxHxK, v_BxKxHxK,
            implementation=self.attention_impl,
            scale=1.0,
            causal=False,
            mask_Bx1xQxK=mask_Bx1xQxK,
            bias_1xHxQxK=bias_1xHxQxK,
            dropout_fn=dropout_fn,
            dtype=self.dtype,
            recompute_weights=self.recompute_weights,
        )
        ctx_BxQxHxK = nn.with_logical_constraint(ctx_BxQxHxK, BLHK)
        out_BxQxD = DenseGeneral(
            features=emb_dim,
            axis=(-2, -1),
            kernel_axes=('heads', 'kv', 'embed'),
            kernel_init=truncated_normal_init(inner_dim**-0.5),
            dtype=self.dtype,
            name='out',
        )(ctx_BxQxHxK)
        return nn.with_logical_constraint(out_BxQxD, BLE)


# ----------------------------------------------------------------------------
# Relative position biases
# ----------------------------------------------------------------------------


def _bucket_of_distance(n: int, *, num_buckets: int, max_distance: int) -> int:
    """Bucket for a non-negative distance n within a half of the bucket range.

    The first half of the buckets holds exact distances 0..max_exact-1; the rest
    cover max_exact..max_distance on a log scale; beyond that, the last bucket.
    """
    max_exact = num_buckets // 2
    if n < max_exact:
        return n
    log_ratio = math.log(n / max_exact) / math.log(max_distance / max_exact)
    return min(max_exact + int(log_ratio * (num_buckets - max_exact)), num_buckets - 1)


@functools.lru_cache(maxsize=None)
def _distance_bucket_table(num_buckets: int, max_distance: int) -> np.ndarray:
    """Buckets for distances 0..max_distance (everything further maps like max_distance).

    Built on the host in float64 once, so the traced computation is an exact table
    look-up (no float32 log rounding at bucket boundaries).
    """
    return np.asarray(
        [
            _bucket_of_distance(n, num_buckets=num_buckets, max_distance=max_distance)
            for n in range(max_distance + 1)
        ],
        dtype=np.int32,
    )


def relative_position_bucket(
    relative_position: Array,
    *,
    bidirectional: bool,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Array:
    """Maps (key_position - query_position) to a bucket id in [0, num_buckets).

    Bidirectional (encoder): half of the buckets for keys before the query, half
    for keys after it (offset by num_buckets // 2). Unidirectional (decoder): keys
    after the query all share bucket 0 (they are masked anyway).
    """
    rel = jnp.asarray(relative_position, jnp.int32)
    distance_back = -rel  # >0 when the key precedes the query.
    if bidirectional:
        half = num_buckets // 2
        offset = jnp.where(distance_back < 0, half, 0)
        distance = jnp.abs(distance_back)
    else:
        half = num_buckets
        offset = jnp.zeros_like(distance_back)
        distance = jnp.maximum(distance_back, 0)
    table = jnp.asarray(_distance_bucket_table(half, max_distance))
    return offset + table[jnp.minimum(distance, max_distance)]


class RelativeBias(NamedTuple):
    """A stack's relative position bias before its look-up: the learned [R, H] table
    and the [Q, K] bucket of each query/key pair. Each layer calls `dense()` itself.

    Why not one [1, H, Q, K] bias shared by the layers: its gradient is then the sum
    of every layer's attention-logit gradient, and XLA computes that sum in one
    fusion after the last layer's backward pass, keeping each layer's
    [B, H, Q, K] float32 logit gradient alive until then (7 x 48 MiB in
    T5.1.1-small's 512-token encoder at batch 8). Looked up per layer, each layer's
    backward pass reduces its own into the [R, H] table's gradient. The look-up is a
    gather of H * Q * K numbers, beside the layer's Q * K * H * D logit products;
    T5X evaluates the bias inside each layer too. The forward values are the same.
    """
    table_RxH: Array
    buckets_QxK: Array

    def dense(self) -> Array:
        """[1, H, Q, K] float32."""
        bias_QxKxH = jnp.take(self.table_RxH, self.buckets_QxK, axis=0)
        return jnp.transpose(bias_QxKxH, (2, 0, 1))[None]


class RelativePositionBiases(nn.Module):
    """Learned per-head scalar bias for each relative-position bucket (T5).

    One instance per stack; its output is shared by all the stack's layers. The
    bias depends only on key_index - query_index, which is unchanged inside a
    packed segment, so packing needs no positions here.
    """

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool

    @nn.compact
    def __call__(self, q_len: int, k_len: int, query_offset: Array | int = 0
                 ) -> RelativeBias:
        """The bias for queries at positions query_offset.. (decoding) and keys 0..k_len."""
        table_RxH = self.param(
            'rel_embedding',
            nn.with_logical_partitioning(fan_avg_uniform_init, ('relpos_buckets', 'heads')),
            (self.num_buckets, self.num_heads),
            jnp.float32,
        )
        rel_QxK = (jnp.arange(k_len, dtype=jnp.int32)[None, :]
                   - (query_offset + jnp.arange(q_len, dtype=jnp.int32))[:, None])
        buckets_QxK = relative_position_bucket(
            rel_QxK,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return RelativeBias(table_RxH, buckets_QxK)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------


class _Layer(nn.Module):
    """What T5's encoder and decoder layers share: sizes, and the residual MLP block."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    mlp_activation: str = 'gated-gelu'
    attention_impl: str = 'xla'
    recompute_attention_weights: bool = False
    enable_dropout: bool = False

    def _attention(self, name: str) -> MultiHeadDotProductAttention:
        return MultiHeadDotProductAttention(
            num_heads=self.num_heads, head_dim=self.head_dim, dropout_rate=self.dropout_rate,
            dtype=self.dtype, attention_impl=self.attention_impl,
            recompute_weights=self.recompute_attention_weights, name=name)

    def _mlp_residual(self, x_BxLxD: Array, drop: nn.Dropout) -> Array:
        h = RMSNorm(dtype=self.dtype, name='pre_mlp_layer_norm')(x_BxLxD)
        h = MlpBlock(emb_dim=x_BxLxD.shape[-1], mlp_dim=self.mlp_dim,
                     dropout_rate=self.dropout_rate, dtype=self.dtype,
                     activation=self.mlp_activation, name='mlp',
                     )(h, enable_dropout=self.enable_dropout)
        x_BxLxD = x_BxLxD + drop(h, deterministic=not self.enable_dropout)
        return nn.with_logical_constraint(x_BxLxD, BLE)


class EncoderLayer(_Layer):
    """Pre-norm self-attention + gated MLP block, each with a residual.

    `(x, relpos, mask) -> (x, None)`: the shape `nn.scan` stacks, so the same layer
    runs in a Python loop or scanned over depth.
    """

    @nn.compact
    def __call__(self, x_BxLxD: Array, relpos: RelativeBias, mask_Bx1xLxL: Array
                 ) -> tuple[Array, None]:
        drop = nn.Dropout(self.dropout_rate)
        h = RMSNorm(dtype=self.dtype, name='pre_attention_layer_norm')(x_BxLxD)
        h = self._attention('attention')(h, h, mask_Bx1xQxK=mask_Bx1xLxL,
                                         bias_1xHxQxK=relpos.dense(),
                                         enable_dropout=self.enable_dropout)
        x_BxLxD = x_BxLxD + drop(h, deterministic=not self.enable_dropout)
        return self._mlp_residual(x_BxLxD, drop), None


class DecoderLayer(_Layer):
    """Pre-norm causal self-attention, cross-attention and gated MLP blocks.

    `(y, encoded, relpos, self_mask, cross_mask, cache_write) -> (y, None)`, scannable
    like EncoderLayer. Decoding passes `cache_write` (self-attention cache, whose mask
    replaces `self_mask`) and the encoder output at the first call only (None later:
    the cross-attention keys/values are cached).
    """

    @nn.compact
    def __call__(self, y_BxLxD: Array, encoded_BxExD: Array | None, relpos: RelativeBias,
                 self_mask_Bx1xLxL: Array | None, cross_mask_Bx1xLxE: Array,
                 cache_write: kv_cache.CacheWrite | None = None) -> tuple[Array, None]:
        drop = nn.Dropout(self.dropout_rate)
        decoding = cache_write is not None
        h = RMSNorm(dtype=self.dtype, name='pre_self_attention_layer_norm')(y_BxLxD)
        h = self._attention('self_attention')(h, h, mask_Bx1xQxK=self_mask_Bx1xLxL,
                                              bias_1xHxQxK=relpos.dense(),
                                              enable_dropout=self.enable_dropout,
                                              cache_write=cache_write)
        y_BxLxD = y_BxLxD + drop(h, deterministic=not self.enable_dropout)
        h = RMSNorm(dtype=self.dtype, name='pre_cross_attention_layer_norm')(y_BxLxD)
        h = self._attention('encoder_decoder_attention')(
            h, encoded_BxExD, mask_Bx1xQxK=cross_mask_Bx1xLxE, bias_1xHxQxK=None,
            enable_dropout=self.enable_dropout, cache_cross=decoding)
        y_BxLxD = y_BxLxD + drop(h, deterministic=not self.enable_dropout)
        return self._mlp_residual(y_BxLxD, drop), None
