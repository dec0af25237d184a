"""Synthetic batches with the encoder-decoder feature layout, no TensorFlow needed.

For benchmarks on machines without the data stack (the GPU image) and for tests
of the train loop. Each batch is a pure function of (seed, shard, step), so the
source is trivially resumable (its position is the step) and host-sharded like
the real one. Tokens are random, so the loss cannot fall far: use it for speed and
plumbing, not learning. Feature names and lengths are the real converters' (enc_dec
unpacked, lm packed or not), from converters.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable

import numpy as np

from t5x_like.data import converters


class StepIterator:
    """Batches that are a pure function of the step; the position is the step."""

    def __init__(self, batch: Callable[..., dict[str, np.ndarray]], *, step: int):
        """`batch(step=...)` makes the batch of a step."""
        self._batch = batch
        self.step = step

    def __iter__(self) -> StepIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._batch(step=self.step)
        self.step += 1
        return batch

    def position(self) -> bytes:
        return json.dumps({"step": self.step}).encode()


class _StepSource:
    """`iterator` for sources whose `batch(step=, shard_index=, batch_size=)` is pure."""

    def check(self, *, shard_index: int, num_shards: int) -> None:
        """Every shard of a synthetic source yields batches: nothing can be wrong."""

    def stream_identity(self) -> dict:
        """The source's kind and settings: they define its batches."""
        return {"source": type(self).__name__, **dataclasses.asdict(self)}

    def vocabulary_size(self) -> int:
        return self.vocab_size

    def iterator(self, *, per_host_batch_size: int, shard_index: int, num_shards: int,
                 start_step: int, position: bytes | None = None) -> StepIterator:
        del num_shards  # every shard draws from its own stream
        if position is not None and json.loads(position)["step"] != start_step:
            raise ValueError(f"position {position!r} was not saved at step {start_step}")
        return StepIterator(functools.partial(self.batch, shard_index=shard_index,
                                              batch_size=per_host_batch_size),
                            step=start_step)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticEncDecSource(_StepSource):
    encoder_length: int
    decoder_length: int
    vocab_size: int
    seed: int = 0

    def model_feature_lengths(self) -> dict[str, int]:
        return converters.model_feature_lengths(
            {"inputs": self.encoder_length, "targets": self.decoder_length},
            converter="enc_dec", pack=False)

    def batch(self, *, step: int, shard_index: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, shard_index, step))
        inputs = rng.integers(3, self.vocab_size, (batch_size, self.encoder_length), np.int32)
        targets = rng.integers(3, self.vocab_size, (batch_size, self.decoder_length), np.int32)
        targets[:, -1] = 1                                   # EOS
        decoder_inputs = np.concatenate(
            [np.zeros((batch_size, 1), np.int32), targets[:, :-1]], axis=1)
        return {"encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs,
                "decoder_target_tokens": targets,
                "decoder_loss_weights": np.ones_like(targets)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticDecoderSource(_StepSource):
    """Decoder-only (causal LM) batches, packed as `pack_segments` sequences per row.

    Same contract as SyntheticEncDecSource; features follow seqio's LM converter
    (decoder_input_tokens = targets shifted right within each packed sequence).
    """
    decoder_length: int
    vocab_size: int
    pack_segments: int = 1
    seed: int = 0

    def model_feature_lengths(self) -> dict[str, int]:
        return converters.model_feature_lengths(
            {"targets": self.decoder_length}, converter="lm", pack=self.pack_segments > 1)

    def batch(self, *, step: int, shard_index: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, shard_index, step, 1))
        length = self.decoder_length
        targets = rng.integers(3, self.vocab_size, (batch_size, length), np.int32)
        bounds = np.linspace(0, length, self.pack_segments + 1).astype(int)
        segments = np.zeros((batch_size, length), np.int32)
        positions = np.zeros((batch_size, length), np.int32)
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            segments[:, lo:hi] = s + 1
            positions[:, lo:hi] = np.arange(hi - lo)
            targets[:, hi - 1] = 1                            # EOS ends each sequence
        inputs = np.where(positions == 0, 0, np.roll(targets, 1, axis=1)).astype(np.int32)
        batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
                 "decoder_loss_weights": np.ones_like(targets)}
        if self.pack_segments > 1:
            batch["decoder_segment_ids"], batch["decoder_positions"] = segments, positions
        return batch
