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


def cross_entropy_with_z_loss(
    logits_BxLxV: Array,
    targets_BxL: Array,
    weights_BxL: Array | None,
    *,
    z_loss: float,
    label_smoothing: float,
) -> tuple[Array, Array]:
  """Per-token (cross-entropy + z-loss) and the z-loss part alone, both weighted.

  - Cross-entropy is against a smoothed target: `1 - label_smoothing` on the
    true token and `label_smoothing / (V - 1)` on each other token, minus the
    constant that makes its minimum 0.
  - z-loss is `z_loss * logsumexp(logits)**2`, which keeps the softmax
    normaliser near 1 (log Z near 0) for bf16 stability.
  Computed in float32 without materialising a one-hot [B, L, V] tensor:
  with log p = logits - log Z,
    CE = -(conf - low) * log p[target] - low * sum_v log p[v] - constant.
  """
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  vocab_size = logits_BxLxV.shape[-1]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab_size - 1)

  log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(
      logits_BxLxV, targets_BxL[..., None].astype(jnp.int32), axis=-1
  )[..., 0]
  target_logp_BxL = target_logit_BxL - log_z_BxL
  ce_BxL = -(confidence - low) * target_logp_BxL
  if low > 0:
    sum_logp_BxL = jnp.sum(logits_BxLxV, axis=-1) - vocab_size * log_z_BxL
    ce_BxL = ce_BxL - low * sum_logp_BxL
  ce_BxL = ce_BxL - label_smoothing_constant(vocab_size=vocab_size, label_smoothing=label_smoothing)

  z_BxL = z_loss * jnp.square(log_z_BxL)
  total_BxL = ce_BxL + z_BxL
  if weights_BxL is not None:
    w = weights_BxL.astype(jnp.float32)
    total_BxL = total_BxL * w
    z_BxL = z_BxL * w
  return total_BxL, z_BxL
