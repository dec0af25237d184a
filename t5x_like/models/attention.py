"""Attention kernels behind one switch: plain XLA einsum, cuDNN, Pallas splash.

Every model calls `attend(...)` with queries/keys/values in [batch, length,
heads, head_dim] layout plus a description of the mask (causal? packed segment
ids? a bidirectional prefix? an additive bias?), and names the implementation it
would like. The implementation actually used is decided here, once per trace:

- ``'xla'``: our einsum path. Works everywhere, supports everything (dropout on
  attention weights, arbitrary masks and biases). Softmax in float32.
- ``'jax_xla'``: `jax.nn.dot_product_attention(implementation='xla')`. The same
  maths through JAX's reference path; used to check the cuDNN call layout on CPU.
- ``'cudnn'``: `jax.nn.dot_product_attention(implementation='cudnn')` (GPU).
  The causal part goes to cuDNN as ``is_causal`` (it then skips the masked
  blocks); packed segments and prefix-LM masks go as a boolean mask, which JAX
  turns into an additive bias; T5's relative-position bias goes as ``bias``.
  cuDNN needs float16/bfloat16 inputs, so float32 compute falls back.
- ``'splash'``: Pallas splash attention (TPU). Causal and packed segments map to
  its static mask and `SegmentIds`; a per-example prefix or an additive bias is
  not expressible, so those fall back.

A request that the backend cannot serve falls back to ``'xla'`` and logs the
reason once (e.g. cudnn requested on CPU). Attention-weight dropout forces
``'xla'`` too, since the fused kernels have no dropout.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from t5x_like.models import ordering

Array = jax.Array
IMPLEMENTATIONS = ('xla', 'jax_xla', 'cudnn', 'splash')
# Added to masked-out logits: zeroes them after softmax, keeps a fully masked
# row (a padding query) finite.
MASK_BIAS = -1e10

_warned: set[str] = set()
# Our logger, not the root one: the console shows only this repository's loggers at
# the default verbosity (launcher.configure_output), and a user who asked for a
# kernel must see that another runs.
log = logging.getLogger(__name__)


def _warn_once(message: str) -> None:
    """Once per process, however many layers and traces hit the same fall-back."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


# The platform the code is being traced for, and whether Pallas kernels run in
# interpret mode (see `compiling_for`).
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    'attention_target_platform', default=None)
_INTERPRET: contextvars.ContextVar[bool] = contextvars.ContextVar(
    'attention_interpret_kernels', default=False)


@contextlib.contextmanager
def compiling_for(platform: str, *, interpret_kernels: bool = False) -> Iterator[None]:
    """Inside, implementations are chosen for `platform` ('tpu', 'gpu', 'cpu').

    The partitioner's context enters it with its mesh's device platform, so an AOT
    compile for a TPU slice on a CPU machine (launch.compile) compiles the attention
    the pod will run, not the one this machine would. `interpret_kernels` runs the
    TPU kernels (splash) in Pallas interpret mode: the same kernel code, executed on
    the CPU, which is how tests check it against the einsum path without a TPU.
    """
    tokens = _TARGET_PLATFORM.set(platform), _INTERPRET.set(interpret_kernels)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(tokens[0])
        _INTERPRET.reset(tokens[1])


def target_platform() -> str:
    return _TARGET_PLATFORM.get() or jax.default_backend()


