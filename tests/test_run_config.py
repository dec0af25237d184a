"""RunConfig: the checks a run passes before any model init or compile."""

import pytest

from launch_helpers import run_train
from t5x_like.training import optimizers
from t5x_like.parallel import partitioning
from t5x_like.training import run_config
from t5x_like.data import synthetic
from t5x_like.models import t5


def _run(model_vocab, data_vocab):
    config = t5.T5Config(vocab_size=model_vocab, emb_dim=8, num_heads=1, head_dim=8,
                         mlp_dim=8, num_encoder_layers=1, num_decoder_layers=1)
    return run_config.RunConfig(
        model=t5.EncoderDecoderModel(config=config),
        optimizer=optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule()),
        train_data=synthetic.SyntheticEncDecSource(encoder_length=8, decoder_length=4,
                                                   vocab_size=data_vocab),
        partitioner=partitioning.Partitioner, batch_size=2)


def test_model_vocabulary_must_cover_the_datas():
    _run(model_vocab=128, data_vocab=128)
    with pytest.raises(ValueError, match=r"vocab_size 100 does not cover the data's "
                                         r"vocabulary of 128 ids.*T5Config.vocab_size >= 128"):
        _run(model_vocab=100, data_vocab=128)


def test_launcher_names_a_vocabulary_mismatch_in_one_line_before_init(tmp_path):
    """The bundled task's vocabulary is 8000 pieces + 100 sentinels = 8100 ids."""
    log = run_train(str(tmp_path), "--gin.t5.T5Config.vocab_size=8000", expect_rc=1)
    assert log.strip().splitlines()[-1] == (
        "error: the model's vocab_size 8000 does not cover the data's vocabulary of 8100 "
        "ids (sentinel/extra ids included) — set T5Config.vocab_size >= 8100 (T5 rounds it "
        f"up to a multiple of 128, e.g. 32100 -> 32128) (log: {tmp_path}/logs/train.log)")
    assert "Traceback" not in log and "Initialised" not in log
