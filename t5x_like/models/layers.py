"""Transformer building blocks for T5.1.1-style models (Flax Linen).

Conventions shared by every module here:
- Parameters are always created in float32; activations are computed in the
  module's ``dtype`` (e.g. bfloat16). Attention logits/softmax and output logits
  are float32.
- Every parameter carries logical axis names (``nn.with_logical_partitioning``);
  key activations are pinned with ``nn.with_logical_constraint``. Which mesh axes
  these names map to is decided by the partitioning rules, not here.
- Initialisation follows the published T5 (Mesh TensorFlow) scheme: attention
  logits are *not* divided by sqrt(head_dim); instead the query kernel starts
  smaller. All dense kernels use a truncated normal (cut at +-2 standard
  deviations) rescaled so that the *actual* standard deviation equals the target.
- The layer modules (``EncoderLayer``, ``DecoderLayer``) take the shared relative
  position bias and masks as arguments, so a later ``nn.scan`` can wrap them.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.models import attention

Array = jax.Array
Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]

# Standard deviation of a unit normal truncated to [-2, 2].
_TRUNCATED_STD = 0.87962566103423978

# Activation logical axes.
BLE = ('batch', 'length', 'embed')
BLM = ('batch', 'length', 'mlp')
BLHK = ('batch', 'length', 'heads', 'kv')
BLV = ('batch', 'length', 'vocab')


def truncated_normal_init(stddev: float) -> Initializer:
    """Normal truncated at +-2 sigma, rescaled so the result has std `stddev`."""

    def init(key, shape, dtype=jnp.float32):
        unit = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
        return (unit * (stddev / _TRUNCATED_STD)).astype(dtype)

    return init


def fan_avg_uniform_init(key, shape, dtype=jnp.float32):
    """Glorot-uniform over the two axes of a 2-D table (used for relpos biases)."""
    fan_avg = (shape[0] + shape[1]) / 2.0
    limit = math.sqrt(3.0 / fan_avg)
    return jax.random.uniform(key, shape, jnp.float32, -limit, limit).astype(dtype)


def _canonical_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    return tuple(a % ndim for a in axes)


class RMSNorm(nn.Module):
    """T5 layer norm: scale by the root mean square; no mean, no bias.

    The variance is always computed in float32 so bf16 activations do not lose the
    small-magnitude features.
    """

    dtype: Any = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        features = x_BxLxD.shape[-1]
        scale_D = self.param(
            'scale',
            nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
            (features,),
            jnp.float32,
        )
        x32 = x_BxLxD.astype(jnp.float32)
        mean_sq = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(mean_sq + self.epsilon)
        return y.astype(self.dtype) * scale_D.astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table, also usable as a tied output projection.

    Initialised N(0, 1) as in T5 (the tied-logits path compensates with an
    emb_dim**-0.5 scale in the model).
    """

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

    def setup(self):
        self.embedding = self.param(
            'embedding',
            nn.with_logical_partitioning(self.embedding_init, ('vocab', 'embed')),
            (self.num_embeddings, self.features),
            jnp.float32,
        )

    def __call__(self, ids_BxL: Array) -> Array:
        if not jnp.issubdtype(ids_BxL.dtype, jnp.integer):
            raise ValueError(f'Embed expects integer ids, got {ids_BxL.dtype}.')
        table_VxD = self.embedding.astype(self.dtype)
        return jnp.take(table_VxD, ids_BxL, axis=0)

    def attend(self, query_BxLxD: Array) -> Array:
        """Scores every vocabulary row against `query` (tied logits), in float32."""
        table_VxD = self.embedding.astype(self.dtype)
        return jnp.einsum(
            'bld,vd->blv',
            query_BxLxD.astype(self.dtype),
            table_VxD,
            preferred_element_type=jnp.float32,
        )


class DenseGeneral(nn.Module):
    """Bias-free projection contracting `axis` of the input into `features`.

    The kernel has shape ``input_shape[axis] + features`` and logical axes
    ``kernel_axes`` (one name per kernel dimension).
    """

    features: int | Sequence[int]
    kernel_axes: Sequence[str]
    kernel_init: Initializer
    axis: int | Sequence[int] = -1
    dtype: Any = jnp.float32
    # Dtype of the matmul result; defaults to `dtype`. Set float32 for logits.
    out_dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = _canonical_axes(axis, x.ndim)
        kernel_shape = tuple(x.shape[a] for a in axis) + features
        if len(self.kernel_axes) != len(kernel_shape):
            raise ValueError(
                f'kernel_axes {self.kernel_axes} do not match kernel shape {kernel_shape}.'
            )
        kernel = self.param(
            'kernel',
            nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
            kernel_shape,
            jnp.float32,
        )
        contract = (axis, tuple(range(len(axis))))
        out_dtype = self.out_dtype or self.dtype
        return jax.lax.dot_general(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (contract, ((), ())),
            preferred_element_type=out_dtype,
        )


