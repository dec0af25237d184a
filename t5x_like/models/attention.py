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

import logging

import jax
import jax.numpy as jnp

Array = jax.Array
IMPLEMENTATIONS = ('xla', 'jax_xla', 'cudnn', 'splash')
# Added to masked-out logits: zeroes them after softmax, keeps a fully masked
# row (a padding query) finite.
MASK_BIAS = -1e10

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logging.warning(message)


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
    backend = backend or jax.default_backend()
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
            reason = 'splash attention masks are static; a per-example prefix-LM mask is not'
    if reason:
        _warn_once(f'attention: {requested} requested but {reason}; falling back to xla.')
        return 'xla'
    return requested


def dense_mask(
    *,
    q_len: int,
    k_len: int,
    causal: bool,
    q_segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    prefix_BxL: Array | None = None,
) -> Array | None:
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
                   dropout_fn=None):
    """Einsum attention with grouped-query support, softmax in float32."""
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
    weights = weights.astype(dtype).reshape(b, num_kv, group, q_len, -1)
    ctx = jnp.einsum('bkgqs,bskd->bqkgd', weights, v_BxKxGxD)
    return ctx.reshape(b, q_len, num_heads, head_dim)


def _splash_attention(q, k, v, *, causal, segment_ids, scale):
    """Pallas splash attention (TPU), vmapped over batch; GQA by repeating kv heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    _, q_len, num_heads, _ = q.shape
    k_len = k.shape[1]
    group = num_heads // k.shape[2]
    if group > 1:
        k = jnp.repeat(k, group, axis=2)
        v = jnp.repeat(v, group, axis=2)
    base = sm.CausalMask((q_len, k_len)) if causal else sm.FullMask((q_len, k_len))
    block = min(512, q_len, k_len)
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask([base] * num_heads),
        block_sizes=sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                  block_q_dkv=block, block_kv_dkv=block,
                                  block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block),
        head_shards=1,
        q_seq_shards=1,
    )
    to_hld = lambda x: jnp.swapaxes(x, 1, 2)  # [B, L, H, D] -> [B, H, L, D]
    q = q * jnp.asarray(scale, q.dtype)
    if segment_ids is None:
        out = jax.vmap(kernel)(to_hld(q), to_hld(k), to_hld(v))
    else:
        seg = jax.vmap(lambda s: sk.SegmentIds(q=s, kv=s))(segment_ids)
        out = jax.vmap(kernel)(to_hld(q), to_hld(k), to_hld(v), segment_ids=seg)
    return to_hld(out)


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
) -> Array:
    """Attention output [B, Q, H, D] in `dtype`; H must be a multiple of G (GQA).

    The mask is either given densely (`mask_Bx1xQxK`, used as is) or described by
    `causal` / segment ids / prefix, which lets fused kernels skip work.
    """
    impl = choose_implementation(
        implementation, dtype=dtype, has_bias=bias_1xHxQxK is not None,
        has_prefix=prefix_BxL is not None or mask_Bx1xQxK is not None,
        dropout=dropout_fn is not None)
    kv_segments = kv_segment_ids_BxK if kv_segment_ids_BxK is not None else segment_ids_BxL
    q_len, k_len = q_BxQxHxD.shape[1], k_BxKxGxD.shape[1]

    if impl == 'splash':
        return _splash_attention(q_BxQxHxD, k_BxKxGxD, v_BxKxGxD, causal=causal,
                                 segment_ids=segment_ids_BxL, scale=scale).astype(dtype)

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
                          scale=scale, dtype=dtype, dropout_fn=dropout_fn)
