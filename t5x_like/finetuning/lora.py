"""LoRA: a low-rank update next to each chosen projection, the projection frozen.

A projection y = x W (W: `in_dims + out_dims`, a `layers.DenseGeneral` kernel) becomes

    y = x W + (alpha / rank) * ((dropout(x) A) B)

with A: `in_dims + (rank,)` and B: `(rank,) + out_dims`. A starts uniform in
+-1/sqrt(fan_in) and B at zero, as Hugging Face PEFT initialises them, so at the start
the model is exactly the base model. Only A and B are trained (`TRAINABLE_PATTERN`).

The update runs beside the frozen matmul rather than being folded into W, so the
gradient never forms a full-size dW and LoRA dropout can act on x (PEFT's order).
It is attached by intercepting `DenseGeneral.__call__` (Flax's
`nn.intercept_methods`), not by a field on every layer: which projections get it is
the regex `targets` over their kernel's path (e.g. 'encoder/layers_0/attention/
query/kernel'; with scanned layers 'encoder/layers/attention/query/kernel'), so any
model family built from DenseGeneral works unchanged, and the parameters sit beside
the kernel they adapt ('.../query/lora_a'), sharded by the kernel's logical axes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from t5x_like import errors
from t5x_like.finetuning import trainable
from t5x_like.models import layers

# Attention projections of both families (T5: query/key/value/out of self- and
# cross-attention; the decoder family: query/key/value/out). PEFT's default for
# T5 is q and v only; q, k, v and o is the common choice for instruction tuning.
ATTENTION_TARGETS = r'.*(attention|self_attention|cross_attention)/(query|key|value|out)/kernel'
# Every projection inside the layers (attention and MLP), not embeddings or logits.
ALL_LINEAR_TARGETS = r'.*layers(_\d+)?/.*/(query|key|value|out|wi|wi_0|wi_1|wo)/kernel'

# Names `LoRA.targets` may give instead of a regex.
TARGET_PRESETS = {'attention': ATTENTION_TARGETS, 'all_linear': ALL_LINEAR_TARGETS}

A_NAME, B_NAME = 'lora_a', 'lora_b'
TRAINABLE_PATTERN = rf'.*/({A_NAME}|{B_NAME})'
RANK_AXIS = 'lora_rank'   # logical axis of the rank dimension: never sharded


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA:
    """Low-rank adapters on the projections whose kernel path fully matches `targets`.

    Attributes:
      rank: r, the inner dimension of A and B.
      alpha: the update is scaled by alpha / rank (PEFT's `lora_alpha`).
      dropout_rate: dropout on the adapter's input only (PEFT's `lora_dropout`);
        active when the model's dropout is (training steps, not eval).
      targets: 'attention' (query/key/value/out of every attention), 'all_linear'
        (those and the MLP's wi/wo, as QLoRA adapts), or a regex over kernel paths.
      frozen_dtype: 'bfloat16' holds the frozen base in half the memory (its values
        rounded once, when loaded); adapters and compute keep their own dtypes.
    """
    rank: int = 8
    alpha: float = 16.0
    dropout_rate: float = 0.0
    targets: str = 'attention'
    frozen_dtype: str = 'float32'

    trainable_pattern = TRAINABLE_PATTERN
    soft_prompt_length = 0       # LoRA adds no input tokens

    def __post_init__(self):
        if self.rank < 1 or not 0.0 <= self.dropout_rate < 1.0:
            raise errors.ConfigError(
                f"LoRA rank={self.rank}, dropout_rate={self.dropout_rate}",
                fix="set lora.LoRA.rank >= 1 and 0 <= dropout_rate < 1")
        trainable.check_frozen_dtype('LoRA', self.frozen_dtype)
        try:
            re.compile(self.targets_regex)
        except re.error as e:
            raise errors.ConfigError(f"lora.LoRA.targets {self.targets!r} is not a "
                                     f"regular expression ({e})",
                                     fix="correct the pattern") from e

    def started_from_base(self, *, trainable_params: Any, frozen_params: Any,
                          seed: int) -> Any:
        """As initialised: B = 0 makes the adapted model the base at step 0."""
        del frozen_params, seed
        return trainable_params

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def targets_regex(self) -> str:
        return TARGET_PRESETS.get(self.targets, self.targets)

    def is_target(self, kernel_path: str) -> bool:
        return re.fullmatch(self.targets_regex, kernel_path) is not None

    @contextlib.contextmanager
    def applied(self, *, enable_dropout: bool) -> Iterator[None]:
        """Within this context, targeted DenseGeneral layers carry their adapter
        (created at init, applied after). Wrap a module's `init` and `apply` in it."""
        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if not (isinstance(module, layers.DenseGeneral)
                    and context.method_name == '__call__'
                    and self.is_target('/'.join(module.path) + '/kernel')):
                return next_fun(*args, **kwargs)
            (x,) = args
            return next_fun(*args, **kwargs) + self._update(module, x, enable_dropout)

        with nn.intercept_methods(interceptor):
            yield

    def _update(self, dense: layers.DenseGeneral, x: jax.Array,
                enable_dropout: bool) -> jax.Array:
        """(alpha / rank) * dropout(x) A B, created in `dense`'s own scope."""
        features = ((dense.features,) if isinstance(dense.features, int)
                    else tuple(dense.features))
        axis = (dense.axis,) if isinstance(dense.axis, int) else tuple(dense.axis)
        axis = tuple(a % x.ndim for a in axis)
        in_shape = tuple(x.shape[a] for a in axis)
        in_axes = tuple(dense.kernel_axes[:len(in_shape)])
        out_axes = tuple(dense.kernel_axes[len(in_shape):])
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = dense.param(
            A_NAME, nn.with_logical_partitioning(
                lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
                in_axes + (RANK_AXIS,)),
            in_shape + (self.rank,), jnp.float32)
        b = dense.param(
            B_NAME, nn.with_logical_partitioning(nn.initializers.zeros,
                                                 (RANK_AXIS,) + out_axes),
            (self.rank,) + features, jnp.float32)
        dtype = dense.dtype
        contract = ((axis, tuple(range(len(axis)))), ((), ()))
        h, a = x.astype(dtype), a.astype(dtype)
        if enable_dropout and self.dropout_rate > 0:
            # Recomputed from its key in the backward pass instead of kept: a kept
            # dropout(x) is one more activation-sized array per adapted projection
            # (measured: +1.5 GiB peak RSS on T5.1.1-small, all linear kernels).
            down = jax.checkpoint(functools.partial(
                _dropped_projection, rate=self.dropout_rate, contract=contract))(
                    h, a, dense.make_rng('dropout'))
        else:
            down = jax.lax.dot_general(h, a, contract)
        up = jax.lax.dot_general(down, b.astype(dtype), (((down.ndim - 1,), (0,)), ((), ())))
        out_dtype = dense.out_dtype or dense.dtype
        return (up * jnp.asarray(self.scale, dtype)).astype(out_dtype)


def _dropped_projection(h: jax.Array, a: jax.Array, key: jax.Array, *, rate: float,
                        contract) -> jax.Array:
    """dropout(h) A, PEFT's order: inverted dropout on the adapter's input only."""
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    dropped = jnp.where(keep, h / (1.0 - rate), 0).astype(h.dtype)
    return jax.lax.dot_general(dropped, a, contract)


def merged(params: dict, *, scale: float) -> dict:
    """The parameters with every adapter folded into its kernel, W + scale * A B,
    and the adapters removed: the base model's tree, which needs no LoRA to run
    (export it as a plain checkpoint). `scale` is the adapter's alpha / rank.

    Works on scanned kernels too: a leading layers dimension is a batch dimension.
    """
    flat = traverse_util.flatten_dict(params, sep='/')
    out = {}
    for path, value in flat.items():
        module, _, name = path.rpartition('/')
        if name in (A_NAME, B_NAME):
            continue
        if name == 'kernel' and f'{module}/{A_NAME}' in flat:
            value = value + scale * low_rank_product(flat[f'{module}/{A_NAME}'],
                                                     flat[f'{module}/{B_NAME}'],
                                                     kernel_ndim=value.ndim)
        out[path] = value
    return traverse_util.unflatten_dict(out, sep='/')


def low_rank_product(a: jax.Array, b: jax.Array, *, kernel_ndim: int) -> jax.Array:
    """A B with the kernel's shape: A [*batch, *in, r] times B [*batch, r, *out]."""
    num_batch = a.ndim + b.ndim - kernel_ndim - 2
    batch = tuple(range(num_batch))
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (num_batch,)), (batch, batch)),
                               precision=jax.lax.Precision.HIGHEST)
