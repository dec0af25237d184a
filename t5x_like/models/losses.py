"""Token-level losses: softmax cross-entropy with z-loss and label smoothing.

The functions return per-token values (already multiplied by the weights), not
means, so callers can sum across micro-batches and hosts exactly and divide once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def label_smoothing_constant(*, vocab_size: int, label_smoothing: float) -> float:
    """Entropy of the smoothed target distribution.

    Subtracting it makes the smoothed cross-entropy reach exactly 0 when the model
    predicts the smoothed distribution, so losses stay comparable across settings.
    """
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab_size - 1)
    entropy = -confidence * math.log(confidence) if confidence > 0 else 0.0
    if low > 0:
        entropy -= (vocab_size - 1) * low * math.log(low)
    return entropy


@jax.custom_vjp
def pick_targets(logits_NxV: Array, targets_N: Array) -> Array:
    """logits[..., target] for int32 targets: autodiff's `take_along_axis`, whose
    gradient is written as an elementwise select instead of a scatter-add.

    Why: autodiff transposes the gather into a scatter-add that XLA materialises as
    a float32 [tokens, vocab] buffer (112 MiB for T5.1.1-small's 912 target tokens)
    beside the softmax's gradient, and the sum of the two, the logits' gradient,
    lives until the output kernel's gradient. As a select, XLA fuses it into that
    sum. The values are the same (`g` at the target, 0 elsewhere): this gradient is
    autodiff's bit for bit; in the whole loss the logits' gradient is within a
    float32 ulp, XLA having folded the scatter-add into the softmax's gradient in
    another order (tests/test_losses.py).
    """
    return jnp.take_along_axis(logits_NxV, targets_N[..., None], axis=-1)[..., 0]


def _pick_targets_fwd(logits_NxV, targets_N):
    return pick_targets(logits_NxV, targets_N), (targets_N, logits_NxV.shape[-1])


def _pick_targets_bwd(residuals, g_N):
    targets_N, vocab_size = residuals
    vocab_NxV = jax.lax.broadcasted_iota(jnp.int32, targets_N.shape + (vocab_size,),
                                         targets_N.ndim)
    d_logits_NxV = jnp.where(vocab_NxV == targets_N[..., None], g_N[..., None],
                             jnp.zeros((), g_N.dtype))
    return d_logits_NxV, None      # integer targets: no gradient


pick_targets.defvjp(_pick_targets_fwd, _pick_targets_bwd)


def cross_entropy_with_z_loss(
    logits_BxLxV: Array,
    targets_BxL: Array,
    weights_BxL: Array | None,
    *,
    z_loss: float,
    label_smoothing: float,
) -> tuple[Array, Array]:
    """Per-token (cross-entropy + z-loss) and the z-loss part alone, both weighted.
    Any leading shape: [B, L, V] logits or, as `loss_and_metric_sums` passes them,
    [B * L, V].

    - Cross-entropy is against a smoothed target: `1 - label_smoothing` on the
      true token and `label_smoothing / (V - 1)` on each other token, minus the
      constant that makes its minimum 0.
    - z-loss is `z_loss * logsumexp(logits)**2`, which keeps the softmax
      normaliser near 1 (log Z near 0) for bf16 stability.
    Computed in float32 without materialising a one-hot [B, L, V] tensor (nor its
    gradient: `pick_targets`):
    with log p = logits - log Z,
      CE = -(conf - low) * log p[target] - low * sum_v log p[v] - constant.
    """
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    vocab_size = logits_BxLxV.shape[-1]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab_size - 1)

    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = pick_targets(logits_BxLxV, targets_BxL.astype(jnp.int32))
    target_logp_BxL = target_logit_BxL - log_z_BxL
    ce_BxL = -(confidence - low) * target_logp_BxL
    if low > 0:
        sum_logp_BxL = jnp.sum(logits_BxLxV, axis=-1) - vocab_size * log_z_BxL
        ce_BxL = ce_BxL - low * sum_logp_BxL
    ce_BxL = ce_BxL - label_smoothing_constant(vocab_size=vocab_size,
                                               label_smoothing=label_smoothing)

    z_BxL = z_loss * jnp.square(log_z_BxL)
    total_BxL = ce_BxL + z_BxL
    if weights_BxL is not None:
        w = weights_BxL.astype(jnp.float32)
        total_BxL = total_BxL * w
        z_BxL = z_BxL * w
    return total_BxL, z_BxL


# What the summed loss is divided by.
NORMALIZATIONS = ('tokens', 'total_tokens', 'sequences')


def normalized_weights(
    weights_BxL: Array,
    *,
    segment_ids_BxL: Array | None,
    normalization: str,
) -> tuple[Array, Array]:
    """Per-token weights and their divisor, so that loss = sum(w * CE) / divisor.

    - 'tokens': divide by the number of real (weighted) target tokens.
    - 'total_tokens': divide by every target position, padding included (B * L):
      a constant, so each token counts the same however full the batch is.
    - 'sequences': each sequence's mean token loss, averaged over sequences. With
      packing a "sequence" is one packed segment, not a row: token weights become
      w / (weighted tokens in its segment) and the divisor counts segments that
      have any weight.
    Both parts are sums over tokens, so micro-batches and hosts still add exactly.
    """
    w = weights_BxL.astype(jnp.float32)
    if normalization == 'tokens':
        return w, jnp.sum(w)
    if normalization == 'total_tokens':
        return w, jnp.asarray(w.size, jnp.float32)
    if normalization != 'sequences':
        raise ValueError(f'loss normalization {normalization!r}; choose one of {NORMALIZATIONS}.')
    if segment_ids_BxL is None:
        per_row = jnp.sum(w, axis=-1, keepdims=True)
        token_w = jnp.where(per_row > 0, w / jnp.maximum(per_row, 1e-8), 0.0)
        return token_w, jnp.sum(per_row > 0).astype(jnp.float32)
    # Weighted token count of each (row, segment), gathered back to its tokens:
    # O(B*L), no [L, L] comparison.
    batch, length = w.shape
    seg = segment_ids_BxL.astype(jnp.int32)
    flat_ids = (jnp.arange(batch, dtype=jnp.int32)[:, None] * (length + 1) + seg).reshape(-1)
    totals = jax.ops.segment_sum(w.reshape(-1), flat_ids, num_segments=batch * (length + 1))
    per_token_total = jnp.where(seg > 0, totals[flat_ids].reshape(batch, length), 0.0)
    token_w = jnp.where(per_token_total > 0, w / jnp.maximum(per_token_total, 1e-8), 0.0)
    # Each segment with weight contributes token weights summing to exactly 1.
    num_sequences = jnp.round(jnp.sum(token_w))
    return token_w, num_sequences


def loss_and_metric_sums(
    logits_BxLxV: Array,
    targets_BxL: Array,
    weights_BxL: Array,
    *,
    segment_ids_BxL: Array | None,
    z_loss: float,
    label_smoothing: float,
    normalization: str = 'tokens',
) -> tuple[Array, dict[str, Array]]:
    """(loss sum, sums) in the form every model returns to the trainer.

    The loss is the unnormalised sum, the one the trainer differentiates; the trainer
    divides it, summed over microbatches, by weight_sum once (trainer.py), so no
    mean is taken here and undone there.
    sums: loss_sum (CE + z-loss, weighted), z_loss_sum, accuracy_sum (weighted
    argmax hits), weight_sum (the divisor of `normalization`), all float32.
    """
    token_w, weight_sum = normalized_weights(
        weights_BxL, segment_ids_BxL=segment_ids_BxL, normalization=normalization)
    # Tokens flattened, as the output projection's dot has them ([B*L, D] x [D, V]),
    # and the accuracy's argmax on that same array: XLA then computes the argmax in
    # the forward pass and frees the logits there. With the argmax on [B, L, V] it
    # kept them to the end of the loss's backward (1-device T5.1.1-small step, with
    # `pick_targets` and per-layer biases: temporaries 1.81 GiB against 1.70; all
    # unflattened, 1.73; benchmarks/RESULTS.md).
    batch_shape = targets_BxL.shape
    logits_NxV = logits_BxLxV.reshape(-1, logits_BxLxV.shape[-1])
    loss_N, z_N = cross_entropy_with_z_loss(
        logits_NxV, targets_BxL.reshape(-1), token_w.reshape(-1), z_loss=z_loss,
        label_smoothing=label_smoothing)
    loss_BxL, z_BxL = loss_N.reshape(batch_shape), z_N.reshape(batch_shape)
    correct_BxL = (jnp.argmax(logits_NxV, axis=-1).reshape(batch_shape)
                   == targets_BxL).astype(jnp.float32)
    loss_sum = jnp.sum(loss_BxL)
    metrics = {
        'loss_sum': loss_sum,
        'z_loss_sum': jnp.sum(z_BxL),
        'accuracy_sum': jnp.sum(correct_BxL * token_w),
        'weight_sum': weight_sum,
    }
    return loss_sum, metrics
