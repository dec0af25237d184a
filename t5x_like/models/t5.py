"""T5.1.1-style encoder-decoder Transformer and its training-loss wrapper.

Architecture (published T5.1.1): shared token embedding for encoder and decoder
inputs, pre-norm RMSNorm blocks, gated-GELU MLPs, no biases, one relative
position bias table per stack, final RMSNorm per stack, untied output
projection (or tied, scaled by emb_dim**-0.5).

Module names are stable (`token_embedder`, `encoder/layers_0/attention/query`,
`decoder/logits_dense`, ...) because checkpoints and partitioning rules key on
them.

Position ids (`*_positions`) are accepted but unused: T5's relative position
bias depends only on key_index - query_index, which is the same inside a packed
segment wherever the segment starts, and attention never crosses segments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.models import attention, flop_count, layers, losses, t5_layers

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config:
    """Hyper-parameters of a T5.1.1-style encoder-decoder."""

    vocab_size: int
    emb_dim: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    num_encoder_layers: int
    num_decoder_layers: int
    dropout_rate: float = 0.0
    dtype: str = 'float32'  # Compute dtype; parameters are always float32.
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    logits_via_embedding: bool = False  # T5.1.1 unties the output layer.
    mlp_activation: str = 'gated-gelu'  # 'relu' for the original (v1.0) T5.
    attention_impl: str = 'xla'  # see models/attention.py
    # Speed/memory: scan each stack over depth (compile time flat in depth; params
    # get a leading 'layers' axis, see scan_params) and rematerialise per layer.
    scan_layers: bool = False
    remat_policy: str = 'none'  # see layers.REMAT_POLICIES

    def __post_init__(self):
        layers.check_remat_policy(self.remat_policy)

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    def training_flops_per_sequence(self, *, encoder_length: int, decoder_length: int,
                                    causal_at_half: bool = True) -> float:
        """Model FLOPs to train on one (encoder, decoder) row pair; see flop_count.

        Per encoder token and encoder layer: q/k/v/o projections, bidirectional
        self-attention over `encoder_length`, the MLP. Per decoder token and decoder
        layer: self-attention projections and causal self-attention over
        `decoder_length`, cross-attention q and output projections and full attention
        over `encoder_length`, the MLP; plus the logits once per decoder token. The
        cross-attention k/v projections read the encoder's output, so they are
        counted per encoder token, once per decoder layer.
        """
        e, h, d = self.emb_dim, self.num_heads, self.head_dim
        mlp = flop_count.mlp(emb_dim=e, mlp_dim=self.mlp_dim, activation=self.mlp_activation)
        qkvo = flop_count.projections(emb_dim=e, head_dim=d, query_heads=h, kv_heads=h)
        cross_q_o = flop_count.projections(emb_dim=e, head_dim=d, query_heads=h, kv_heads=0)
        cross_k_v = qkvo - cross_q_o
        encoder_token = self.num_encoder_layers * (
            qkvo + mlp + flop_count.attention(key_length=encoder_length, head_dim=d,
                                              query_heads=h, causal=False))
        decoder_token = self.num_decoder_layers * (
            qkvo + cross_q_o + mlp
            + flop_count.attention(key_length=decoder_length, head_dim=d, query_heads=h,
                                   causal=True, causal_at_half=causal_at_half)
            + flop_count.attention(key_length=encoder_length, head_dim=d, query_heads=h,
                                   causal=False)
        ) + flop_count.logits(emb_dim=e, vocab_size=self.vocab_size)
        forward = (encoder_length * (encoder_token + self.num_decoder_layers * cross_k_v)
                   + decoder_length * decoder_token)
        return float(flop_count.TRAINING_MULTIPLIER * forward)


def _segments_or_nonpad(segment_ids_BxL: Array | None, tokens_BxL: Array) -> Array:
    """Segment ids, or (unpacked batch) 1 for real tokens and 0 for padding."""
    if segment_ids_BxL is not None:
        return segment_ids_BxL
    return (tokens_BxL > 0).astype(jnp.int32)


def _stack(layer_cls: type[nn.Module], cfg: T5Config, num_layers: int,
           enable_dropout: bool, x: Array, *broadcast: Array) -> Array:
    """One T5 stack of `num_layers` layers over `x`; see `layers.apply_stack`."""
    return layers.apply_stack(
        layer_cls, x, *broadcast, num_layers=num_layers, scan_layers=cfg.scan_layers,
        remat_policy=cfg.remat_policy, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
        mlp_dim=cfg.mlp_dim, dropout_rate=cfg.dropout_rate, dtype=cfg.compute_dtype,
        mlp_activation=cfg.mlp_activation, attention_impl=cfg.attention_impl,
        enable_dropout=enable_dropout)


def _relpos_bias(cfg: T5Config, length: int, *, bidirectional: bool) -> Array:
    """The stack's shared relative position bias [1, H, L, L] (module `relpos_bias`)."""
    return t5_layers.RelativePositionBiases(
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance,
        num_heads=cfg.num_heads, bidirectional=bidirectional, name='relpos_bias',
    )(length, length)


