"""Optimizers and learning-rate schedules, chosen in gin.

An `Optimizer` carries the optax transformation together with its schedule, so the
trainer can log the learning rate actually used at each step.

Adafactor is our own transformation rather than `optax.adafactor`: optax factors only
the two largest dimensions of a parameter, and only when the smaller is >= 128, so the
3-D attention kernels [embed, heads, head_dim] kept a full-size second moment (7.08M
of the 7.17M second-moment floats of a T5.1.1-base encoder+decoder layer pair). T5X
factors them by logical axis names, rows over `embed` and columns over heads x
head_dim; so do we, and the update equals T5X's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from t5x_like import tree_paths


@dataclasses.dataclass(frozen=True, kw_only=True)
class Optimizer:
    """An optax transformation and its schedule.

    `by_param_axes`, for optimizers that treat parameters by their logical axis names
    (Adafactor factors by them, as T5X does): the transformation for parameters with
    these names. Its `update` equals `transform.update` (the state it builds says how
    each parameter is treated), so only building the state needs the names:
    `transform_for(param_axes).init(params)`; the trainer does it.
    """
    transform: optax.GradientTransformation
    learning_rate: optax.Schedule
    by_param_axes: Callable[[Any], optax.GradientTransformation] | None = None

    def transform_for(self, param_axes: Any) -> optax.GradientTransformation:
        """The transformation to `init` for parameters whose logical axis names are
        `param_axes` (a tree of PartitionSpecs shaped like the parameters)."""
        if self.by_param_axes is None:
            return self.transform
        return self.by_param_axes(param_axes)

    def applied_learning_rate(self, opt_state: Any) -> jax.Array:
        """The rate `transform.update` applies to `opt_state`: the schedule at the
        optimizer's own update count, the first `count` in its state (Adafactor's;
        optax's scale_by_schedule's, whose counters all advance together).

        Not at the train state's step: a step whose update is dropped for a NaN/Inf
        keeps the old optimizer state, so from then on its count is behind the step.
        """
        counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
        if not counts:
            raise ValueError("The optimizer state has no `count`, so the step of its "
                             "learning-rate schedule is unknown; build the transformation "
                             "with an optax schedule (scale_by_schedule) or a count.")
        return self.learning_rate(counts[0][1])


def rsqrt_schedule(*, base_learning_rate: float = 1.0, warmup_steps: int = 10_000,
                   linear_warmup: bool = False,
                   min_learning_rate: float = 1e-8) -> optax.Schedule:
    """T5's inverse-square-root schedule: base * 1/sqrt(max(step, warmup_steps)).

    With T5's defaults (base 1.0, warmup 10k) the rate is held at 0.01 for the
    first 10k steps, then decays as 1/sqrt(step). `linear_warmup=True` additionally
    ramps from 0 over the warmup (T5X's 'linear_warmup * rsqrt_decay'), which short
    runs from scratch prefer.

    Equal to T5X's `utils.create_learning_rate_scheduler` with factors 'constant *
    [linear_warmup *] rsqrt_decay', floor `min_learning_rate` included, at the same
    steps: `step` is the optimizer's update count, 0 for the first update, as T5X
    evaluates its schedule at its 0-based train-state step. So the ramp is
    step / warmup_steps and the first update gets only the floor, as in T5X (one
    nearly wasted step, kept so that T5X runs and ours take the same updates).
    """
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}.")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        lr = base_learning_rate * jnp.reciprocal(jnp.sqrt(jnp.maximum(step, warmup_steps)))
        if linear_warmup:
            lr = lr * jnp.minimum(1.0, step / warmup_steps)
        return jnp.maximum(lr, min_learning_rate)

    return schedule


def warmup_cosine_schedule(*, peak_learning_rate: float, warmup_steps: int,
                           decay_steps: int, final_fraction: float = 0.1) -> optax.Schedule:
    """Linear warmup then cosine decay to final_fraction * peak (LLaMA-style runs)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_learning_rate, warmup_steps=warmup_steps,
        decay_steps=max(decay_steps, warmup_steps + 1),
        end_value=peak_learning_rate * final_fraction)


