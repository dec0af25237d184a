"""The train state, its sharded initialisation, and the jitted train step.

Initialisation never materialises the full parameters on one host: the state is
first traced abstractly (`jax.eval_shape`), its logical axis names are turned into
shardings, and only then is `init` compiled with those `out_shardings`, so each
device creates just its own shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from t5x_like.finetuning import trainable
from t5x_like.training import xla_options
from t5x_like.training.optimizers import Optimizer
from t5x_like.models.trainable import Model
from t5x_like.parallel import params_layout
from t5x_like.parallel.partitioning import MeshJitted, Partitioner

Batch = Mapping[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """What training updates and checkpoints hold. `params` are the trainable
    parameters: all of them, or an adapter run's adapters (finetuning/trainable.py),
    whose frozen base is passed to the step separately."""
    step: jax.Array
    params: Any
    opt_state: Any


# --------------------------------------------------------------------------- init

def _optimizer_state_logical_specs(opt_state: Any, params: Any,
                                   param_specs: Any, tx: optax.GradientTransformation
                                   ) -> Any:
    """Logical specs for every optimizer-state leaf, inferred from its parameter.

    A leaf with its parameter's rank whose every dimension is the parameter's or 1
    (Adam's moments; Adafactor's factored row/column statistics, which keep reduced
    dimensions as size 1) takes the parameter's spec, unsplit along the size-1
    dimensions; anything else (counters, scalars) is replicated. This keeps the
    optimizer state as sharded as the parameters under FSDP and tensor parallelism
    without the optimizer knowing about meshes.
    """
    def spec_for(leaf, param, spec):
        if not hasattr(leaf, "shape") or not hasattr(param, "shape"):
            return PartitionSpec()
        names = tuple(spec) + (None,) * (len(param.shape) - len(spec))
        if len(leaf.shape) == len(param.shape) and all(
                n in (p, 1) for n, p in zip(leaf.shape, param.shape)):
            return PartitionSpec(*(name if n == p else None
                                   for name, n, p in zip(names, leaf.shape, param.shape)))
        return PartitionSpec(*([None] * len(leaf.shape)))

    def replicated(leaf):
        return PartitionSpec(*([None] * len(getattr(leaf, "shape", ()))))

    return optax.tree_utils.tree_map_params(
        tx, spec_for, opt_state, params, param_specs,
        transform_non_params=replicated,
        is_leaf=lambda x: isinstance(x, PartitionSpec))


def _make_init_fn(model: Model, optimizer: Optimizer, feature_lengths: Mapping[str, int]
                  ) -> Callable[[jax.Array], TrainState]:
    """init(rng) -> the TrainState of the trainable parameters. An adapter run's
    frozen base is left out, so XLA never computes it (init_from supplies it)."""
    shape_kwargs = model.init_lengths(feature_lengths)

    def init(rng: jax.Array) -> TrainState:
        boxed = model.init_params(rng, batch_size=1, **shape_kwargs)
        params, _ = trainable.split(nn.unbox(boxed), model.trainable_pattern)
        # Adafactor factors by logical axis names: its state is built from them.
        axes, _ = trainable.split(nn.get_partition_spec(boxed), model.trainable_pattern)
        tx = optimizer.transform_for(axes)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params))
    return init


@dataclasses.dataclass(frozen=True, kw_only=True)
class StateLayout(params_layout.ParamsLayout):
    """The same for the whole train state: each field holds a TrainState.

    `model_params` is the layout of every parameter of the model (what eval and
    decoding take); `frozen` that of the part an adapter run does not train (None
    in a full run, where the state's params are all of them).
    """
    model_params: params_layout.ParamsLayout
    frozen: params_layout.ParamsLayout | None = None


def state_layout(*, model: Model, optimizer: Optimizer, partitioner: Partitioner,
                 feature_lengths: Mapping[str, int]) -> StateLayout:
    """Traces init abstractly and derives the state's shardings. Cheap: no FLOPs."""
    params = params_layout.for_model(model=model, partitioner=partitioner,
                                     feature_lengths=feature_lengths)
    rng = jax.random.key(0)
    with partitioner.context():
        abstract = jax.eval_shape(_make_init_fn(model, optimizer, feature_lengths), rng)
    pattern = model.trainable_pattern
    param_specs, frozen_specs = trainable.split(params.logical_specs, pattern)
    opt_specs = _optimizer_state_logical_specs(
        abstract.opt_state, abstract.params, param_specs,
        optimizer.transform_for(param_specs))
    logical = TrainState(step=PartitionSpec(), params=param_specs, opt_state=opt_specs)
    frozen = None
    if pattern is not None:
        frozen = params_layout.ParamsLayout(
            abstract=jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, model.frozen_dtype),
                                  trainable.split(params.abstract, pattern)[1]),
            logical_specs=frozen_specs,
            shardings=trainable.split(params.shardings, pattern)[1])
    return StateLayout(abstract=abstract, logical_specs=logical,
                       shardings=partitioner.shardings(logical), model_params=params,
                       frozen=frozen)