# T5 feed-forward variants: 'gated-gelu' (T5.1.1) and 'relu' (the original T5).
MLP_ACTIVATIONS = ('gated-gelu', 'relu')


class MlpBlock(nn.Module):
    """T5.1.1 gated-GELU feed-forward: wo(gelu_tanh(wi_0 x) * wi_1 x).

    activation='relu' gives the original T5's ungated wo(relu(wi x)).
    """

    emb_dim: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    activation: str = 'gated-gelu'

    @nn.compact
    def __call__(self, x_BxLxD: Array, *, enable_dropout: bool) -> Array:
        wi_init = truncated_normal_init(self.emb_dim**-0.5)
        dense = functools.partial(
            DenseGeneral,
            features=self.mlp_dim,
            kernel_axes=('embed', 'mlp'),
            kernel_init=wi_init,
            dtype=self.dtype,
        )
        if self.activation == 'relu':
            h_BxLxM = nn.relu(dense(name='wi')(x_BxLxD))
        elif self.activation == 'gated-gelu':
            gate_BxLxM = nn.gelu(dense(name='wi_0')(x_BxLxD), approximate=True)
            h_BxLxM = gate_BxLxM * dense(name='wi_1')(x_BxLxD)
        else:
            raise ValueError(f'MLP activation {self.activation!r}; choose one of {MLP_ACTIVATIONS}.')
        h_BxLxM = nn.with_logical_constraint(h_BxLxM, BLM)
        h_BxLxM = nn.Dropout(self.dropout_rate)(h_BxLxM, deterministic=not enable_dropout)
        out_BxLxD = DenseGeneral(
            features=self.emb_dim,
            kernel_axes=('mlp', 'embed'),
            kernel_init=truncated_normal_init(self.mlp_dim**-0.5),
            dtype=self.dtype,
            name='wo',
        )(h_BxLxM)
        return nn.with_logical_constraint(out_BxLxD, BLE)


