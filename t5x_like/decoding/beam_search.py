"""Beam search over a preallocated KV cache, with T5X's or Hugging Face's rules.

Per example it keeps K live beams and the K best finished sequences. At each step
every live beam is extended by every token, and the 2K best extensions (by summed
log-probability) are kept, so that K live beams remain even when K of them just
produced EOS. The model's state (its KV cache) follows its beams: after each step
it is reordered by the live beams' parents.

A beam never leaves its example, so under a mesh all of this stays on each batch
shard: the state is repeated and reordered within each example (a gather on a
[B, K, ...] view, B kept sharded) and the choice of tokens runs per shard
(shard_map). No cache moves between devices; tests/test_decoding_sharded.py reads
the compiled loop to keep it so.

The two rule sets (`RULES`, chosen by `DecodeConfig.length_penalty`: 't5x' as T5X's
`beam_search`, 'hf' as transformers' `generate`) differ in four places; n is the
number of generated tokens, EOS included:

- a finished beam's score: 't5x' log p / ((5 + n) / 6) ** alpha; 'hf' log p / n ** alpha.
- which of the 2K extensions ending in EOS may finish: 't5x' all of them; 'hf' only
  those ranked among the K best.
- a beam still live at the maximum length: 't5x' returns it only if nothing finished;
  'hf' finishes it there, as if it had produced EOS.
- stopping early: 't5x' once no live beam can beat the worst finished one even at the
  maximum length (an exact bound, so the result is that of running to the end); 'hf'
  once the best live beam, scored at its current length, cannot (HF's default
  heuristic, `early_stopping=False`).

Either way the early stop needs all K finished slots filled.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from t5x_like.models import kv_cache

Array = jax.Array
# Large and finite (as both references use): keeps arithmetic on masked scores finite.
NEG = -1.0e9


@dataclasses.dataclass(frozen=True)
class BeamRules:
    """One column of the table in the module docstring."""

    penalty: Callable[[Array, float], Array]   # (n, alpha) -> divisor of log p
    only_top_k_finish: bool
    finish_at_max_length: bool
    exact_stop: bool


RULES = {
    't5x': BeamRules(penalty=lambda n, alpha: ((5.0 + n) / 6.0) ** alpha,
                     only_top_k_finish=False, finish_at_max_length=False, exact_stop=True),
    'hf': BeamRules(penalty=lambda n, alpha: jnp.asarray(n, jnp.float32) ** alpha,
                    only_top_k_finish=True, finish_at_max_length=True, exact_stop=False),
}


@flax.struct.dataclass
class _Beams:
    position: Array              # scalar: tokens generated so far
    live_tokens_BxKxL: Array
    live_scores_BxK: Array       # summed log-probabilities, best first
    finished_tokens_BxKxL: Array
    finished_scores_BxK: Array   # penalised scores, best first
    finished_BxK: Array          # which finished slots hold a sequence
    improvable_B: Array          # False once the example can stop


def _batch_sharded(x_Bx: Array) -> Array:
    """x with its first dimension (examples, or example-major rows) kept on the
    batch's mesh axes and the others left to XLA; a no-op without logical rules."""
    return nn.with_logical_constraint(
        x_Bx, ('batch',) + (PartitionSpec.UNCONSTRAINED,) * (x_Bx.ndim - 1))