def init_train_state(*, model: Model, optimizer: Optimizer, partitioner: Partitioner,
                     feature_lengths: Mapping[str, int], seed: int,
                     layout: StateLayout) -> TrainState:
    """Creates the state directly in its shards (each device builds only its part)."""
    init = _make_init_fn(model, optimizer, feature_lengths)
    return partitioner.jit(init, out_shardings=layout.shardings)(jax.random.key(seed))


# --------------------------------------------------------------------------- step

def _split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(f"Batch size {x.shape[0]} is not divisible by "
                             f"num_microbatches={num_microbatches}.")
        return x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])
    return jax.tree.map(split, batch)


def _sum_metrics_and_grads(model: Model, params: Any, batch: Batch, dropout_rng,
                           num_microbatches: int, frozen: Any = None) -> tuple[dict, Any]:
    """Gradient of the *unnormalised* loss, summed over microbatches.

    The loss is normalised by the number of real target tokens in the whole batch,
    so microbatches contribute sums (the model returns its loss as a sum) and the
    division happens once at the end: the result equals the single-batch gradient,
    not an average of per-microbatch means.
    """
    grad_fn = jax.grad(        # differentiates the trainable part only
        lambda p, micro, rng: model.loss_and_metrics(trainable.merge(p, frozen), micro,
                                                     dropout_rng=rng),
        has_aux=True)
    if num_microbatches == 1:
        grads, metrics = grad_fn(params, batch, dropout_rng)
        return metrics, grads

    micro = _split_microbatches(batch, num_microbatches)

    def body(carry, xs):
        grads_acc, metrics_acc = carry
        index, mb = xs
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        grads, metrics = grad_fn(params, mb, rng)
        return (jax.tree.map(jnp.add, grads_acc, grads),
                jax.tree.map(jnp.add, metrics_acc, metrics)), None

    first = jax.tree.map(lambda x: x[0], micro)
    metrics_shape = jax.eval_shape(lambda: grad_fn(params, first, dropout_rng)[1])
    zeros_grads = jax.tree.map(jnp.zeros_like, params)
    zeros_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape)
    (grads, metrics), _ = jax.lax.scan(
        body, (zeros_grads, zeros_metrics), (jnp.arange(num_microbatches), micro))
    return metrics, grads


def make_train_step(*, model: Model, optimizer: Optimizer, num_microbatches: int = 1,
                    dropout_seed: int = 0) -> Callable[[TrainState, Batch], tuple]:
    """Returns the pure train step `(state, batch) -> (new_state, metrics)`.

    Metrics are scalars: the normalised loss, z-loss, token accuracy, the learning
    rate used, the gradient and parameter global norms (of the trainable
    parameters), the token count, and `nonfinite` (1.0 when this step's update was
    dropped for a NaN/Inf). An adapter run's step takes its frozen base as a third
    argument (see jit_train_step).
    """
    def train_step(state: TrainState, batch: Batch, frozen: Any = None):
        dropout_rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
        sums, grads = _sum_metrics_and_grads(model, state.params, batch, dropout_rng,
                                             num_microbatches, frozen)
        weight_sum = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g: g / weight_sum, grads)
        updates, opt_state = optimizer.transform.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss = sums["loss_sum"] / weight_sum          # loss_sum includes the z-loss
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss, gradient or update (e.g. an Inf learning rate) never
        # reaches the state: it is dropped (the step still counts, so the data
        # position stays aligned) and the train loop decides whether to halt.
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optax.tree.norm(updates)))
        keep_if_finite = lambda new, old: jnp.where(finite, new, old)
        params = jax.tree.map(keep_if_finite, params, state.params)
        opt_state = jax.tree.map(keep_if_finite, opt_state, state.opt_state)
        metrics = {
            "loss": loss,
            "cross_entropy": (sums["loss_sum"] - sums["z_loss_sum"]) / weight_sum,
            "z_loss": sums["z_loss_sum"] / weight_sum,
            "accuracy": sums["accuracy_sum"] / weight_sum,
            "target_tokens": sums["weight_sum"],
            "learning_rate": optimizer.applied_learning_rate(state.opt_state),
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(params),
            "nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def jit_train_step(train_step: Callable, *, partitioner: Partitioner, layout: StateLayout,
                   batch_feature_names: tuple[str, ...]) -> MeshJitted:
    """The train step with explicit in/out shardings and the state donated.

    Call it to train; `lower` it with abstract arguments to compile ahead of time
    (training/aot.py's fit check compiles exactly this step). XLA options for the
    mesh's platform come from training/xla_options.py. An adapter run's step is
    `(state, batch, frozen)`: the frozen base is read, not donated.
    """
    batch_shardings = {name: partitioner.batch_sharding() for name in batch_feature_names}
    in_shardings = (layout.shardings, batch_shardings)
    if layout.frozen is not None:
        in_shardings += (layout.frozen.shardings,)
    return partitioner.jit(
        train_step, in_shardings=in_shardings,
        out_shardings=(layout.shardings, partitioner.replicated()), donate_argnums=(0,),
        compiler_options=xla_options.train_step_options(
            partitioner.mesh.devices.flat[0].platform))
