"""Decoding: greedy, temperature / top-k / top-p sampling and beam search.

One call decodes a batch, jitted and (under a partitioner) sharded like training:

    result = decode.predict_batch(model, params, batch,
                                  config=decode.DecodeConfig(num_beams=4), rng=key)

The contract:

* `batch` uses seqio's feature names and is unpacked (one example per row):
  - `EncoderDecoderModel`: `encoder_input_tokens` [B, E], 0 = padding. The decoder
    starts from token 0, as in training.
  - `DecoderOnlyModel`: `decoder_input_tokens` [B, P], each row's prompt at its start
    (the leading 0 of seqio's shifted decoder inputs included) and padding after it,
    plus what marks the prompt: `decoder_causal_attention` [B, P] (a prefix-LM batch
    as seqio's PrefixLMFeatureConverter makes it: 1 on the prompt, which attends to
    itself bidirectionally, as in training; whatever follows it is ignored) or
    `decoder_prompt_lengths` [B] (a causal prompt). Every prompt needs a token.
* `DecodeResult`: `tokens_BxL` [B, max_decode_length] int32, the generated tokens
  only (not the prompt), EOS included, 0 after it; `lengths_B`, the generated
  tokens up to and including EOS; `scores_B`: for sampling, the sum of the model's
  log-probabilities of those tokens (temperature 1, before any filtering); for beam
  search, the best beam's length-penalised score.
* What a model provides (`Decodable`): `decode_prefill`, one forward over the prompt
  (or the encoder input) that fills a preallocated KV cache, and `decode_step`,
  which feeds one token per row. A new model family implements these two methods and
  needs no change here. Every array leaf of the state they pass around has the
  batch first, so beam search can repeat and reorder it without knowing what is
  inside (within each example, so each batch shard keeps its own rows).

The token loop is a `lax.while_loop` over fixed shapes (the cache is preallocated),
stopping early once every row has finished. Temperature 0 is greedy (as T5X).
Beam search lives in `decoding/beam_search.py`; it offers T5X's rules and brevity penalty
((5 + length) / 6) ** alpha, and Hugging Face's with score / length ** alpha.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import flax
import jax
import jax.numpy as jnp

from t5x_like.decoding import beam_search
from t5x_like.parallel import partitioning
from t5x_like.parallel.partitioning import Partitioner

Array = jax.Array


class Decodable(Protocol):
    """What decoding needs from a model (models/t5.py, models/decoder.py)."""

    def decode_prefill(self, params: Any, batch: Mapping[str, Array], *,
                       max_decode_length: int) -> tuple[Array, Any]:
        """(logits_BxV of the first generated token, state with the cache filled)."""

    def decode_step(self, params: Any, state: Any, tokens_B: Array, position: Array
                    ) -> tuple[Array, Any]:
        """Feeds generated token number `position` (0-based): (next logits_BxV, state)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """How to decode; gin-configurable (`decode.DecodeConfig.num_beams = 4`).

    Attributes:
      max_decode_length: tokens generated at most per row (EOS included).
      temperature: 0 = greedy (argmax); otherwise sample from softmax(logits / T).
      top_k: sample among the k most likely tokens only (0 = all).
      top_p: sample among the smallest set of tokens whose probability (after
        temperature and top-k) reaches top_p (1 = all).
      num_beams: > 1 selects beam search (deterministic; no sampling options).
      length_penalty: beam search rules. 't5x': T5X's, score = log p / ((5 + length)
        / 6) ** alpha. 'hf': Hugging Face `generate`'s, score = log p / length ** alpha
        (its `length_penalty`, default 1.0 there).
      alpha: the exponent of either penalty (T5X's default 0.6).
      eos_id: the token that ends a sequence (1 in seqio vocabularies).
    """

    max_decode_length: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: Literal['t5x', 'hf'] = 't5x'
    alpha: float = 0.6
    eos_id: int = 1

    def __post_init__(self):
        problems = []
        if self.max_decode_length < 1:
            problems.append(f'max_decode_length={self.max_decode_length} must be >= 1')
        if self.temperature < 0:
            problems.append(f'temperature={self.temperature} must be >= 0')
        if self.top_k < 0:
            problems.append(f'top_k={self.top_k} must be >= 0')
        if not 0 < self.top_p <= 1:
            problems.append(f'top_p={self.top_p} must be in (0, 1]')
        if self.num_beams < 1:
            problems.append(f'num_beams={self.num_beams} must be >= 1')
        if self.length_penalty not in beam_search.RULES:
            problems.append(f'length_penalty={self.length_penalty!r} must be one of '
                            f'{sorted(beam_search.RULES)}')
        if self.num_beams > 1 and (self.temperature or self.top_k or self.top_p < 1):
            problems.append('beam search takes no temperature/top_k/top_p (they apply '
                            'to sampling, num_beams=1)')
        if problems:
            raise ValueError('DecodeConfig: ' + '; '.join(problems) + '.')

    @property
    def is_greedy(self) -> bool:
        return self.num_beams == 1 and self.temperature == 0


@flax.struct.dataclass
class DecodeResult:
    tokens_BxL: Array   # generated tokens, EOS included, 0 after it
    lengths_B: Array    # tokens up to and including EOS
    scores_B: Array     # see the module docstring


# ---------------------------------------------------------------------------
# Sampling (greedy when temperature is 0)
# ---------------------------------------------------------------------------

