"""init_from a Hugging Face directory: the run starts with exactly the HF model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from t5x_like.checkpointing import checkpoints  # noqa: E402
from t5x_like.checkpointing import init_from as init_from_lib
from t5x_like.training import optimizers
from t5x_like.parallel import partitioning
from t5x_like.training import run_config
from t5x_like.training import train_loop  # noqa: E402
from t5x_like.data import synthetic  # noqa: E402
from t5x_like.hf import t5 as hf_t5  # noqa: E402
from t5x_like.models import t5  # noqa: E402

VOCAB = 96
OURS = t5.T5Config(vocab_size=VOCAB, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=48,
                   num_encoder_layers=2, num_decoder_layers=1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random T5.1.1 (gated-GELU, untied head) saved by transformers."""
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=48,
                                   num_layers=2, num_decoder_layers=1, num_heads=2,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                   dropout_rate=0.0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("hf_t5"))
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def start(model_dir, init_from, config=OURS):
    """train() for 0 steps: the state a fine-tuning run starts from, on an FSDP mesh."""
    return train_loop.train(
        run=run_config.RunConfig(
            model=t5.EncoderDecoderModel(config=config),
            train_data=synthetic.SyntheticEncDecSource(encoder_length=10, decoder_length=6,
                                                       vocab_size=VOCAB),
            partitioner=functools.partial(partitioning.Partitioner, data_parallelism=1,
                                          fsdp_parallelism=-1),
            optimizer=optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule()),
            batch_size=8),
        model_dir=model_dir, train_steps=0, init_from=init_from).final_state


def test_init_from_a_hugging_face_dir_gives_the_hf_models_parameters_and_logits(
        tmp_path, hf_dir):
    path, hf_model = hf_dir
    params = start(str(tmp_path), init_from_lib.InitFrom(directory=path)).params
    _, imported = hf_t5.import_checkpoint(path)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
                 jax.device_get(imported))
    kernel = params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert len(kernel.sharding.device_set) == 8            # placed in its FSDP shards

    rng = np.random.default_rng(0)
    enc = rng.integers(2, VOCAB, (2, 10)).astype(np.int32)
    enc[1, 6:] = 0
    dec = np.concatenate([np.zeros((2, 1), np.int32),
                          rng.integers(2, VOCAB, (2, 5)).astype(np.int32)], axis=1)
    ours = t5.EncoderDecoderModel(config=OURS).logits(
        params, {"encoder_input_tokens": jnp.asarray(enc), "decoder_input_tokens": jnp.asarray(dec)})
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.from_numpy(enc.astype(np.int64)),
                          attention_mask=torch.from_numpy((enc > 0).astype(np.int64)),
                          decoder_input_ids=torch.from_numpy(dec.astype(np.int64))).logits
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=2e-5, rtol=1e-5)


def test_a_model_config_that_does_not_match_the_hf_checkpoint_is_named(tmp_path, hf_dir):
    path, _ = hf_dir
    other = t5.T5Config(**{**OURS.__dict__, "mlp_dim": 64})
    with pytest.raises(checkpoints.CheckpointMismatchError,
                       match=r"shapes differ.*mlp/wi_0/kernel \(32, 48\)->\(32, 64\)"):
        start(str(tmp_path / "a"), init_from_lib.InitFrom(directory=path), config=other)
    deeper = t5.T5Config(**{**OURS.__dict__, "num_decoder_layers": 2})
    with pytest.raises(checkpoints.CheckpointMismatchError, match="decoder/layers_1"):
        start(str(tmp_path / "b"), init_from_lib.InitFrom(directory=path), config=deeper)
