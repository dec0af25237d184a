"""Optimizers and learning-rate schedules, chosen in gin.

An `Optimizer` carries the optax transformation together with its schedule, so the
trainer can log the learning rate actually used at each step.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True, kw_only=True)
class Optimizer:
    transform: optax.GradientTransformation
    learning_rate: optax.Schedule


def rsqrt_schedule(*, base_learning_rate: float = 1.0, warmup_steps: int = 10_000,
                   linear_warmup: bool = False) -> optax.Schedule:
    """T5's inverse-square-root schedule: base * 1/sqrt(max(step, warmup_steps)).

    With T5's defaults (base 1.0, warmup 10k) the rate is held at 0.01 for the
    first 10k steps, then decays as 1/sqrt(step). `linear_warmup=True` additionally
    ramps from 0 over the warmup (T5X's 'linear_warmup * rsqrt_decay'), which short
    runs from scratch prefer.
    """
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}.")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        lr = base_learning_rate * jnp.reciprocal(jnp.sqrt(jnp.maximum(step, warmup_steps)))
        if linear_warmup:
            lr = lr * jnp.minimum(1.0, (step + 1.0) / warmup_steps)
        return lr

    return schedule


def warmup_cosine_schedule(*, peak_learning_rate: float, warmup_steps: int,
                           decay_steps: int, final_fraction: float = 0.1) -> optax.Schedule:
    """Linear warmup then cosine decay to final_fraction * peak (LLaMA-style runs)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_learning_rate, warmup_steps=warmup_steps,
        decay_steps=max(decay_steps, warmup_steps + 1),
        end_value=peak_learning_rate * final_fraction)


def adafactor(*, learning_rate: optax.Schedule, decay_rate: float = 0.8,
              clipping_threshold: float | None = 1.0,
              multiply_by_parameter_scale: bool = True, factored: bool = True,
              min_dim_size_to_factor: int = 128, momentum: float | None = None,
              weight_decay_rate: float | None = None) -> Optimizer:
    """Adafactor with T5's pretraining defaults (factored second moments, no
    momentum, update clipping at 1.0, step size scaled by parameter RMS)."""
    transform = optax.adafactor(
        learning_rate=learning_rate, min_dim_size_to_factor=min_dim_size_to_factor,
        decay_rate=decay_rate, multiply_by_parameter_scale=multiply_by_parameter_scale,
        clipping_threshold=clipping_threshold, momentum=momentum,
        weight_decay_rate=weight_decay_rate, factored=factored)
    return Optimizer(transform=transform, learning_rate=learning_rate)


def adamw(*, learning_rate: optax.Schedule, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, weight_decay: float = 0.1,
          max_grad_norm: float | None = 1.0) -> Optimizer:
    """AdamW with global-norm gradient clipping (the usual decoder-only recipe)."""
    parts = []
    if max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                             weight_decay=weight_decay))
    return Optimizer(transform=optax.chain(*parts), learning_rate=learning_rate)