# --------------------------------------------------------------------------- Adafactor

# How Adafactor treats each logical axis when it factors a parameter's second moment
# (T5X's rules, t5x/adafactor.py): rows over `embed`, columns over everything a layer
# projects to or from; `layers` (the depth axis of scanned parameters) is a batch
# dimension, so every statistic, the clipping and the parameter scale stay per layer;
# None: never factored over.
ADAFACTOR_FACTOR_AXES = {
    "embed": "row",
    "mlp": "column", "heads": "column", "kv_heads": "column", "kv": "column",
    "vocab": "column",
    "relpos_buckets": None,
    "lora_rank": None,      # finetuning/lora.py: an adapter's rank dimension
    "soft_prompt_length": None,   # finetuning/prompt_tuning.py: the prompt's positions
    "layers": "batch",
}


@dataclasses.dataclass(frozen=True)
class _Factoring:
    """Which dimensions of one parameter are rows, columns and batch (empty rows and
    columns: not factored)."""
    rows: tuple[int, ...] = ()
    columns: tuple[int, ...] = ()
    batch: tuple[int, ...] = ()


def _factoring(shape: tuple[int, ...], axes: tuple[str | None, ...] | None, *, name: str,
               factored: bool, min_dim_size_to_factor: int) -> _Factoring:
    """T5X's factoring rule for one parameter, from its logical axis names.

    A parameter with at most two dimensions per layer falls back to Adafactor's
    original heuristic, as in T5X: factor the two largest dimensions (rows = the
    smaller) when the smaller is >= `min_dim_size_to_factor`. Larger ones (attention
    kernels [embed, heads, kv]) are factored by name: rows over the `row` axes,
    columns over the `column` axes folded together, whatever their sizes. Unlike
    T5X, the heuristic is applied per layer also to scanned parameters, so a scanned
    and an unscanned model get the same updates (T5X factors a scanned [layers, 64,
    64] kernel but not the unscanned [64, 64] one).
    """
    if axes is None:
        if len(shape) > 2:
            raise ValueError(
                f"Adafactor needs the logical axis names of parameter {name} {shape} to "
                "factor it; build the state with Optimizer.transform_for(param_axes) "
                "(trainer.state_layout does).")
        axes = (None,) * len(shape)
    axes = tuple(axes) + (None,) * (len(shape) - len(axes))
    unknown = [a for a in axes if a is not None and a not in ADAFACTOR_FACTOR_AXES]
    if unknown:
        raise ValueError(f"Parameter {name} has logical axes {unknown} that Adafactor "
                         "does not know how to factor; add them to "
                         "optimizers.ADAFACTOR_FACTOR_AXES.")
    kinds = [ADAFACTOR_FACTOR_AXES.get(a) for a in axes]
    batch = tuple(d for d, k in enumerate(kinds) if k == "batch")
    per_layer = [d for d in range(len(shape)) if d not in batch]
    if not factored or int(np.prod(shape)) <= 1:
        return _Factoring(batch=batch)
    if len(per_layer) <= 2:
        if len(per_layer) < 2:
            return _Factoring(batch=batch)
        smaller, larger = sorted(per_layer, key=lambda d: shape[d])  # stable: ties keep order
        if shape[smaller] < min_dim_size_to_factor:
            return _Factoring(batch=batch)
        return _Factoring(rows=(smaller,), columns=(larger,), batch=batch)
    rows = tuple(d for d in per_layer if kinds[d] == "row")
    columns = tuple(d for d in per_layer if kinds[d] == "column")
    if rows and columns and len(rows) + len(columns) < len(per_layer):
        raise ValueError(f"Parameter {name} {shape} with axes {axes} is factored over "
                         "some dimensions but not all; give each a row or column rule in "
                         "optimizers.ADAFACTOR_FACTOR_AXES.")
    if not (rows and columns):
        return _Factoring(batch=batch)
    return _Factoring(rows=rows, columns=columns, batch=batch)