def _embed(embedding: nn.Module, tokens_BxL: Array, dtype: Any) -> Array:
    x_BxLxD = embedding(tokens_BxL).astype(dtype)
    return nn.with_logical_constraint(x_BxLxD, layers.BLE)


def scan_params(params: Mapping[str, Any], cfg: T5Config) -> dict[str, Any]:
    """Unscanned T5 parameters -> the layout of `scan_layers=True` (both stacks)."""
    return {**params,
            'encoder': layers.scan_params(params['encoder'], cfg.num_encoder_layers),
            'decoder': layers.scan_params(params['decoder'], cfg.num_decoder_layers)}


def unscan_params(params: Mapping[str, Any], cfg: T5Config) -> dict[str, Any]:
    """The exact inverse of `scan_params`."""
    return {**params,
            'encoder': layers.unscan_params(params['encoder'], cfg.num_encoder_layers),
            'decoder': layers.unscan_params(params['decoder'], cfg.num_decoder_layers)}


class Encoder(nn.Module):
    """Embeds tokens and runs the bidirectional encoder stack."""

    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, tokens_BxL: Array, *, segment_ids_BxL: Array, enable_dropout: bool) -> Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        length = tokens_BxL.shape[1]
        drop = nn.Dropout(cfg.dropout_rate)

        mask_Bx1xLxL = attention.dense_mask(q_len=length, k_len=length, causal=False,
                                            q_segment_ids=segment_ids_BxL,
                                            kv_segment_ids=segment_ids_BxL)
        bias_1xHxLxL = _relpos_bias(cfg, length, bidirectional=True)
        x_BxLxD = drop(_embed(self.shared_embedding, tokens_BxL, dtype),
                       deterministic=not enable_dropout)
        x_BxLxD = _stack(t5_layers.EncoderLayer, cfg, cfg.num_encoder_layers, enable_dropout,
                         x_BxLxD, bias_1xHxLxL, mask_Bx1xLxL)
        x_BxLxD = layers.RMSNorm(dtype=dtype, name='encoder_norm')(x_BxLxD)
        x_BxLxD = drop(x_BxLxD, deterministic=not enable_dropout)
        return nn.with_logical_constraint(x_BxLxD, layers.BLE)


class Decoder(nn.Module):
    """Causal decoder stack with cross-attention, ending in float32 logits."""

    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(
        self,
        encoded_BxExD: Array,
        tokens_BxL: Array,
        *,
        encoder_segment_ids_BxE: Array,
        decoder_segment_ids_BxL: Array | None,
        enable_dropout: bool,
    ) -> Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        length = tokens_BxL.shape[1]
        drop = nn.Dropout(cfg.dropout_rate)

        # Unpacked (no decoder segment ids): padding sits at the end, so causality
        # alone keeps real tokens off it (the first input token is id 0 = BOS, so
        # tokens can't mark padding), and only padded encoder keys are masked.
        self_mask = attention.dense_mask(q_len=length, k_len=length, causal=True,
                                         q_segment_ids=decoder_segment_ids_BxL,
                                         kv_segment_ids=decoder_segment_ids_BxL)
        cross_mask = attention.dense_mask(q_len=length, k_len=encoded_BxExD.shape[1],
                                          causal=False, q_segment_ids=decoder_segment_ids_BxL,
                                          kv_segment_ids=encoder_segment_ids_BxE)

        bias_1xHxLxL = _relpos_bias(cfg, length, bidirectional=False)
        y_BxLxD = drop(_embed(self.shared_embedding, tokens_BxL, dtype),
                       deterministic=not enable_dropout)
        y_BxLxD = _stack(t5_layers.DecoderLayer, cfg, cfg.num_decoder_layers, enable_dropout,
                         y_BxLxD, encoded_BxExD, bias_1xHxLxL, self_mask, cross_mask)
        y_BxLxD = layers.RMSNorm(dtype=dtype, name='decoder_norm')(y_BxLxD)
        y_BxLxD = drop(y_BxLxD, deterministic=not enable_dropout)

        if cfg.logits_via_embedding:
            logits_BxLxV = self.shared_embedding.attend(y_BxLxD) * (cfg.emb_dim**-0.5)
        else:
            logits_BxLxV = layers.DenseGeneral(
                features=cfg.vocab_size,
                kernel_axes=('embed', 'vocab'),
                kernel_init=layers.truncated_normal_init(cfg.emb_dim**-0.5),
                dtype=dtype,
                out_dtype=jnp.float32,
                name='logits_dense',
            )(y_BxLxD)
        return nn.with_logical_constraint(logits_BxLxV.astype(jnp.float32), layers.BLV)