def filter_logits(logits_BxV: Array, *, temperature: float, top_k: int, top_p: float
                  ) -> Array:
    """Temperature, then top-k, then top-p (nucleus): excluded tokens get -inf.

    Top-p keeps the most likely tokens, in order, until their probability reaches
    top_p (the token that crosses it included, so at least one survives); tokens
    tied with the last one kept are kept too.
    """
    logits = logits_BxV.astype(jnp.float32) / temperature
    if top_k:
        kth_best = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_best, -jnp.inf, logits)
    if top_p < 1:
        sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_BxV, kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def next_tokens(logits_BxV: Array, rng: Array, config: DecodeConfig) -> Array:
    """The next token of every row: argmax when greedy, else a filtered sample."""
    if config.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits_BxV, temperature=config.temperature,
                             top_k=config.top_k, top_p=config.top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def _token_log_prob(logits_BxV: Array, tokens_B: Array) -> Array:
    log_probs = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, tokens_B[:, None], axis=-1)[:, 0]


def lengths_up_to_eos(tokens_BxL: Array, eos_id: int) -> Array:
    """Tokens up to and including the first EOS (the full length if none)."""
    is_eos = tokens_BxL == eos_id
    return jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1,
                     tokens_BxL.shape[1]).astype(jnp.int32)


@flax.struct.dataclass
class _Sampled:
    position: Array       # scalar: tokens generated so far
    tokens_BxL: Array
    finished_B: Array     # produced EOS
    scores_B: Array
    last_B: Array         # the latest token of every row (fed to the next step)


def _emit(sampled: _Sampled, logits_BxV: Array, *, config: DecodeConfig, rng: Array
          ) -> _Sampled:
    """Chooses token number `sampled.position` of every row from its logits."""
    position, finished_B = sampled.position, sampled.finished_B
    chosen_B = jnp.where(finished_B, 0,
                         next_tokens(logits_BxV, jax.random.fold_in(rng, position), config))
    log_prob_B = jnp.where(finished_B, 0.0, _token_log_prob(logits_BxV, chosen_B))
    return _Sampled(
        position=position + 1,
        tokens_BxL=jax.lax.dynamic_update_slice(sampled.tokens_BxL, chosen_B[:, None],
                                                (0, position)),
        finished_B=finished_B | (chosen_B == config.eos_id),
        scores_B=sampled.scores_B + log_prob_B, last_B=chosen_B)


def sample(step_fn, first_logits_BxV: Array, state: Any, *, config: DecodeConfig,
           rng: Array) -> DecodeResult:
    """Greedy or sampled decoding from the first token's logits.

    `step_fn(state, tokens_B, position) -> (logits_BxV, state)` feeds generated token
    `position`. Rows that produced EOS emit 0 afterwards and add nothing to their
    score; the loop stops when every row has finished or at max_decode_length.
    """
    batch, length = first_logits_BxV.shape[0], config.max_decode_length
    emit = functools.partial(_emit, config=config, rng=rng)
    start = _Sampled(position=jnp.int32(0), tokens_BxL=jnp.zeros((batch, length), jnp.int32),
                     finished_B=jnp.zeros(batch, bool), scores_B=jnp.zeros(batch, jnp.float32),
                     last_B=jnp.zeros(batch, jnp.int32))

    def not_done(carry):
        sampled, _ = carry
        return (sampled.position < length) & ~jnp.all(sampled.finished_B)

    def body(carry):
        sampled, state = carry
        logits_BxV, state = step_fn(state, sampled.last_B, sampled.position - 1)
        return emit(sampled, logits_BxV), state

    sampled, _ = jax.lax.while_loop(not_done, body, (emit(start, first_logits_BxV), state))
    return DecodeResult(tokens_BxL=sampled.tokens_BxL,
                        lengths_B=lengths_up_to_eos(sampled.tokens_BxL, config.eos_id),
                        scores_B=sampled.scores_B)


# ---------------------------------------------------------------------------
# The one entry point
# ---------------------------------------------------------------------------

def decode(model: Decodable, params: Any, batch: Mapping[str, Array], *,
           config: DecodeConfig, rng: Array) -> DecodeResult:
    """Prefill, then the token loop (sampling or beam search). Pure: jit it."""
    first_logits_BxV, state = model.decode_prefill(
        params, batch, max_decode_length=config.max_decode_length)
    step_fn = functools.partial(model.decode_step, params)
    if config.num_beams > 1:
        tokens_BxL, scores_B = beam_search.beam_search(
            step_fn, first_logits_BxV, state, num_beams=config.num_beams,
            max_decode_length=config.max_decode_length, eos_id=config.eos_id,
            rules=beam_search.RULES[config.length_penalty], alpha=config.alpha)
        return DecodeResult(tokens_BxL=tokens_BxL,
                            lengths_B=lengths_up_to_eos(tokens_BxL, config.eos_id),
                            scores_B=scores_B)
    return sample(step_fn, first_logits_BxV, state, config=config, rng=rng)


@functools.lru_cache(maxsize=32)
def _jitted_decode(model: Decodable, config: DecodeConfig):
    return jax.jit(functools.partial(decode, model, config=config))


def predict_batch(model: Decodable, params: Any, batch: Mapping[str, Any], *,
                  config: DecodeConfig, rng: Array | None = None,
                  partitioner: Partitioner | None = None) -> DecodeResult:
    """Decodes one batch (see the module docstring for the contract).

    `params` are used where they lie (e.g. sharded by the run's layout). With a
    `partitioner`, the model is traced under its mesh and logical rules, and numpy
    features (the whole global batch, single process) are placed on its batch
    sharding, so B must divide by its data shards; jax.Arrays are used as they are.
    Compiled once per (model, config, shapes).
    """
    rng = jax.random.key(0) if rng is None else rng
    fn = _jitted_decode(model, config)
    if partitioner is None:
        return fn(params, dict(batch), rng=rng)
    placed = partitioning.global_batch(batch, partitioner, rows="all")
    return partitioning.MeshJitted(fn, partitioner=partitioner)(params, placed, rng=rng)