def _reduced(shape: tuple[int, ...], dims: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if d in dims else s for d, s in enumerate(shape))


class AdafactorState(NamedTuple):
    """Adafactor's state; each field but `count` is a tree shaped like the parameters.

    Every statistic has its parameter's rank, reduced dimensions kept with size 1
    (T5X deletes them): a factored parameter has `v_row` (its columns reduced), `v_col`
    (its rows reduced) and a size-1 `v`; an unfactored one a full `v` and size-1
    `v_row`/`v_col` that keep only the batch (layer) dimensions. So the shapes alone
    say how each parameter is treated (`update` needs no axis names), and each
    statistic is sharded like its parameter, minus the reduced dimensions.
    """
    count: jax.Array
    v_row: Any
    v_col: Any
    v: Any
    m: Any            # momentum, shaped like the parameters; None without momentum


def _factoring_from_shapes(param: tuple[int, ...], v_row: tuple[int, ...],
                           v_col: tuple[int, ...], v: tuple[int, ...]) -> _Factoring:
    """The inverse of how `init` shapes the statistics (see AdafactorState)."""
    batch = tuple(d for d, s in enumerate(param) if s > 1 and v_row[d] == v_col[d] == s)
    if tuple(v) == tuple(param):
        return _Factoring(batch=batch)
    rows = tuple(d for d, s in enumerate(param) if s > 1 and v_row[d] == s and v_col[d] == 1)
    columns = tuple(d for d, s in enumerate(param) if s > 1 and v_col[d] == s and v_row[d] == 1)
    return _Factoring(rows=rows, columns=columns, batch=batch)