class Transformer(nn.Module):
    """Encoder-decoder with a shared input embedding; see module docstring."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.token_embedder = layers.Embed(
            num_embeddings=cfg.vocab_size, features=cfg.emb_dim, dtype=cfg.compute_dtype
        )
        self.encoder = Encoder(config=cfg, shared_embedding=self.token_embedder)
        self.decoder = Decoder(config=cfg, shared_embedding=self.token_embedder)

    def encode(
        self,
        encoder_input_tokens: Array,
        *,
        encoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None,
        enable_dropout: bool = True,
    ) -> Array:
        """Encoder output [B, Le, emb_dim] in the compute dtype."""
        del encoder_positions  # Relative biases need only index differences.
        segments = _segments_or_nonpad(encoder_segment_ids, encoder_input_tokens)
        return self.encoder(encoder_input_tokens, segment_ids_BxL=segments,
                            enable_dropout=enable_dropout)

    def decode(
        self,
        encoded: Array,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        *,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
        enable_dropout: bool = True,
    ) -> Array:
        """Float32 logits [B, Ld, vocab] given the encoder output."""
        del decoder_positions
        encoder_segments = _segments_or_nonpad(encoder_segment_ids, encoder_input_tokens)
        return self.decoder(
            encoded,
            decoder_input_tokens,
            encoder_segment_ids_BxE=encoder_segments,
            decoder_segment_ids_BxL=decoder_segment_ids,
            enable_dropout=enable_dropout,
        )

    def __call__(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        *,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None,
        decoder_positions: Array | None = None,
        enable_dropout: bool = True,
    ) -> Array:
        encoded = self.encode(
            encoder_input_tokens,
            encoder_segment_ids=encoder_segment_ids,
            encoder_positions=encoder_positions,
            enable_dropout=enable_dropout,
        )
        return self.decode(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            encoder_segment_ids=encoder_segment_ids,
            decoder_segment_ids=decoder_segment_ids,
            decoder_positions=decoder_positions,
            enable_dropout=enable_dropout,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderDecoderModel:
    """What the trainer needs from a model: parameter init and a loss on a batch."""

    config: T5Config
    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    # 'tokens' | 'total_tokens' | 'sequences'; see losses.normalized_weights.
    loss_normalization: str = 'tokens'

    @property
    def module(self) -> Transformer:
        return Transformer(config=self.config)

    @property
    def vocab_size(self) -> int:
        """Token ids the model embeds and predicts; the data's must be below it."""
        return self.config.vocab_size

    def init_lengths(self, feature_lengths: Mapping[str, int]) -> dict[str, int]:
        """The `init_params` lengths for batches with these (seqio) feature lengths."""
        return {'encoder_length': feature_lengths['encoder_input_tokens'],
                'decoder_length': feature_lengths['decoder_target_tokens']}

    def training_flops_per_step(self, *, feature_lengths: Mapping[str, int],
                                batch_size: int) -> float:
        """Model FLOPs of one training step on `batch_size` rows (the MFU numerator)."""
        return batch_size * self.config.training_flops_per_sequence(
            **self.init_lengths(feature_lengths))

    def count_real_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
        """Non-padding tokens in a host batch: encoder inputs plus decoder targets."""
        return int(np.count_nonzero(batch['encoder_input_tokens'])
                   + np.count_nonzero(batch['decoder_target_tokens']))

    def init_params(self, rng: Array, *, batch_size: int, encoder_length: int,
                    decoder_length: int):
        """Boxed (nn.LogicallyPartitioned) params; cheap under jax.eval_shape.

        Under jax.eval_shape, bind the int arguments with functools.partial so they
        stay static.
        """
        enc = jnp.ones((batch_size, encoder_length), jnp.int32)
        dec = jnp.ones((batch_size, decoder_length), jnp.int32)
        variables = self.module.init({'params': rng}, enc, dec, enable_dropout=False)
        return variables['params']

    def loss_and_metrics(
        self, params, batch: Mapping[str, Array], *, dropout_rng: Array | None
    ) -> tuple[Array, dict[str, Array]]:
        """Mean loss over weighted target tokens, plus exact sums for aggregation.

        metrics: loss_sum (cross-entropy + z-loss, weighted), z_loss_sum,
        accuracy_sum (weighted count of argmax == target), weight_sum.
        Dropout is on iff `dropout_rng` is given.
        """
        rngs = {'dropout': dropout_rng} if dropout_rng is not None else {}
        logits_BxLxV = self.module.apply(
            {'params': params},
            batch['encoder_input_tokens'],
            batch['decoder_input_tokens'],
            encoder_segment_ids=batch.get('encoder_segment_ids'),
            decoder_segment_ids=batch.get('decoder_segment_ids'),
            encoder_positions=batch.get('encoder_positions'),
            decoder_positions=batch.get('decoder_positions'),
            enable_dropout=dropout_rng is not None,
            rngs=rngs,
        )
        return losses.loss_and_metric_sums(
            logits_BxLxV,
            batch['decoder_target_tokens'],
            batch['decoder_loss_weights'],
            segment_ids_BxL=batch.get('decoder_segment_ids'),
            z_loss=self.z_loss,
            label_smoothing=self.label_smoothing,
            normalization=self.loss_normalization,
        )
