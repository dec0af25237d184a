"""T5.1.1-style encoder-decoder Transformer and its training-loss wrapper.

Architecture (published T5.1.1): shared token embedding for encoder and decoder
inputs, pre-norm RMSNorm blocks, gated-GELU MLPs, no biases, one relative
position bias table per stack, final RMSNorm per stack, untied output
projection (or tied, scaled by emb_dim**-0.5).

Module names are stable (`token_embedder`, `encoder/layers_0/attention/query`,
`decoder/logits_dense`, ...) because checkpoints and partitioning rules key on
them.

Position ids (`*_positions`) are accepted but the network does not need them: T5's
relative position bias depends only on key_index - query_index, which is the same
inside a packed segment wherever the segment starts, and attention never crosses
segments. Only a soft prompt (prompt tuning) reads the encoder's, to find each
example's first tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.models import (attention, flop_count, kv_cache, layers, t5_layers,
                             trainable)

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
    # Memory: under remat_policy 'none', the backward pass recomputes each
    # attention's float32 weights from q and k instead of keeping them (one more
    # Q.K^T product a layer; see attention._xla_attention).
    recompute_attention_weights: bool = True

    def __post_init__(self):
        layers.check_remat_policy(self.remat_policy)

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    def training_flops_per_sequence(self, *, encoder_length: int, decoder_length: int,
                                    causal_at_half: bool = True,
                                    frozen_weights: bool = False) -> float:
        """Model FLOPs to train on one (encoder, decoder) row pair; see flop_count.

        Per encoder token and encoder layer: q/k/v/o projections, bidirectional
        self-attention over `encoder_length`, the MLP. Per decoder token and decoder
        layer: self-attention projections and causal self-attention over
        `decoder_length`, cross-attention q and output projections and full attention
        over `encoder_length`, the MLP; plus the logits once per decoder token. The
        cross-attention k/v projections read the encoder's output, so they are
        counted per encoder token, once per decoder layer. `frozen_weights`: the
        weights get no gradient (an adapter run).
        """
        e, h, d = self.emb_dim, self.num_heads, self.head_dim
        mlp = flop_count.mlp(emb_dim=e, mlp_dim=self.mlp_dim, activation=self.mlp_activation)
        qkvo = flop_count.projections(emb_dim=e, head_dim=d, query_heads=h, kv_heads=h)
        cross_q_o = flop_count.projections(emb_dim=e, head_dim=d, query_heads=h, kv_heads=0)
        cross_k_v = qkvo - cross_q_o
        weights = (encoder_length * (self.num_encoder_layers * (qkvo + mlp)
                                     + self.num_decoder_layers * cross_k_v)
                   + decoder_length * (self.num_decoder_layers * (qkvo + cross_q_o + mlp)
                                       + flop_count.logits(emb_dim=e,
                                                           vocab_size=self.vocab_size)))
        attention = (
            encoder_length * self.num_encoder_layers * flop_count.attention(
                key_length=encoder_length, head_dim=d, query_heads=h, causal=False)
            + decoder_length * self.num_decoder_layers * (
                flop_count.attention(key_length=decoder_length, head_dim=d, query_heads=h,
                                     causal=True, causal_at_half=causal_at_half)
                + flop_count.attention(key_length=encoder_length, head_dim=d, query_heads=h,
                                       causal=False)))
        return flop_count.training(weight_matmuls=weights, attention_matmuls=attention,
                                   frozen_weights=frozen_weights)


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
        recompute_attention_weights=layers.recomputes_attention_weights(
            requested=cfg.recompute_attention_weights, remat_policy=cfg.remat_policy),
        enable_dropout=enable_dropout)


def _relpos_bias(cfg: T5Config, q_len: int, k_len: int, *, bidirectional: bool,
                 query_offset: Array | int = 0) -> t5_layers.RelativeBias:
    """The stack's relative position bias (module `relpos_bias`), which every layer
    looks up itself."""
    return t5_layers.RelativePositionBiases(
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance,
        num_heads=cfg.num_heads, bidirectional=bidirectional, name='relpos_bias',
    )(q_len, k_len, query_offset)


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
    def __call__(self, tokens_BxL: Array, *, segment_ids_BxL: Array,
                 positions_BxL: Array | None = None, enable_dropout: bool) -> Array:
        """positions_BxL: each token's position within its example (packed batches
        carry them; unpacked rows start at 0). Only a soft prompt reads them."""
        cfg = self.config
        dtype = cfg.compute_dtype
        length = tokens_BxL.shape[1]
        drop = nn.Dropout(cfg.dropout_rate)

        mask_Bx1xLxL = attention.dense_mask(q_len=length, k_len=length, causal=False,
                                            q_segment_ids=segment_ids_BxL,
                                            kv_segment_ids=segment_ids_BxL)
        relpos = _relpos_bias(cfg, length, length, bidirectional=True)
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                             tokens_BxL.shape)
        # Padding is no example's token (packing gives it position 0).
        input_index_BxL = jnp.where(segment_ids_BxL > 0, positions_BxL, -1)
        x_BxLxD = layers.SoftPrompt(name='soft_prompt')(
            _embed(self.shared_embedding, tokens_BxL, dtype), input_index_BxL)
        x_BxLxD = drop(x_BxLxD, deterministic=not enable_dropout)
        x_BxLxD = _stack(t5_layers.EncoderLayer, cfg, cfg.num_encoder_layers, enable_dropout,
                         x_BxLxD, relpos, mask_Bx1xLxL)
        x_BxLxD = layers.RMSNorm(dtype=dtype, name='encoder_norm')(x_BxLxD)
        x_BxLxD = drop(x_BxLxD, deterministic=not enable_dropout)
        return nn.with_logical_constraint(x_BxLxD, layers.BLE)


class Decoder(nn.Module):
    """Causal decoder stack with cross-attention, ending in float32 logits.

    Decoding (`cache_write`, see kv_cache.py): the tokens are new positions at the
    write's slots, written into the self-attention cache; `encoded_BxExD` is given at
    the first call (its cross-attention keys/values are cached) and None afterwards.
    """

    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(
        self,
        encoded_BxExD: Array | None,
        tokens_BxL: Array,
        *,
        encoder_segment_ids_BxE: Array,
        decoder_segment_ids_BxL: Array | None,
        enable_dropout: bool,
        cache_write: kv_cache.CacheWrite | None = None,
    ) -> Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        length = tokens_BxL.shape[1]
        drop = nn.Dropout(cfg.dropout_rate)

        # Unpacked (no decoder segment ids): padding sits at the end, so causality
        # alone keeps real tokens off it (the first input token is id 0 = BOS, so
        # tokens can't mark padding), and only padded encoder keys are masked.
        cross_mask = attention.dense_mask(q_len=length, k_len=encoder_segment_ids_BxE.shape[1],
                                          causal=False, q_segment_ids=decoder_segment_ids_BxL,
                                          kv_segment_ids=encoder_segment_ids_BxE)
        if cache_write is None:
            self_mask = attention.dense_mask(q_len=length, k_len=length, causal=True,
                                             q_segment_ids=decoder_segment_ids_BxL,
                                             kv_segment_ids=decoder_segment_ids_BxL)
            relpos = _relpos_bias(cfg, length, length, bidirectional=False)
        else:   # queries at the write's slots, keys at every cache slot
            self_mask = None
            relpos = _relpos_bias(cfg, length, cache_write.length, bidirectional=False,
                                  query_offset=cache_write.index)
        y_BxLxD = drop(_embed(self.shared_embedding, tokens_BxL, dtype),
                       deterministic=not enable_dropout)
        y_BxLxD = _stack(t5_layers.DecoderLayer, cfg, cfg.num_decoder_layers, enable_dropout,
                         y_BxLxD, encoded_BxExD, relpos, self_mask, cross_mask,
                         cache_write)
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
        # Relative biases need only index differences; a soft prompt reads positions.
        segments = _segments_or_nonpad(encoder_segment_ids, encoder_input_tokens)
        return self.encoder(encoder_input_tokens, segment_ids_BxL=segments,
                            positions_BxL=encoder_positions, enable_dropout=enable_dropout)

    def decode(self, encoded: Array, encoder_input_tokens: Array,
               decoder_input_tokens: Array, *, encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None,
               decoder_positions: Array | None = None, enable_dropout: bool = True,
               cache_write: kv_cache.CacheWrite | None = None) -> Array:
        """Float32 logits [B, Ld, vocab] given the encoder output (see Decoder for
        decoding with `cache_write`, where `encoded` may be None)."""
        del decoder_positions
        encoder_segments = _segments_or_nonpad(encoder_segment_ids, encoder_input_tokens)
        return self.decoder(
            encoded,
            decoder_input_tokens,
            encoder_segment_ids_BxE=encoder_segments,
            decoder_segment_ids_BxL=decoder_segment_ids,
            enable_dropout=enable_dropout,
            cache_write=cache_write,
        )

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array, *,
                 encoder_segment_ids: Array | None = None,
                 decoder_segment_ids: Array | None = None,
                 encoder_positions: Array | None = None,
                 decoder_positions: Array | None = None,
                 enable_dropout: bool = True) -> Array:
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


@flax.struct.dataclass
class DecodeState:
    """The encoder-decoder's state between decoding steps (see decoding/decode.py)."""

    # Per decoder layer: the self-attention cache cached_key/value [B, (layers,) T, H, kv].
    cache: Any
    # Per decoder layer: the encoded input's cross_key/value [B, (layers,) E, H, kv].
    cross_cache: Any = kv_cache.same_for_every_beam()
    # What the cross-attention may see: 1 on real encoder tokens, 0 on padding.
    encoder_segments_BxE: Array = kv_cache.same_for_every_beam()
    cache_length: int = flax.struct.field(pytree_node=False, default=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderDecoderModel(trainable.TrainableLM):
    """What the trainer needs from a model: parameter init and a loss on a batch."""

    config: T5Config

    @property
    def module(self) -> Transformer:
        return Transformer(config=self.config)

    def init_lengths(self, feature_lengths: Mapping[str, int]) -> dict[str, int]:
        """The `init_params` lengths for batches with these (seqio) feature lengths."""
        return {'encoder_length': feature_lengths['encoder_input_tokens'],
                'decoder_length': feature_lengths['decoder_target_tokens']}

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
        with self.adapted():
            variables = self.module.init({'params': rng}, enc, dec, enable_dropout=False)
        return variables['params']

    # ------------------------------------------------------------ decoding (decoding/decode.py)

    def _module_for_decoding(self) -> Transformer:
        # Rematerialisation only matters for gradients; one query per step is
        # memory-bound, where fused attention kernels gain nothing.
        return Transformer(config=dataclasses.replace(self.config, remat_policy='none',
                                                      attention_impl='xla'))

    def _decode_at(self, variables, state: DecodeState, tokens_B: Array, slot: Array,
                   encoded: Array | None) -> tuple[Array, DecodeState]:
        mask = kv_cache.causal_mask(first_slot_B=None, index=slot, q_len=1,
                                    length=state.cache_length)
        with self.adapted():
            logits, new_vars = self._module_for_decoding().apply(
                variables, encoded, state.encoder_segments_BxE, tokens_B[:, None],
                encoder_segment_ids=state.encoder_segments_BxE, enable_dropout=False,
                cache_write=kv_cache.CacheWrite(index=slot, mask_Bx1xQxT=mask),
                method=Transformer.decode, mutable=['cache'])
        cache, cross_cache = kv_cache.split_cross_attention(new_vars['cache'])
        return logits[:, 0], state.replace(cache=cache, cross_cache=cross_cache)

    def decode_prefill(self, params, batch: Mapping[str, Array], *,
                       max_decode_length: int) -> tuple[Array, DecodeState]:
        """Encodes `encoder_input_tokens` (unpacked; 0 = padding) once and runs the
        decoder on its start token (id 0), caching the cross-attention keys/values:
        (logits_BxV of the first generated token, state)."""
        tokens_BxE = batch['encoder_input_tokens']
        with self.adapted():
            encoded = self._module_for_decoding().apply(
                {'params': params}, tokens_BxE, enable_dropout=False,
                method=Transformer.encode)
        state = DecodeState(cache={}, cross_cache={},
                            encoder_segments_BxE=_segments_or_nonpad(None, tokens_BxE),
                            cache_length=max_decode_length)
        start_B = jnp.zeros(tokens_BxE.shape[:1], jnp.int32)
        return self._decode_at({'params': params}, state, start_B, 0, encoded)

    def decode_step(self, params, state: DecodeState, tokens_B: Array, position: Array
                    ) -> tuple[Array, DecodeState]:
        """Feeds generated token number `position` (0-based; it sits at decoder slot
        position + 1, after the start token): (next logits_BxV, state)."""
        cache = kv_cache.merge(state.cache, state.cross_cache)
        return self._decode_at({'params': params, 'cache': cache}, state, tokens_B,
                               position + 1, None)

    def logits(self, params, batch: Mapping[str, Array], *, dropout_rng: Array | None = None):
        """Teacher-forced float32 logits [B, Ld, vocab] for a batch of seqio features."""
        rngs = {'dropout': dropout_rng} if dropout_rng is not None else {}
        with self.adapted(enable_dropout=dropout_rng is not None):
            return self._apply_teacher_forced(params, batch, rngs)

    def _apply_teacher_forced(self, params, batch: Mapping[str, Array], rngs) -> Array:
        return self.module.apply(
            {'params': params},
            batch['encoder_input_tokens'],
            batch['decoder_input_tokens'],
            encoder_segment_ids=batch.get('encoder_segment_ids'),
            decoder_segment_ids=batch.get('decoder_segment_ids'),
            encoder_positions=batch.get('encoder_positions'),
            decoder_positions=batch.get('decoder_positions'),
            enable_dropout=bool(rngs),
            rngs=rngs,
        )
