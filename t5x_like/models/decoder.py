"""LLaMA-style decoder-only Transformer (causal LM and prefix LM) and its loss.

Architecture: token embedding, N pre-norm blocks of [RMSNorm -> grouped-query
self-attention with rotary position embeddings -> residual, RMSNorm -> SwiGLU
MLP -> residual], final RMSNorm, output projection (untied, or tied to the
embedding without any scaling, as Llama 3.2 does). No biases anywhere.

Rotary embeddings use the "two halves" layout (feature i pairs with feature
i + head_dim/2), which is how Hugging Face Llama checkpoints store q/k, so
imported weights need no permutation. Positions come from `decoder_positions`
when the batch is packed (every packed sequence restarts at 0), else 0..L-1.

Prefix LM: when the batch carries `decoder_causal_attention` (seqio's
PrefixLMFeatureConverter), positions where it is 1 attend to each other
bidirectionally; everything else stays causal; nothing crosses segments.

Speed/memory switches (all in `DecoderConfig`, so all reachable from gin):
`scan_layers` (one compiled layer body, flat compile time in depth),
`remat_policy` (see `layers.REMAT_POLICIES`), `dtype` (compute; params stay float32,
softmax and loss float32) and `attention_impl` (see models/attention.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.models import attention, flop_count, kv_cache, layers, trainable

Array = jax.Array

BLGK = ('batch', 'length', 'kv_heads', 'kv')


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Hyper-parameters of a LLaMA-style decoder."""

    vocab_size: int
    emb_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    num_layers: int
    rope_theta: float = 10_000.0
    # Llama-3-style rope frequency scaling (factor 1.0 = off).
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    tie_embeddings: bool = False
    norm_epsilon: float = 1e-5
    dropout_rate: float = 0.0
    dtype: str = 'float32'  # Compute dtype; parameters are always float32.
    scan_layers: bool = False
    remat_policy: str = 'none'
    attention_impl: str = 'xla'
    # Memory: under remat_policy 'none', the backward pass recomputes each
    # attention's float32 weights from q and k instead of keeping them (one more
    # Q.K^T product a layer; see attention._xla_attention).
    recompute_attention_weights: bool = True
    # Facts of the vocabulary and context the model was trained with, unused by the
    # layers: Hugging Face import/export carries them (config.json and
    # generation_config.json), and generation ends on `eos_token_id` (one id, or
    # several as Llama-3's (128001, 128009)). Defaults: this project's vocabularies
    # (PAD 0, EOS 1, no BOS; data/vocabularies.py); the context length is unknown
    # unless imported.
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int | None = 0
    max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f'num_heads={self.num_heads} is not a multiple of '
                             f'num_kv_heads={self.num_kv_heads}.')
        if self.head_dim % 2:
            raise ValueError(f'rotary embeddings need an even head_dim, got {self.head_dim}.')
        layers.check_remat_policy(self.remat_policy)
        if self.attention_impl not in attention.IMPLEMENTATIONS:
            raise ValueError(f'attention_impl {self.attention_impl!r}; choose one of '
                             f'{attention.IMPLEMENTATIONS}.')

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    def training_flops_per_sequence(self, *, decoder_length: int,
                                    causal_at_half: bool = True,
                                    frozen_weights: bool = False) -> float:
        """Model FLOPs to train on one row of `decoder_length` tokens; see flop_count.

        Per token and layer: q/o projections over `num_heads`, k/v over
        `num_kv_heads`, causal self-attention over the row, the gated-SiLU MLP; plus
        the logits once per token. Per token this is MaxText's
        6*L*[3*E*M + 2*E*D*(Hq+Hkv) + S*Hq*D] + 6*E*V. `frozen_weights`: the
        weights get no gradient (an adapter run).
        """
        e, d = self.emb_dim, self.head_dim
        weights = (self.num_layers * (
            flop_count.projections(emb_dim=e, head_dim=d, query_heads=self.num_heads,
                                   kv_heads=self.num_kv_heads)
            + flop_count.mlp(emb_dim=e, mlp_dim=self.mlp_dim, activation='gated-silu'))
            + flop_count.logits(emb_dim=e, vocab_size=self.vocab_size))
        attention = self.num_layers * flop_count.attention(
            key_length=decoder_length, head_dim=d, query_heads=self.num_heads, causal=True,
            causal_at_half=causal_at_half)
        return flop_count.training(weight_matmuls=decoder_length * weights,
                                   attention_matmuls=decoder_length * attention,
                                   frozen_weights=frozen_weights)


