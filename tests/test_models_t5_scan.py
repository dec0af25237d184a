"""T5 scanned over depth and rematerialised computes exactly the plain model."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5x_like.models import t5

CONFIG = t5.T5Config(vocab_size=128, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                     num_encoder_layers=3, num_decoder_layers=2)


def batch():
    rng = np.random.default_rng(0)
    tokens = lambda n: rng.integers(3, 128, (2, n)).astype(np.int32)
    return {"encoder_input_tokens": tokens(12), "decoder_input_tokens": tokens(6),
            "decoder_target_tokens": tokens(6), "decoder_loss_weights": np.ones((2, 6), np.int32)}


def loss_and_grads(model, params):
    """The mean token loss (the model returns the sum; the tolerances are for the
    mean) and its gradients."""
    def mean_loss(p):
        loss_sum, sums = model.loss_and_metrics(p, batch(), dropout_rng=None)
        return loss_sum / sums["weight_sum"]
    return jax.value_and_grad(mean_loss)(params)


@pytest.fixture(scope="module")
def plain():
    model = t5.EncoderDecoderModel(config=CONFIG)
    params = nn.unbox(model.init_params(jax.random.key(0), batch_size=1, encoder_length=12,
                                        decoder_length=6))
    return params, loss_and_grads(model, params)


@pytest.mark.parametrize("scan,remat", [(True, "none"), (True, "full"), (False, "save_dots")])
def test_scanned_and_rematerialised_t5_equal_the_plain_model(plain, scan, remat):
    params, (ref_loss, ref_grads) = plain
    model = t5.EncoderDecoderModel(
        config=dataclasses.replace(CONFIG, scan_layers=scan, remat_policy=remat))
    ours = t5.scan_params(params, CONFIG) if scan else params
    boxed = jax.eval_shape(lambda r: model.init_params(r, batch_size=1, encoder_length=12,
                                                       decoder_length=6), jax.random.key(0))
    assert jax.tree.structure(nn.unbox(boxed)) == jax.tree.structure(ours)
    if scan:   # the depth axis is a named logical axis, so partitioning rules see it
        spec = nn.get_partition_spec(boxed)["encoder"]["layers"]["mlp"]["wo"]["kernel"]
        assert tuple(spec) == ("layers", "mlp", "embed")
    loss, grads = loss_and_grads(model, ours)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    if scan:
        grads = t5.unscan_params(grads, CONFIG)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)
    assert t5.unscan_params(t5.scan_params(params, CONFIG), CONFIG).keys() == params.keys()


def test_unknown_remat_policy_is_named():
    with pytest.raises(ValueError, match="'sometimes'"):
        dataclasses.replace(CONFIG, remat_policy="sometimes")
