"""Prompt tuning: N learned vectors in front of every example's input, the model frozen.

Lester et al. (2021), "The Power of Scale for Parameter-Efficient Prompt Tuning",
T5's way: a soft prompt of `length` vectors of the model's embedding width is
prepended to the encoder input (encoder-decoder) or to the decoder's prompt
(decoder-only, before the inputs of a prefix-LM example), and only those vectors
train.

How the vectors reach the model, so that packing, padding and decoding work unchanged:
the data layer puts `length` placeholder tokens at the start of every example's
`inputs` (`SeqioDataSource.soft_prompt_length`, data/converters.py `SOFT_PROMPT_ID`;
launch.infer's prompts likewise), and both model families pass their input
embeddings through `layers.SoftPrompt` with each token's index inside its example.
Here that call is intercepted (Flax `nn.intercept_methods`, as LoRA attaches) and the
embeddings at indices 0 .. length-1 are replaced by the learned vectors. A packed
row of three examples thus carries three prompts, a left-padded decoding prompt
carries one, and no model family has prompt-tuning code of its own.

The vectors are the parameter `soft_prompt/prompt` [length, embed] (under `encoder/`
for T5), sharded by `embed` like the token embeddings. They start uniform in
+-`init_range`; Lester et al. found initialising from sampled vocabulary embeddings
better for small models, which needs the base's table and so is not done here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_like import errors
from t5x_like.finetuning import trainable
from t5x_like.models import layers

PROMPT_NAME = 'prompt'
TRAINABLE_PATTERN = rf'(.*/)?soft_prompt/{PROMPT_NAME}'
LENGTH_AXIS = 'soft_prompt_length'    # logical axis of the prompt's positions: never split


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuning:
    """A soft prompt of `length` learned vectors; the base model frozen.

    Attributes:
      length: N, the prompt's vectors; the data must reserve as many placeholder
        tokens (`SeqioDataSource.soft_prompt_length`: the run files set both from
        one macro, and a run whose two differ stops before model init).
      init_range: the vectors start uniform in +-init_range (Lester et al.'s random
        init: 0.5).
      frozen_dtype: 'bfloat16' holds the frozen base in half the memory.
    """
    length: int = 20
    init_range: float = 0.5
    frozen_dtype: str = 'float32'

    trainable_pattern = TRAINABLE_PATTERN

    def __post_init__(self):
        if self.length < 1 or self.init_range <= 0:
            raise errors.ConfigError(
                f"PromptTuning length={self.length}, init_range={self.init_range}",
                fix="set prompt_tuning.PromptTuning.length >= 1 and init_range > 0")
        trainable.check_frozen_dtype('PromptTuning', self.frozen_dtype)

    @property
    def soft_prompt_length(self) -> int:
        """Placeholder tokens the data must put in front of every example's inputs."""
        return self.length

    @contextlib.contextmanager
    def applied(self, *, enable_dropout: bool) -> Iterator[None]:
        """Within this context the model's `layers.SoftPrompt` writes the prompt over
        each example's first `length` input tokens (created at init, applied after).
        The prompt has no dropout of its own; the model's, after it, applies."""
        del enable_dropout

        def interceptor(next_fun, args, kwargs, context):
            if not (isinstance(context.module, layers.SoftPrompt)
                    and context.method_name == '__call__'):
                return next_fun(*args, **kwargs)
            x_BxLxD, input_index_BxL = args
            return self._written(context.module, x_BxLxD, input_index_BxL)

        with nn.intercept_methods(interceptor):
            yield

    def _written(self, module: layers.SoftPrompt, x_BxLxD: jax.Array,
                 input_index_BxL: jax.Array) -> jax.Array:
        bound = self.init_range
        prompt_NxD = module.param(
            PROMPT_NAME, nn.with_logical_partitioning(
                lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
                (LENGTH_AXIS, 'embed')),
            (self.length, x_BxLxD.shape[-1]), jnp.float32)
        in_prompt_BxL = (input_index_BxL >= 0) & (input_index_BxL < self.length)
        rows_BxLxD = jnp.take(prompt_NxD.astype(x_BxLxD.dtype),
                              jnp.clip(input_index_BxL, 0, self.length - 1), axis=0)
        return jnp.where(in_prompt_BxL[..., None], rows_BxLxD, x_BxLxD)
