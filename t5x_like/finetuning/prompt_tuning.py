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
+-`init_range`, or (`init='vocabulary'`) as the base's embeddings of `length` distinct
tokens drawn from its `vocabulary_sample_from` most common ones, which Lester et al.
found better than random vectors for small models (their 5,000; a SentencePiece
vocabulary lists its pieces most likely first, so those are ids 3 .. 5002). That needs
the base's table, which exists only once the run has loaded its frozen base:
`started_from_base` is called then, for a new run only (a resumed one has its prompt).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_like import errors, tree_paths
from t5x_like.finetuning import trainable
from t5x_like.models import layers

PROMPT_NAME = 'prompt'
TRAINABLE_PATTERN = rf'(.*/)?soft_prompt/{PROMPT_NAME}'
LENGTH_AXIS = 'soft_prompt_length'    # logical axis of the prompt's positions: never split
INITS = ('uniform', 'vocabulary')
# Both families' token table; the first piece after pad (0), EOS (1) and UNK (2).
EMBEDDING_PATH = 'token_embedder/embedding'
FIRST_PIECE_ID = 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuning:
    """A soft prompt of `length` learned vectors; the base model frozen.

    Attributes:
      length: N, the prompt's vectors; the data must reserve as many placeholder
        tokens (`SeqioDataSource.soft_prompt_length`: the run files set both from
        one macro, and a run whose two differ stops before model init).
      init: 'uniform' (in +-init_range) or 'vocabulary' (the base's embeddings of
        `length` distinct tokens drawn, with the run's seed, from ids
        FIRST_PIECE_ID .. FIRST_PIECE_ID + vocabulary_sample_from - 1).
      init_range: the uniform init's bound (Lester et al.'s random init: 0.5).
      vocabulary_sample_from: how many of the most common pieces the vocabulary
        init draws from (Lester et al.: 5,000).
      frozen_dtype: 'bfloat16' holds the frozen base in half the memory.
    """
    length: int = 20
    init: str = 'uniform'
    init_range: float = 0.5
    vocabulary_sample_from: int = 5000
    frozen_dtype: str = 'float32'

    trainable_pattern = TRAINABLE_PATTERN

    def __post_init__(self):
        if self.length < 1 or self.init_range <= 0:
            raise errors.ConfigError(
                f"PromptTuning length={self.length}, init_range={self.init_range}",
                fix="set prompt_tuning.PromptTuning.length >= 1 and init_range > 0")
        if self.init not in INITS:
            raise errors.ConfigError(f"PromptTuning init={self.init!r}",
                                     fix=f"choose one of {list(INITS)}")
        if self.vocabulary_sample_from < self.length:
            raise errors.ConfigError(
                f"PromptTuning vocabulary_sample_from={self.vocabulary_sample_from} is "
                f"below length={self.length}: the prompt's tokens must be distinct",
                fix="set vocabulary_sample_from >= length")
        trainable.check_frozen_dtype('PromptTuning', self.frozen_dtype)

    @property
    def soft_prompt_length(self) -> int:
        """Placeholder tokens the data must put in front of every example's inputs."""
        return self.length

    def vocabulary_ids(self, *, seed: int, vocab_size: int) -> np.ndarray:
        """The `length` distinct token ids the vocabulary init takes, the same on
        every host (numpy's generator seeded with the run's seed)."""
        stop = min(FIRST_PIECE_ID + self.vocabulary_sample_from, vocab_size)
        if stop - FIRST_PIECE_ID < self.length:
            raise errors.ConfigError(
                f"PromptTuning init='vocabulary' needs {self.length} distinct tokens "
                f"from a vocabulary of {vocab_size}",
                fix="shorten the prompt or use init='uniform'")
        rng = np.random.default_rng(seed)
        return rng.choice(np.arange(FIRST_PIECE_ID, stop), size=self.length, replace=False)

    def started_from_base(self, *, trainable_params: Any, frozen_params: Any,
                          seed: int) -> Any:
        """A new run's trainable parameters once its frozen base is loaded: with
        init='vocabulary', each prompt set to the base's embeddings of
        `vocabulary_ids`, keeping the prompt's sharding; else unchanged."""
        if self.init == 'uniform':
            return trainable_params
        table_VxD = tree_paths.flatten(frozen_params).get(EMBEDDING_PATH)
        if table_VxD is None:
            raise errors.ConfigError(
                f"PromptTuning init='vocabulary': the base has no {EMBEDDING_PATH}",
                fix="use init='uniform'")
        ids_N = jnp.asarray(self.vocabulary_ids(seed=seed, vocab_size=table_VxD.shape[0]))

        def from_table(path, prompt_NxD):
            if not re.fullmatch(TRAINABLE_PATTERN, tree_paths.to_string(path)):
                return prompt_NxD
            rows = jax.jit(lambda table: jnp.take(table, ids_N, axis=0).astype(prompt_NxD.dtype),
                           out_shardings=getattr(prompt_NxD, 'sharding', None))
            return rows(table_VxD)

        return jax.tree_util.tree_map_with_path(from_table, trainable_params)

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