def scale_by_adafactor(*, learning_rate: optax.Schedule, param_axes: Any = None,
                       decay_rate: float = 0.8, clipping_threshold: float | None = 1.0,
                       multiply_by_parameter_scale: bool = True, factored: bool = True,
                       min_dim_size_to_factor: int = 128, momentum: float | None = None,
                       weight_decay_rate: float | None = None, epsilon1: float = 1e-30,
                       epsilon2: float = 1e-3) -> optax.GradientTransformation:
    """Adafactor (Shazeer & Stern, 2018) as T5X computes it, factored by logical axes.

    Per parameter W with gradient G at step t (counting from 1):
      decay = 1 - t**-decay_rate;  G2 = G*G + epsilon1
      factored:   R = EMA of mean(G2 over columns), C = EMA of mean(G2 over rows),
                  V = R * C / mean(R over rows)     (the rank-1 estimate of E[G2])
      unfactored: V = EMA of G2
      U = G / sqrt(V), divided by max(1, rms(U) / clipping_threshold)
      step = learning_rate(t-1) * max(rms(W), epsilon2) * U   (the scale if
             multiply_by_parameter_scale), through an EMA if `momentum`
      update = -step (- weight_decay_rate * W)
    rms() and mean() run over all but the batch (layer) dimensions, so a scanned
    parameter is updated exactly as its unscanned layers would be.

    `param_axes`: the parameters' logical axis names (a tree of PartitionSpecs), which
    `init` needs to factor parameters of more than two dimensions; `update` reads
    everything from the state.
    """
    axes_by_path = {}
    if param_axes is not None:
        axes_by_path = dict(jax.tree_util.tree_flatten_with_path(
            param_axes, is_leaf=lambda x: isinstance(x, PartitionSpec))[0])

    def init(params):
        def factoring(path, p):
            axes = axes_by_path.get(path) if param_axes is not None else None
            if param_axes is not None and axes is None:
                raise ValueError(f"No logical axes given for parameter "
                                 f"{tree_paths.to_string(path)}.")
            return _factoring(tuple(p.shape), None if axes is None else tuple(axes),
                              name=tree_paths.to_string(path), factored=factored,
                              min_dim_size_to_factor=min_dim_size_to_factor)

        def zeros(select):
            def one(path, p):
                f = factoring(path, p)
                return jnp.zeros(select(tuple(p.shape), f), jnp.float32)
            return jax.tree_util.tree_map_with_path(one, params)

        everything_but = lambda shape, keep: tuple(
            s if d in keep else 1 for d, s in enumerate(shape))
        v_row = zeros(lambda s, f: _reduced(s, f.columns) if f.rows
                      else everything_but(s, f.batch))
        v_col = zeros(lambda s, f: _reduced(s, f.rows) if f.rows
                      else everything_but(s, f.batch))
        v = zeros(lambda s, f: (1,) * len(s) if f.rows else s)
        m = None if momentum is None else jax.tree.map(
            lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return AdafactorState(count=jnp.zeros([], jnp.int32), v_row=v_row, v_col=v_col,
                              v=v, m=m)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("Adafactor scales its steps by the parameters; pass them.")
        t = state.count.astype(jnp.float32) + 1.0
        decay = 1.0 - t ** -decay_rate
        lr = learning_rate(state.count)

        def one(g, p, v_row, v_col, v, m):
            f = _factoring_from_shapes(p.shape, v_row.shape, v_col.shape, v.shape)
            averaged = tuple(d for d in range(p.ndim) if d not in f.batch)
            rms = lambda x: jnp.sqrt(jnp.mean(x * x, axis=averaged, keepdims=True))
            g = g.astype(jnp.float32)
            g2 = g * g + epsilon1
            if f.rows:
                v_row = decay * v_row + (1 - decay) * jnp.mean(g2, axis=f.columns,
                                                               keepdims=True)
                v_col = decay * v_col + (1 - decay) * jnp.mean(g2, axis=f.rows,
                                                               keepdims=True)
                row_mean = jnp.mean(v_row, axis=f.rows, keepdims=True)
                u = g * jax.lax.rsqrt(v_row / row_mean) * jax.lax.rsqrt(v_col)
            else:
                v = decay * v + (1 - decay) * g2
                u = g * jax.lax.rsqrt(v)
            if clipping_threshold is not None:
                u = u / jnp.maximum(1.0, rms(u) / clipping_threshold)
            scale = lr
            if multiply_by_parameter_scale:
                scale = scale * jnp.maximum(rms(p.astype(jnp.float32)), epsilon2)
            step = scale * u
            if m is not None:
                m = momentum * m + (1 - momentum) * step
                step = m
            update = -step
            if weight_decay_rate is not None:
                update = update - weight_decay_rate * p
            return update.astype(p.dtype), v_row, v_col, v, m

        if state.m is None:
            out = jax.tree.map(lambda *args: one(*args, None), grads, params, state.v_row,
                               state.v_col, state.v)
        else:
            out = jax.tree.map(one, grads, params, state.v_row, state.v_col, state.v,
                               state.m)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out,
                                      is_leaf=lambda x: isinstance(x, tuple))
        new_m = pick(4) if state.m is not None else None
        return pick(0), AdafactorState(count=optax.safe_increment(state.count),
                                       v_row=pick(1), v_col=pick(2), v=pick(3), m=new_m)

    return optax.GradientTransformation(init, update)


def adafactor(*, learning_rate: optax.Schedule, decay_rate: float = 0.8,
              clipping_threshold: float | None = 1.0,
              multiply_by_parameter_scale: bool = True, factored: bool = True,
              min_dim_size_to_factor: int = 128, momentum: float | None = None,
              weight_decay_rate: float | None = None) -> Optimizer:
    """Adafactor with T5's pretraining defaults (factored second moments by logical
    axes as T5X does, no momentum, update clipping at 1.0, steps scaled by the
    parameter's RMS, epsilon1 1e-30, epsilon2 1e-3); see `scale_by_adafactor`."""
    make = functools.partial(
        scale_by_adafactor, learning_rate=learning_rate, decay_rate=decay_rate,
        clipping_threshold=clipping_threshold,
        multiply_by_parameter_scale=multiply_by_parameter_scale, factored=factored,
        min_dim_size_to_factor=min_dim_size_to_factor, momentum=momentum,
        weight_decay_rate=weight_decay_rate)
    return Optimizer(transform=make(), learning_rate=learning_rate,
                     by_param_axes=lambda axes: make(param_axes=axes))


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
