"""Synthetic batches with the encoder-decoder feature layout, no TensorFlow needed.

For benchmarks on machines without the data stack (the GPU image) and for tests
of the train loop. Each batch is a pure function of (seed, shard, step), so the
source is trivially resumable and host-sharded like the real one. Tokens are
random, so the loss cannot fall far: use it for speed and plumbing, not learning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticEncDecSource:
    encoder_length: int
    decoder_length: int
    vocab_size: int
    seed: int = 0

    def model_feature_lengths(self) -> dict[str, int]:
        return {"encoder_input_tokens": self.encoder_length,
                "decoder_input_tokens": self.decoder_length,
                "decoder_target_tokens": self.decoder_length,
                "decoder_loss_weights": self.decoder_length}

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

    def iterator(self, *, per_host_batch_size: int, shard_index: int, num_shards: int,
                 start_step: int) -> Iterator[dict[str, np.ndarray]]:
        del num_shards  # every shard draws from its own stream
        step = start_step
        while True:
            yield self.batch(step=step, shard_index=shard_index, batch_size=per_host_batch_size)
            step += 1
