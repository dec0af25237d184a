"""Analytic model FLOPs: the matmuls a Transformer must do, counted term by term.

MFU ("model FLOPs utilisation") divides these by the step time and the chip's peak.
It counts the FLOPs the model needs, not the ones the program does: rematerialised
forward passes, padding and masked-out attention blocks a kernel computes anyway
are not credited, so MFU compares frameworks and settings on equal terms. The
model configs (`T5Config`, `DecoderConfig`) compose these terms; nothing else
keeps a FLOP formula.

Conventions (MaxText's current ones, so numbers compare with its reports):
- A multiply-add is 2 FLOPs; a [m, k] x [k, n] matmul is 2*m*k*n.
- Training costs 3x the forward pass: the backward pass computes gradients
  with respect to both the activations and the weights (2x). A frozen base (LoRA,
  prompt tuning) gets no weight gradients, so its weight matmuls cost 2x; attention's
  QK^T and AV, whose operands are both activations, still cost 3x. The adapters' own
  matmuls are left out (LoRA rank 8 beside 512-wide projections: ~3% of them).
- Only matmuls count: projections, MLP, attention scores (QK^T) and weighted values
  (AV), and the output logits. Norms, softmax, activations, rotary embeddings and
  embedding lookups are left out (XLA's cost analysis counts them, which is why it
  reads a few percent higher on small models).
- Causal self-attention is counted at half: a query attends to the keys before
  it, on average half the row. Bidirectional self-attention and cross-attention
  are counted in full. A prefix LM counts as causal (its prefix length varies per
  example, and it is a small part of the row).
- Packed rows count attention over the whole row length, as if one sequence
  filled it: the packed mask's savings are a kernel's business, not the model's.
"""

from __future__ import annotations

TRAINING_MULTIPLIER = 3  # forward + backward (gradients of activations and weights)
FROZEN_MULTIPLIER = 2    # forward + the activations' gradient: a frozen weight gets none


def training(*, weight_matmuls: float, attention_matmuls: float,
             frozen_weights: bool = False) -> float:
    """Training FLOPs from a sequence's forward FLOPs, split into weight matmuls
    (projections, MLP, logits) and attention's (QK^T, AV)."""
    weights_multiplier = FROZEN_MULTIPLIER if frozen_weights else TRAINING_MULTIPLIER
    return float(weights_multiplier * weight_matmuls
                 + TRAINING_MULTIPLIER * attention_matmuls)

_MLP_MATRICES = {'gated-gelu': 3, 'gated-silu': 3, 'relu': 2}


def mlp(*, emb_dim: int, mlp_dim: int, activation: str) -> int:
    """Forward FLOPs per token of one MLP block (gated MLPs have three matrices)."""
    try:
        matrices = _MLP_MATRICES[activation]
    except KeyError:
        raise ValueError(f'no FLOP count for MLP activation {activation!r}; known: '
                         f'{sorted(_MLP_MATRICES)}.') from None
    return 2 * matrices * emb_dim * mlp_dim


def projections(*, emb_dim: int, head_dim: int, query_heads: int, kv_heads: int) -> int:
    """Forward FLOPs per token of the q, k, v and output projections of one attention.

    The q and output projections have `query_heads` heads, k and v `kv_heads` (fewer
    under grouped-query attention).
    """
    return 2 * emb_dim * head_dim * (2 * query_heads + 2 * kv_heads)


def attention(*, key_length: int, head_dim: int, query_heads: int, causal: bool,
              causal_at_half: bool = True) -> float:
    """Forward FLOPs per query token of QK^T and AV over `key_length` keys.

    `causal_at_half=False` counts causal attention in full: what a dense kernel
    that masks (XLA's einsum path) really computes, used to compare with XLA.
    """
    full = 2 * 2 * key_length * head_dim * query_heads
    return full / 2 if causal and causal_at_half else full


def logits(*, emb_dim: int, vocab_size: int) -> int:
    """Forward FLOPs per token of the output layer (tied or not: the same matmul)."""
    return 2 * emb_dim * vocab_size
