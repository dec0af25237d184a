"""The core must work where TensorFlow is not installed (e.g. the GPU image)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import importlib.abc, sys

class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("tensorflow", "seqio", "tensorflow_datasets", "tensorflow_text"):
            raise ImportError(f"{name} is blocked: the core must not need it")

sys.meta_path.insert(0, NoTensorFlow())
import jax
from t5x_like.checkpointing import checkpoints
from t5x_like.config import gin_config
from t5x_like.reporting import metrics
from t5x_like.training import optimizers
from t5x_like.reporting import param_table
from t5x_like.parallel import partitioning
from t5x_like.training import aot
from t5x_like.decoding import beam_search
from t5x_like.decoding import decode
from t5x_like.decoding import inference
from t5x_like.launch import launcher
from t5x_like.training import run_config
from t5x_like.training import train_loop
from t5x_like.training import trainer
from t5x_like.evaluation import checkpoint_eval
from t5x_like.evaluation import teacher_forced
from t5x_like.evaluation import predictions
from t5x_like.data import converters, host_batches, synthetic, text_metrics
from t5x_like.hf import tokenizer
from t5x_like.checkpointing import init_from
from t5x_like.models import decoder, kv_cache, layers, losses, t5, t5_layers

model = t5.EncoderDecoderModel(config=t5.T5Config(
    vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
    num_encoder_layers=1, num_decoder_layers=1))
layout = trainer.state_layout(
    model=model, optimizer=optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule()),
    partitioner=partitioning.Partitioner(),
    feature_lengths={"encoder_input_tokens": 8, "decoder_target_tokens": 4})
assert param_table.count_parameters(layout.abstract.params) > 0
source = synthetic.SyntheticEncDecSource(encoder_length=8, decoder_length=4, vocab_size=64)
batches = host_batches.HostBatches(source, global_batch_size=4, num_data_shards=2,
                                   process_index=0, process_count=1, start_step=3)
assert next(batches)["encoder_input_tokens"].shape == (4, 8)
assert batches.positions() == {0: b'{"step": 4}', 1: b'{"step": 4}'}
assert converters.model_feature_lengths({"targets": 8}, converter="lm")["decoder_positions"] == 8
import numpy as np
params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), layout.abstract.params)
result = decode.predict_batch(model, params, {"encoder_input_tokens": np.ones((2, 8), np.int32)},
                                config=decode.DecodeConfig(max_decode_length=3, num_beams=2))
assert result.tokens_BxL.shape == (2, 3)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "seqio"))
assert not leaked, leaked
print("OK")
'''


def test_core_imports_and_builds_a_model_with_tensorflow_blocked():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