def _on_batch_shards(fn: Callable) -> Callable:
    """`fn`, a per-example computation, run by each batch shard on its own examples.

    A shard_map over the batch's mesh axes (arrays split on their first dimension,
    scalars replicated); `fn` as it is without a mesh and logical rules. The beam
    bookkeeping needs it: XLA partitions `top_k` only along the sorted dimension
    and otherwise gathers its operand, all examples onto every device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return fn
    batch_axes = nn.logical_to_mesh_axes(('batch',))[0]
    specs = lambda tree: jax.tree.map(
        lambda x: PartitionSpec() if jnp.ndim(x) == 0 else PartitionSpec(batch_axes), tree)

    def sharded(*args):
        return jax.shard_map(fn, mesh=mesh, in_specs=specs(args),
                             out_specs=specs(jax.eval_shape(fn, *args)))(*args)
    return sharded


def _take(x_BxNx: Array, index_BxM: Array) -> Array:
    """x[b, index[b, m], ...] for every b, m."""
    index = index_BxM.reshape(index_BxM.shape + (1,) * (x_BxNx.ndim - 2))
    return jnp.take_along_axis(x_BxNx, index, axis=1)


def _advance(beams: _Beams, logits_BKxV: Array, *, eos_id: int, max_length: int,
             rules: BeamRules, alpha: float) -> tuple[_Beams, Array]:
    """Chooses token number `beams.position` of every beam: (beams, live parents BxK)."""
    batch, beams_k, _ = beams.live_tokens_BxKxL.shape
    vocab = logits_BKxV.shape[-1]
    t = beams.position
    log_probs = jax.nn.log_softmax(logits_BKxV.astype(jnp.float32), axis=-1)
    candidates = beams.live_scores_BxK[:, :, None] + log_probs.reshape(batch, beams_k, vocab)
    scores_Bx2K, index_Bx2K = jax.lax.top_k(candidates.reshape(batch, -1), 2 * beams_k)
    parent_Bx2K, token_Bx2K = index_Bx2K // vocab, (index_Bx2K % vocab).astype(jnp.int32)
    tokens_Bx2KxL = jax.lax.dynamic_update_slice(
        _take(beams.live_tokens_BxKxL, parent_Bx2K), token_Bx2K[:, :, None], (0, 0, t))
    ends_Bx2K = token_Bx2K == eos_id

    # Live: the K best extensions that did not just end.
    live_scores_BxK, keep_BxK = jax.lax.top_k(jnp.where(ends_Bx2K, NEG, scores_Bx2K), beams_k)
    live_tokens = _take(tokens_Bx2KxL, keep_BxK)
    parent_BxK = _take(parent_Bx2K, keep_BxK)

    # Finished: merge the extensions that may finish into the K best so far.
    may_finish = ends_Bx2K
    if rules.finish_at_max_length:
        may_finish = may_finish | (t + 1 == max_length)
    if rules.only_top_k_finish:
        may_finish = may_finish & (jnp.arange(2 * beams_k) < beams_k)[None, :]
    may_finish = may_finish & beams.improvable_B[:, None]
    penalised = jnp.where(may_finish, scores_Bx2K / rules.penalty(t + 1, alpha), NEG)
    merged_scores = jnp.concatenate([beams.finished_scores_BxK, penalised], axis=1)
    finished_scores_BxK, pick_BxK = jax.lax.top_k(merged_scores, beams_k)
    finished_tokens = _take(jnp.concatenate([beams.finished_tokens_BxKxL, tokens_Bx2KxL], 1),
                            pick_BxK)
    finished_BxK = _take(jnp.concatenate([beams.finished_BxK, may_finish], 1), pick_BxK)

    # Can any live beam still beat the worst finished one?
    best_length = max_length if rules.exact_stop else t + 1
    best_possible_B = live_scores_BxK[:, 0] / rules.penalty(best_length, alpha)
    worst_BxK = jnp.where(finished_BxK, jnp.min(finished_scores_BxK, 1, keepdims=True), NEG)
    improvable_B = beams.improvable_B & jnp.any(best_possible_B[:, None] > worst_BxK, axis=1)
    return _Beams(position=t + 1, live_tokens_BxKxL=live_tokens, live_scores_BxK=live_scores_BxK,
                  finished_tokens_BxKxL=finished_tokens, finished_scores_BxK=finished_scores_BxK,
                  finished_BxK=finished_BxK, improvable_B=improvable_B), parent_BxK


def _per_beam_fields(state: Any, fn: Callable[[Array], Array]) -> Any:
    """`fn` applied to every array of the state, except the fields declared
    `kv_cache.same_for_every_beam()` (when `state` is such a dataclass)."""
    if not dataclasses.is_dataclass(state):
        return jax.tree.map(fn, state)
    moved = {f.name: jax.tree.map(fn, getattr(state, f.name))
             for f in dataclasses.fields(state)
             if f.metadata.get('pytree_node', True)
             and not f.metadata.get(kv_cache.SAME_FOR_EVERY_BEAM)}
    return dataclasses.replace(state, **moved)


def repeat(state: Any, k: int) -> Any:
    """Every row of the state K times (row b -> rows b*K .. b*K + K - 1).

    A broadcast within each example, so each batch shard repeats its own rows.
    """
    def one(x_Bx):
        x_BxKx = jnp.broadcast_to(x_Bx[:, None], (x_Bx.shape[0], k) + x_Bx.shape[1:])
        return _batch_sharded(x_BxKx.reshape((-1,) + x_Bx.shape[1:]))
    return jax.tree.map(one, state)


def reorder(state: Any, parent_BxK: Array) -> Any:
    """Beam k of example b takes the state of beam parent[b, k] of the same example,
    except for the fields declared `kv_cache.same_for_every_beam()`.

    A gather within each example ([B*K, ...] viewed as [B, K, ...]), with the
    example axis kept sharded: indexing the flat B*K rows instead makes XLA gather
    the whole cache onto every device at every step.
    """
    batch, k = parent_BxK.shape

    def one(x_BKx):
        x_BxKx = _batch_sharded(x_BKx.reshape((batch, k) + x_BKx.shape[1:]))
        return _batch_sharded(_take(x_BxKx, parent_BxK).reshape(x_BKx.shape))
    return _per_beam_fields(state, one)


def beam_search(step_fn: Callable[[Any, Array, Array], tuple[Array, Any]],
                first_logits_BxV: Array, state: Any, *, num_beams: int,
                max_decode_length: int, eos_id: int, rules: BeamRules, alpha: float
                ) -> tuple[Array, Array]:
    """(best tokens_BxL, 0 after EOS; its score) for every example.

    `step_fn(state, tokens, position) -> (logits, state)` is the model's decode step
    over B*K rows (example-major: row b*K + k is beam k of example b); `state` comes
    from the prefill of the B examples and is repeated K times here. Returns the
    penalised score of the best finished beam, or (t5x, nothing finished) the
    summed log-probability of the best live one.
    """
    batch, k, length = first_logits_BxV.shape[0], num_beams, max_decode_length
    advance = _on_batch_shards(functools.partial(
        _advance, eos_id=eos_id, max_length=length, rules=rules, alpha=alpha))
    # Only beam 0 is real at first, so the first step does not pick K copies of a token.
    first_scores = jnp.tile(jnp.array([0.0] + [NEG] * (k - 1), jnp.float32), (batch, 1))
    beams = _Beams(
        position=jnp.int32(0), live_tokens_BxKxL=jnp.zeros((batch, k, length), jnp.int32),
        live_scores_BxK=first_scores,
        finished_tokens_BxKxL=jnp.zeros((batch, k, length), jnp.int32),
        finished_scores_BxK=jnp.full((batch, k), NEG, jnp.float32),
        finished_BxK=jnp.zeros((batch, k), bool), improvable_B=jnp.ones(batch, bool))
    beams, parent_BxK = advance(beams, repeat(first_logits_BxV, k))
    state = repeat(state, k)

    def not_done(carry):
        beams = carry[0]
        return (beams.position < length) & jnp.any(beams.improvable_B)

    def body(carry):
        beams, state, parent_BxK = carry
        state = reorder(state, parent_BxK)
        last_BK = jax.lax.dynamic_index_in_dim(beams.live_tokens_BxKxL, beams.position - 1,
                                               axis=2, keepdims=False).reshape(-1)
        logits_BKxV, state = step_fn(state, last_BK, beams.position - 1)
        beams, parent_BxK = advance(beams, logits_BKxV)
        return beams, state, parent_BxK

    beams, _, _ = jax.lax.while_loop(not_done, body, (beams, state, parent_BxK))
    any_finished_B = jnp.any(beams.finished_BxK, axis=1)
    tokens_BxL = jnp.where(any_finished_B[:, None], beams.finished_tokens_BxKxL[:, 0],
                           beams.live_tokens_BxKxL[:, 0])
    scores_B = jnp.where(any_finished_B, beams.finished_scores_BxK[:, 0],
                         beams.live_scores_BxK[:, 0])
    return tokens_BxL, scores_B