def rope_inverse_frequencies(config: DecoderConfig) -> np.ndarray:
    """The rotary frequencies of `config` (see `layers.rope_inverse_frequencies`)."""
    return layers.rope_inverse_frequencies(
        head_dim=config.head_dim, theta=config.rope_theta,
        scaling_factor=config.rope_scaling_factor,
        low_freq_factor=config.rope_low_freq_factor,
        high_freq_factor=config.rope_high_freq_factor,
        original_max_position=config.rope_original_max_position)


# ----------------------------------------------------------------------------
# Blocks


class GroupedQueryAttention(nn.Module):
    """Self-attention with num_kv_heads <= num_heads key/value heads and RoPE."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x_BxLxD, cos, sin, segment_ids_BxL, prefix_BxL,
                 cache_write: kv_cache.CacheWrite | None, *, deterministic: bool):
        cfg = self.config
        dtype = cfg.compute_dtype
        d = x_BxLxD.shape[-1]
        proj = functools.partial(layers.DenseGeneral, dtype=dtype,
                                 kernel_init=layers.truncated_normal_init(d**-0.5))
        q = proj(features=(cfg.num_heads, cfg.head_dim), kernel_axes=('embed', 'heads', 'kv'),
                 name='query')(x_BxLxD)
        kv_proj = functools.partial(proj, features=(cfg.num_kv_heads, cfg.head_dim),
                                    kernel_axes=('embed', 'kv_heads', 'kv'))
        k = kv_proj(name='key')(x_BxLxD)
        v = kv_proj(name='value')(x_BxLxD)
        q = nn.with_logical_constraint(layers.apply_rope(q, cos, sin), layers.BLHK)
        k = nn.with_logical_constraint(layers.apply_rope(k, cos, sin), BLGK)
        v = nn.with_logical_constraint(v, BLGK)
        mask = None
        if cache_write is not None:   # decoding: attend to every cached position
            k, v = kv_cache.write(self, k, v, cache_write, logical_axes=BLGK)
            mask = cache_write.mask_Bx1xQxT
        ctx = attention.attend(
            q, k, v,
            implementation=cfg.attention_impl,
            scale=cfg.head_dim**-0.5,
            causal=cache_write is None,
            segment_ids_BxL=segment_ids_BxL,
            prefix_BxL=prefix_BxL,
            mask_Bx1xQxK=mask,
            dtype=dtype,
            recompute_weights=layers.recomputes_attention_weights(
                requested=cfg.recompute_attention_weights, remat_policy=cfg.remat_policy),
        )
        ctx = nn.with_logical_constraint(ctx, layers.BLHK)
        out = layers.DenseGeneral(
            features=d, axis=(-2, -1), kernel_axes=('heads', 'kv', 'embed'),
            kernel_init=layers.truncated_normal_init((cfg.num_heads * cfg.head_dim) ** -0.5),
            dtype=dtype, name='out',
        )(ctx)
        return nn.with_logical_constraint(out, layers.BLE)


class DecoderBlock(nn.Module):
    """One pre-norm block; `(x, *broadcast) -> (x, None)` so nn.scan can stack it."""

    config: DecoderConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxLxD, cos, sin, segment_ids_BxL, prefix_BxL, cache_write=None):
        cfg = self.config
        dtype = cfg.compute_dtype
        norm = functools.partial(layers.RMSNorm, dtype=dtype, epsilon=cfg.norm_epsilon)
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        h = norm(name='pre_attention_norm')(x_BxLxD)
        h = GroupedQueryAttention(config=cfg, name='attention')(
            h, cos, sin, segment_ids_BxL, prefix_BxL, cache_write,
            deterministic=self.deterministic)
        x_BxLxD = x_BxLxD + drop(h)
        h = norm(name='pre_mlp_norm')(x_BxLxD)
        # LLaMA drops out on the residual branches only, not inside the MLP.
        h = layers.MlpBlock(emb_dim=cfg.emb_dim, mlp_dim=cfg.mlp_dim, dropout_rate=0.0,
                            dtype=dtype, activation='gated-silu', name='mlp',
                            )(h, enable_dropout=False)
        x_BxLxD = x_BxLxD + drop(h)
        return nn.with_logical_constraint(x_BxLxD, layers.BLE), None


class Decoder(nn.Module):
    """Decoder-only LM: tokens -> float32 logits [B, L, vocab].

    With `cache_write` (decoding, see kv_cache.py) the tokens are new positions
    written into the 'cache' collection, attention follows the write's mask (segment
    ids and prefix are not used), and only the last position's logits [B, 1, vocab]
    are computed.
    """

    config: DecoderConfig

    @nn.compact
    def __call__(
        self,
        decoder_input_tokens: Array,
        *,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
        decoder_causal_attention: Array | None = None,
        enable_dropout: bool = True,
        cache_write: kv_cache.CacheWrite | None = None,
    ) -> Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        batch, length = decoder_input_tokens.shape
        # Tied tables are read as the output layer too: start them at unit-variance logits.
        embed_std = cfg.emb_dim**-0.5 if cfg.tie_embeddings else 1.0
        embedder = layers.Embed(num_embeddings=cfg.vocab_size, features=cfg.emb_dim, dtype=dtype,
                                embedding_init=nn.initializers.normal(stddev=embed_std),
                                name='token_embedder')
        if decoder_positions is None:
            decoder_positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                                 (batch, length))
        cos, sin = layers.rope_tables(decoder_positions, rope_inverse_frequencies(cfg))

        x = embedder(decoder_input_tokens).astype(dtype)
        # Input position p holds target token p - 1 (position 0: the start token).
        x = layers.SoftPrompt(name='soft_prompt')(x, decoder_positions - 1)
        x = nn.with_logical_constraint(x, layers.BLE)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not enable_dropout)

        x = layers.apply_stack(
            DecoderBlock, x, cos, sin, decoder_segment_ids, decoder_causal_attention,
            cache_write, num_layers=cfg.num_layers, scan_layers=cfg.scan_layers,
            remat_policy=cfg.remat_policy, config=cfg, deterministic=not enable_dropout)
        if cache_write is not None:
            x = x[:, -1:]      # the next token's logits are all decoding needs

        x = layers.RMSNorm(dtype=dtype, epsilon=cfg.norm_epsilon, name='decoder_norm')(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not enable_dropout)
        if cfg.tie_embeddings:
            logits = embedder.attend(x)
        else:
            logits = layers.DenseGeneral(
                features=cfg.vocab_size, kernel_axes=('embed', 'vocab'),
                kernel_init=layers.truncated_normal_init(cfg.emb_dim**-0.5),
                dtype=dtype, out_dtype=jnp.float32,
                name='logits_dense')(x)
        return nn.with_logical_constraint(logits.astype(jnp.float32), layers.BLV)


# ----------------------------------------------------------------------------
# Decoding with a KV cache


@flax.struct.dataclass
class DecodeState:
    """The decoder-only model's state between decoding steps (see decoding/decode.py).

    Prompts are left-aligned: row b's prompt fills slots first_slot_B[b] ..
    prompt_width - 1, and every row writes generated token t at slot prompt_width + t.
    """

    cache: Any               # per layer: cached_key/value [B, (layers,) T, kv_heads, kv]
    # Left padding of each row = its first real slot.
    first_slot_B: Array = kv_cache.same_for_every_beam()
    prompt_width: int = flax.struct.field(pytree_node=False, default=0)
    cache_length: int = flax.struct.field(pytree_node=False, default=0)


def left_aligned_prompts(batch: Mapping[str, Array]) -> tuple[Array, Array, bool]:
    """(tokens_BxP right-aligned at slot P - 1, first_slot_B, bidirectional).

    The batch holds each prompt at the start of `decoder_input_tokens` (seqio's
    layout) and says how long it is with either `decoder_causal_attention` (a
    prefix-LM batch: 1 on the prompt, which then attends to itself bidirectionally,
    as in training) or `decoder_prompt_lengths` [B] (a causal prompt).
    """
    tokens_BxP = batch['decoder_input_tokens']
    if 'decoder_causal_attention' in batch:
        lengths_B = jnp.sum(batch['decoder_causal_attention'] > 0, axis=1)
        bidirectional = True
    elif 'decoder_prompt_lengths' in batch:
        lengths_B = batch['decoder_prompt_lengths']
        bidirectional = False
    else:
        raise ValueError('A decoder-only batch to decode needs decoder_causal_attention '
                         '(prefix LM) or decoder_prompt_lengths (causal LM) to mark the '
                         'prompt in decoder_input_tokens.')
    width = tokens_BxP.shape[1]
    first_slot_B = (width - lengths_B).astype(jnp.int32)
    source_BxP = jnp.arange(width, dtype=jnp.int32)[None, :] - first_slot_B[:, None]
    shifted = jnp.take_along_axis(tokens_BxP, source_BxP % width, axis=1)
    return jnp.where(source_BxP >= 0, shifted, 0), first_slot_B, bidirectional


# ----------------------------------------------------------------------------
# Training wrapper


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderOnlyModel(trainable.TrainableLM):
    """Trainer-facing decoder-only LM (causal, or prefix LM when the batch says so).

    `loss_normalization` ('tokens', 'total_tokens', 'sequences') chooses what the
    summed loss is divided by; see `losses.normalized_weights`.
    """

    config: DecoderConfig

    @property
    def module(self) -> Decoder:
        return Decoder(config=self.config)

    def init_lengths(self, feature_lengths: Mapping[str, int]) -> dict[str, int]:
        """The `init_params` lengths for batches with these (seqio) feature lengths."""
        return {'decoder_length': feature_lengths['decoder_target_tokens']}

    def count_real_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
        """Non-padding target tokens in a host batch (prefix LM: the prefix too)."""
        return int(np.count_nonzero(batch['decoder_target_tokens']))

    def init_params(self, rng: Array, *, batch_size: int, decoder_length: int):
        """Boxed (nn.LogicallyPartitioned) params; cheap under jax.eval_shape."""
        tokens = jnp.ones((batch_size, decoder_length), jnp.int32)
        with self.adapted():
            return self.module.init({'params': rng}, tokens, enable_dropout=False)['params']

    def logits(self, params, batch: Mapping[str, Array], *, dropout_rng: Array | None = None):
        rngs = {'dropout': dropout_rng} if dropout_rng is not None else {}
        with self.adapted(enable_dropout=dropout_rng is not None):
            return self.module.apply(
                {'params': params},
                batch['decoder_input_tokens'],
                decoder_segment_ids=batch.get('decoder_segment_ids'),
                decoder_positions=batch.get('decoder_positions'),
                decoder_causal_attention=batch.get('decoder_causal_attention'),
                enable_dropout=dropout_rng is not None,
                rngs=rngs,
            )

    # ------------------------------------------------------------ decoding (decoding/decode.py)

    def _decoder_for_decoding(self) -> Decoder:
        # Rematerialisation only matters for gradients; one query per step is
        # memory-bound, where fused attention kernels gain nothing.
        return Decoder(config=dataclasses.replace(self.config, remat_policy='none',
                                                  attention_impl='xla'))

    def decode_prefill(self, params, batch: Mapping[str, Array], *,
                       max_decode_length: int) -> tuple[Array, DecodeState]:
        """One forward over the prompts, filling the cache: (logits_BxV of the first
        generated token, state). See `left_aligned_prompts` for the batch."""
        tokens_BxP, first_slot_B, bidirectional = left_aligned_prompts(batch)
        width = tokens_BxP.shape[1]
        length = width + max_decode_length - 1
        mask = kv_cache.causal_mask(first_slot_B=first_slot_B, index=0, q_len=width,
                                    length=length)
        if bidirectional:   # prefix LM: the prompt sees all of itself
            mask = mask | (kv_cache.causal_mask(first_slot_B=first_slot_B, index=width - 1,
                                                q_len=1, length=length))
        slots_P = jnp.arange(width, dtype=jnp.int32)
        with self.adapted():
            logits, variables = self._decoder_for_decoding().apply(
                {'params': params}, tokens_BxP,
                decoder_positions=slots_P[None, :] - first_slot_B[:, None],
                enable_dropout=False,
                cache_write=kv_cache.CacheWrite(index=0, mask_Bx1xQxT=mask),
                mutable=['cache'])
        state = DecodeState(cache=variables['cache'], first_slot_B=first_slot_B,
                            prompt_width=width, cache_length=length)
        return logits[:, 0], state

    def decode_step(self, params, state: DecodeState, tokens_B: Array, position: Array
                    ) -> tuple[Array, DecodeState]:
        """Feeds generated token number `position` (0-based); returns the next
        token's logits_BxV and the state with the token cached."""
        slot = state.prompt_width + position
        mask = kv_cache.causal_mask(first_slot_B=state.first_slot_B, index=slot, q_len=1,
                                    length=state.cache_length)
        with self.adapted():
            logits, variables = self._decoder_for_decoding().apply(
                {'params': params, 'cache': state.cache}, tokens_B[:, None],
                decoder_positions=(slot - state.first_slot_B)[:, None], enable_dropout=False,
                cache_write=kv_cache.CacheWrite(index=slot, mask_Bx1xQxT=mask),
                mutable=['cache'])
        return logits[:, 0], state.replace(cache=variables['cache'])