def choose_implementation(
    requested: str,
    *,
    dtype,
    has_bias: bool,
    has_prefix: bool,
    dropout: bool,
    backend: str | None = None,
) -> str:
    """The implementation that will really run, logging why if it differs."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f'attention implementation {requested!r}; choose one of '
                         f'{IMPLEMENTATIONS}.')
    if requested in ('xla', 'jax_xla'):
        if dropout and requested == 'jax_xla':
            _warn_once('attention: jax_xla has no attention-weight dropout; using xla.')
            return 'xla'
        return requested
    backend = backend or target_platform()
    reason = None
    if dropout:
        reason = 'attention-weight dropout is on (fused kernels have none)'
    elif requested == 'cudnn':
        if backend != 'gpu':
            reason = f'cudnn needs a GPU (backend is {backend})'
        elif jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            reason = ('cudnn flash attention needs bf16/fp16 inputs (compute dtype is '
                      f'{jnp.dtype(dtype)})')
    elif requested == 'splash':
        if backend != 'tpu':
            reason = f'splash attention needs a TPU (backend is {backend})'
        elif has_bias:
            reason = 'splash attention takes no additive bias (T5 relative positions)'
        elif has_prefix:
            reason = ('splash attention masks are static; a per-example mask (prefix LM, '
                      'or a KV cache in decoding) is not')
    if reason:
        _warn_once(f'attention: {requested} requested but {reason}; falling back to xla.')
        return 'xla'
    return requested


def dense_mask(*, q_len: int, k_len: int, causal: bool,
               q_segment_ids: Array | None = None, kv_segment_ids: Array | None = None,
               prefix_BxL: Array | None = None) -> Array | None:
    """Boolean [B|1, 1, Q, K] mask (True = may attend), or None for 'everything'.

    - causal: key index <= query index,
    - prefix (prefix LM, seqio `decoder_causal_attention`): additionally allowed
      when both query and key lie in the prefix region (bidirectional there),
    - segment ids: never across segments, never to or from segment 0 (padding);
      with key segment ids alone (unpacked queries), only padding keys are masked.
    """
    mask = None
    if causal:
        mask = (jnp.arange(k_len)[None, :] <= jnp.arange(q_len)[:, None])[None, None]
        if prefix_BxL is not None:
            prefix = prefix_BxL > 0
            mask = mask | (prefix[:, None, :, None] & prefix[:, None, None, :])
    if kv_segment_ids is not None:
        k = kv_segment_ids[:, None, None, :]
        if q_segment_ids is None:
            allowed = k > 0
        else:
            q = q_segment_ids[:, None, :, None]
            allowed = (q == k) & (q > 0) & (k > 0)
        mask = allowed if mask is None else mask & allowed
    return mask


def _xla_attention(q_BxQxHxD, k_BxKxGxD, v_BxKxGxD, *, mask, bias, scale, dtype,
                   dropout_fn=None, recompute_weights=False):
    """Einsum attention with grouped-query support, softmax in float32.

    With `recompute_weights` (and no dropout) the backward pass evaluates the logits
    and the softmax again (`_attention_recomputed`) instead of keeping the float32
    weights from the forward pass. Dropout stays out: its mask comes from the
    module's RNG, which a recomputation outside Flax cannot draw again.
    """
    if recompute_weights and dropout_fn is None:
        return _attention_recomputed(q_BxQxHxD, k_BxKxGxD, v_BxKxGxD, bias, mask,
                                     float(scale), jnp.dtype(dtype))
    return _attention_kept(q_BxQxHxD, k_BxKxGxD, v_BxKxGxD, bias, mask, scale=scale,
                           dtype=dtype, dropout_fn=dropout_fn)


def _attention_kept(q_BxQxHxD, k_BxKxGxD, v_BxKxGxD, bias, mask, *, scale, dtype,
                    dropout_fn=None):
    """The attention as autodiff differentiates it: the backward pass keeps the
    float32 weights (`mix_values`)."""
    b, q_len, num_heads, head_dim = q_BxQxHxD.shape
    num_kv = k_BxKxGxD.shape[2]
    group = num_heads // num_kv
    q = q_BxQxHxD.reshape(b, q_len, num_kv, group, head_dim)
    if scale != 1.0:
        q = q * jnp.asarray(scale, q.dtype)
    logits = jnp.einsum('bqkgd,bskd->bkgqs', q, k_BxKxGxD, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, num_heads, q_len, -1)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = logits + jnp.where(mask, 0.0, MASK_BIAS).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout_fn is not None:
        weights = dropout_fn(weights)
    ctx = mix_values(weights.reshape(b, num_kv, group, q_len, -1), v_BxKxGxD, dtype)
    return ctx.reshape(b, q_len, num_heads, head_dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention_recomputed(q, k, v, bias, mask, scale: float, dtype) -> Array:
    """`_attention_kept`, whose backward pass keeps q, k, v, the bias and the mask
    and evaluates the weights again.

    Why: the float32 weights are [B, H, Q, K] a layer, 48 MiB in T5.1.1-small's
    512-token encoder at batch 8 (384 MiB over its 8 layers), against one more Q.K^T
    product a layer in the backward pass. The backward pass is autodiff's of the
    same function on the same inputs, so the gradients are those of keeping the
    weights (tests/test_models_attention.py).
    Why not `jax.checkpoint`: nothing there ties the recomputation to the backward
    pass, and XLA's CPU scheduler evaluated most layers' recomputed weights right
    after the forward pass, beside the kept ones (see `ordering`).
    """
    return _attention_kept(q, k, v, bias, mask, scale=scale, dtype=dtype)


def _attention_recomputed_fwd(q, k, v, bias, mask, scale, dtype):
    return _attention_kept(q, k, v, bias, mask, scale=scale, dtype=dtype), (q, k, v, bias, mask)


def _attention_recomputed_bwd(scale, dtype, residuals, d_ctx):
    q, k, v, bias, mask = residuals
    # The recomputation waits for this layer's turn in the backward pass: q depends
    # on the cotangent (of q's shape and sharding, so the tie is local).
    q = ordering.after(q, d_ctx)
    attend = lambda q, k, v, bias: _attention_kept(q, k, v, bias, mask, scale=scale,
                                                   dtype=dtype)
    _, vjp = jax.vjp(attend, q, k, v, bias)
    return (*vjp(d_ctx), None)


_attention_recomputed.defvjp(_attention_recomputed_fwd, _attention_recomputed_bwd)


# The name of the attention's weighted sum of values, so that the remat policy that
# keeps every matmul output keeps this one too (`mix_values`'s custom VJP hides it).
ATTENTION_CONTEXT = 'attention_context'


def _weighted_sum(weights_BxGxRxQxK: Array, v_BxKxGxD: Array) -> Array:
    return jnp.einsum('bkgqs,bskd->bqkgd', weights_BxGxRxQxK, v_BxKxGxD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mix_values(weights_f32: Array, v: Array, dtype) -> Array:
    return _weighted_sum(weights_f32.astype(dtype), v)


def _mix_values_fwd(weights_f32, v, dtype):
    return _mix_values(weights_f32, v, dtype), (weights_f32, v)


def _mix_values_bwd(dtype, residuals, d_ctx):
    weights_f32, v = residuals
    # The barrier keeps XLA from merging this cast with the forward pass's, which
    # would keep the copy alive until here after all.
    weights = jax.lax.optimization_barrier(weights_f32).astype(dtype)
    # Autodiff's transposes of the one dot, without evaluating the dot again.
    d_weights, = jax.linear_transpose(lambda w: _weighted_sum(w, v), weights)(d_ctx)
    d_v, = jax.linear_transpose(lambda u: _weighted_sum(weights, u), v)(d_ctx)
    return d_weights.astype(weights_f32.dtype), d_v


_mix_values.defvjp(_mix_values_fwd, _mix_values_bwd)


def mix_values(weights_BxGxRxQxK: Array, v_BxKxGxD: Array, dtype) -> Array:
    """The float32 attention weights, cast to `dtype`, times the values:
    [B, Q, kv heads, group, D].

    Why a custom VJP: autodiff keeps both the float32 weights (for the softmax's
    gradient) and their `dtype` copy (for the values' gradient) until the backward
    pass, per layer: with T5.1.1-small's 512-token encoder in bfloat16 that copy is
    24 MiB a layer, 192 MiB in all. This keeps the float32 weights only and casts
    them again in the backward. The cast is exact and deterministic and the dots are
    autodiff's own, so the gradients are autodiff's (tests/test_models_layers.py).
    In float32 there is no copy to spare, and the product is plain autodiff's.
    """
    if jnp.dtype(dtype) == weights_BxGxRxQxK.dtype:    # no copy to spare: plain autodiff
        return _weighted_sum(weights_BxGxRxQxK, v_BxKxGxD)
    return checkpoint_name(_mix_values(weights_BxGxRxQxK, v_BxKxGxD, jnp.dtype(dtype)),
                           ATTENTION_CONTEXT)


def splash_block(length: int) -> int:
    """Splash's tile: 512 (its usual TPU block) or, for shorter sequences, the length
    rounded up to the 128-lane multiple that TPU tiles need."""
    return min(512, -(-length // 128) * 128)


def _ways(mesh, axes) -> int:
    """How many pieces mesh axis (or axes) `axes` cut a dimension into."""
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def _splash_attention(q_BxLxHxD, k_BxLxGxD, v_BxLxGxD, *, causal, segment_ids_BxL, scale):
    """Pallas splash attention over the mesh in use: under `shard_map`, each device
    runs the kernel on its own batch rows and heads (a Mosaic kernel cannot be
    partitioned by XLA). Any length: q/k/v are padded to a multiple of the block, the
    padding given segment 0, which no real token shares, and the output cut back.
    GQA repeats the kv heads first, so heads shard alike for q, k and v."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    batch, length, num_heads, _ = q_BxLxHxD.shape
    group = num_heads // k_BxLxGxD.shape[2]
    if group > 1:
        k_BxLxGxD = jnp.repeat(k_BxLxGxD, group, axis=2)
        v_BxLxGxD = jnp.repeat(v_BxLxGxD, group, axis=2)
    block = splash_block(length)
    padded = -(-length // block) * block
    if segment_ids_BxL is None and padded != length:
        segment_ids_BxL = jnp.ones((batch, length), jnp.int32)
    if padded != length:
        pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
        q_BxLxHxD, k_BxLxGxD, v_BxLxGxD = (jnp.pad(x, pad) for x in
                                           (q_BxLxHxD, k_BxLxGxD, v_BxLxGxD))
        segment_ids_BxL = jnp.pad(segment_ids_BxL, ((0, 0), (0, padded - length)))

    mesh = jax.sharding.get_abstract_mesh()
    qkv_spec = (None,) * 4
    if not mesh.empty:          # a dimension its mesh axes cannot split stays whole
        qkv_spec = tuple(
            axes if axes is None or size % _ways(mesh, axes) == 0 else None
            for axes, size in zip(nn.logical_to_mesh_axes(('batch', 'length', 'heads', 'kv')),
                                  q_BxLxHxD.shape))
    local_heads = num_heads // (1 if qkv_spec[2] is None else _ways(mesh, qkv_spec[2]))
    base = sm.CausalMask((padded, padded)) if causal else sm.FullMask((padded, padded))
    sizes = dict(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                 block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                 block_kv_dq=block)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([base] * local_heads),
                                block_sizes=sk.BlockSizes(**sizes), head_shards=1,
                                q_seq_shards=1, interpret=_INTERPRET.get())
    q_BxLxHxD = q_BxLxHxD * jnp.asarray(scale, q_BxLxHxD.dtype)

    def local(q, k, v, segments):
        to_hld = lambda x: jnp.swapaxes(x, 1, 2)   # [B, L, H, D] -> [B, H, L, D]
        if segments is None:
            out = jax.vmap(kernel)(to_hld(q), to_hld(k), to_hld(v))
        else:
            ids = jax.vmap(lambda s: sk.SegmentIds(q=s, kv=s))(segments)
            out = jax.vmap(kernel)(to_hld(q), to_hld(k), to_hld(v), segment_ids=ids)
        return to_hld(out)

    if mesh.empty:
        out = local(q_BxLxHxD, k_BxLxGxD, v_BxLxGxD, segment_ids_BxL)
    else:
        spec = jax.sharding.PartitionSpec(*qkv_spec)
        segment_spec = jax.sharding.PartitionSpec(*qkv_spec[:2])
        out = jax.shard_map(
            local, mesh=mesh,
            in_specs=(spec, spec, spec, None if segment_ids_BxL is None else segment_spec),
            out_specs=spec, check_vma=False,
        )(q_BxLxHxD, k_BxLxGxD, v_BxLxGxD, segment_ids_BxL)
    return out[:, :length]


def attend(
    q_BxQxHxD: Array,
    k_BxKxGxD: Array,
    v_BxKxGxD: Array,
    *,
    implementation: str,
    scale: float,
    causal: bool,
    segment_ids_BxL: Array | None = None,
    kv_segment_ids_BxK: Array | None = None,
    prefix_BxL: Array | None = None,
    bias_1xHxQxK: Array | None = None,
    mask_Bx1xQxK: Array | None = None,
    dropout_fn=None,
    dtype=jnp.float32,
    recompute_weights: bool = False,
) -> Array:
    """Attention output [B, Q, H, D] in `dtype`; H must be a multiple of G (GQA).

    The mask is either given densely (`mask_Bx1xQxK`, used as is) or described by
    `causal` / segment ids / prefix, which lets fused kernels skip work.
    `recompute_weights`: the `'xla'` path recomputes its attention weights in the
    backward pass rather than keeping them (see `_xla_attention`); the fused kernels
    keep no weights in any case.
    """
    impl = choose_implementation(
        implementation, dtype=dtype, has_bias=bias_1xHxQxK is not None,
        has_prefix=prefix_BxL is not None or mask_Bx1xQxK is not None,
        dropout=dropout_fn is not None)
    kv_segments = kv_segment_ids_BxK if kv_segment_ids_BxK is not None else segment_ids_BxL
    q_len, k_len = q_BxQxHxD.shape[1], k_BxKxGxD.shape[1]

    if impl == 'splash' and (q_len != k_len or kv_segment_ids_BxK is not None):
        _warn_once('attention: splash requested for attention between two sequences '
                   '(cross-attention or a cache); falling back to xla.')
        impl = 'xla'
    if impl == 'splash':
        return _splash_attention(q_BxQxHxD, k_BxKxGxD, v_BxKxGxD, causal=causal,
                                 segment_ids_BxL=segment_ids_BxL, scale=scale).astype(dtype)

    if impl in ('jax_xla', 'cudnn'):
        # Causality is a flag (cuDNN skips the upper triangle); the rest is a mask.
        extra = mask_Bx1xQxK
        if extra is None:
            extra = dense_mask(q_len=q_len, k_len=k_len, causal=False,
                               q_segment_ids=segment_ids_BxL, kv_segment_ids=kv_segments)
            if prefix_BxL is not None:
                # Prefix positions see each other bidirectionally: that is not a subset
                # of causal, so build the whole mask and drop the flag.
                extra = dense_mask(q_len=q_len, k_len=k_len, causal=True,
                                   q_segment_ids=segment_ids_BxL, kv_segment_ids=kv_segments,
                                   prefix_BxL=prefix_BxL)
        is_causal = causal and prefix_BxL is None and mask_Bx1xQxK is None
        bias = None if bias_1xHxQxK is None else bias_1xHxQxK.astype(q_BxQxHxD.dtype)
        out = jax.nn.dot_product_attention(
            q_BxQxHxD, k_BxKxGxD, v_BxKxGxD, bias=bias, mask=extra, scale=scale,
            is_causal=is_causal, implementation='cudnn' if impl == 'cudnn' else 'xla')
        return out.astype(dtype)

    mask = mask_Bx1xQxK
    if mask is None:
        mask = dense_mask(q_len=q_len, k_len=k_len, causal=causal, q_segment_ids=segment_ids_BxL,
                          kv_segment_ids=kv_segments, prefix_BxL=prefix_BxL)
    return _xla_attention(q_BxQxHxD, k_BxKxGxD, v_BxKxGxD, mask=mask, bias=bias_1xHxQxK,
                          scale=scale, dtype=dtype, dropout_fn=dropout_fn,
                          recompute_weights=recompute_weights)