class MultiHeadDotProductAttention(nn.Module):
    """Multi-head attention with T5 scaling (none on logits; smaller q init).

    `mask_Bx1xQxK` is boolean (True = may attend) and broadcastable;
    `bias_1xHxQxK` is an additive float32 bias (relative positions) or None.
    """

    num_heads: int
    head_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    attention_impl: str = 'xla'  # see models/attention.py

    @nn.compact
    def __call__(
        self,
        inputs_q_BxQxD: Array,
        inputs_kv_BxKxD: Array,
        *,
        mask_Bx1xQxK: Array | None,
        bias_1xHxQxK: Array | None,
        enable_dropout: bool,
    ) -> Array:
        emb_dim = inputs_q_BxQxD.shape[-1]
        inner_dim = self.num_heads * self.head_dim
        proj = functools.partial(
            DenseGeneral,
            features=(self.num_heads, self.head_dim),
            kernel_axes=('embed', 'heads', 'kv'),
            dtype=self.dtype,
        )
        q_BxQxHxK = proj(kernel_init=truncated_normal_init((emb_dim * self.head_dim) ** -0.5), name='query')(
            inputs_q_BxQxD
        )
        k_BxKxHxK = proj(kernel_init=truncated_normal_init(emb_dim**-0.5), name='key')(inputs_kv_BxKxD)
        v_BxKxHxK = proj(kernel_init=truncated_normal_init(emb_dim**-0.5), name='value')(inputs_kv_BxKxD)
        q_BxQxHxK = nn.with_logical_constraint(q_BxQxHxK, BLHK)
        k_BxKxHxK = nn.with_logical_constraint(k_BxKxHxK, BLHK)
        v_BxKxHxK = nn.with_logical_constraint(v_BxKxHxK, BLHK)

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
    def __call__(self, q_len: int, k_len: int) -> Array:
        table_RxH = self.param(
            'rel_embedding',
            nn.with_logical_partitioning(fan_avg_uniform_init, ('relpos_buckets', 'heads')),
            (self.num_buckets, self.num_heads),
            jnp.float32,
        )
        rel_QxK = jnp.arange(k_len, dtype=jnp.int32)[None, :] - jnp.arange(q_len, dtype=jnp.int32)[:, None]
        buckets_QxK = relative_position_bucket(
            rel_QxK,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        bias_QxKxH = jnp.take(table_RxH, buckets_QxK, axis=0)
        return jnp.transpose(bias_QxKxH, (2, 0, 1))[None]


# ----------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------


def segment_mask(query_segments_BxQ: Array, key_segments_BxK: Array) -> Array:
    """True where query and key are in the same, non-padding (id > 0) segment."""
    q = query_segments_BxQ[:, :, None]
    k = key_segments_BxK[:, None, :]
    return ((q == k) & (q > 0) & (k > 0))[:, None, :, :]


def key_padding_mask(key_segments_BxK: Array, q_len: int) -> Array:
    """True where the key is not padding; every query row alike."""
    mask_BxK = key_segments_BxK > 0
    return jnp.broadcast_to(mask_BxK[:, None, None, :], (mask_BxK.shape[0], 1, q_len, mask_BxK.shape[1]))


def causal_mask(length: int) -> Array:
    """[1, 1, L, L], True where key index <= query index."""
    idx = jnp.arange(length)
    return (idx[None, :] <= idx[:, None])[None, None]


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------


# What the backward pass may keep instead of recomputing, per layer.
REMAT_POLICIES = {
    'none': None,  # no rematerialisation: keep every activation
    'full': jax.checkpoint_policies.nothing_saveable,  # keep only layer inputs
    # Keep matmul outputs, recompute the cheap elementwise ops (norms, activations).
    'save_dots': jax.checkpoint_policies.checkpoint_dots,
    # Keep only weight matmuls (no batch dims): attention scores are recomputed.
    'save_dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class EncoderLayer(nn.Module):
    """Pre-norm self-attention + gated MLP block, each with a residual.

    `(x, bias, mask) -> (x, None)`: the shape `nn.scan` stacks, so the same layer
    runs in a Python loop or scanned over depth.
    """

    num_heads: int
    head_dim: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    mlp_activation: str = 'gated-gelu'
    attention_impl: str = 'xla'
    enable_dropout: bool = False

    @nn.compact
    def __call__(self, x_BxLxD: Array, bias_1xHxLxL: Array, mask_Bx1xLxL: Array
                 ) -> tuple[Array, None]:
        enable_dropout = self.enable_dropout
        drop = nn.Dropout(self.dropout_rate)
        h = RMSNorm(dtype=self.dtype, name='pre_attention_layer_norm')(x_BxLxD)
        h = MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            name='attention',
        )(h, h, mask_Bx1xQxK=mask_Bx1xLxL, bias_1xHxQxK=bias_1xHxLxL, enable_dropout=enable_dropout)
        x_BxLxD = x_BxLxD + drop(h, deterministic=not enable_dropout)
        h = RMSNorm(dtype=self.dtype, name='pre_mlp_layer_norm')(x_BxLxD)
        h = MlpBlock(
            emb_dim=x_BxLxD.shape[-1],
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            activation=self.mlp_activation,
            name='mlp',
        )(h, enable_dropout=enable_dropout)
        x_BxLxD = x_BxLxD + drop(h, deterministic=not enable_dropout)
        return nn.with_logical_constraint(x_BxLxD, BLE), None


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention and gated MLP blocks.

    `(y, encoded, bias, self_mask, cross_mask) -> (y, None)`, scannable like
    EncoderLayer.
    """

    num_heads: int
    head_dim: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    mlp_activation: str = 'gated-gelu'
    attention_impl: str = 'xla'
    enable_dropout: bool = False

    @nn.compact
    def __call__(self, y_BxLxD: Array, encoded_BxExD: Array, bias_1xHxLxL: Array,
                 self_mask_Bx1xLxL: Array, cross_mask_Bx1xLxE: Array) -> tuple[Array, None]:
        enable_dropout = self.enable_dropout
        drop = nn.Dropout(self.dropout_rate)
        attention = functools.partial(
            MultiHeadDotProductAttention,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )
        h = RMSNorm(dtype=self.dtype, name='pre_self_attention_layer_norm')(y_BxLxD)
        h = attention(name='self_attention')(
            h, h, mask_Bx1xQxK=self_mask_Bx1xLxL, bias_1xHxQxK=bias_1xHxLxL, enable_dropout=enable_dropout
        )
        y_BxLxD = y_BxLxD + drop(h, deterministic=not enable_dropout)
        h = RMSNorm(dtype=self.dtype, name='pre_cross_attention_layer_norm')(y_BxLxD)
        h = attention(name='encoder_decoder_attention')(
            h, encoded_BxExD, mask_Bx1xQxK=cross_mask_Bx1xLxE, bias_1xHxQxK=None, enable_dropout=enable_dropout
        )
        y_BxLxD = y_BxLxD + drop(h, deterministic=not enable_dropout)
        h = RMSNorm(dtype=self.dtype, name='pre_mlp_layer_norm')(y_BxLxD)
        h = MlpBlock(
            emb_dim=y_BxLxD.shape[-1],
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            activation=self.mlp_activation,
            name='mlp',
        )(h, enable_dropout=enable_dropout)
        y_BxLxD = y_BxLxD + drop(h, deterministic=not enable_dropout)
        return nn.with_logical_constraint(y_BxLxD, BLE), None
