"""The `'xla'` attention recomputes its float32 weights in the backward pass
(`attend(recompute_weights=True)`, the models' default under remat_policy 'none'):
what the backward pass keeps, and that the gradients are those of keeping them.

The recomputation runs the forward's ops on the same inputs, so the gradients are
expected bitwise equal, and are asserted so: one attention call in float32 and
bfloat16, for T5's shape of call (relative-position bias, a dense mask) and the
decoder family's (grouped-query heads, a scale, causal packed segments), and whole
models of both families.
"""

import collections
import contextlib
import dataclasses
import io
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.models import attention, decoder, t5

B, Q, H, D = 2, 24, 4, 8


def _call(kind: str, dtype, recompute: bool):
    """(q, k, v, bias) -> attention output, as T5 or the decoder family calls it."""
    segments = jnp.asarray(np.repeat([[1] * 14 + [2] * 8 + [0] * 2], B, axis=0))

    def run(q, k, v, bias):
        if kind == "t5":
            mask = attention.dense_mask(q_len=Q, k_len=Q, causal=False,
                                        q_segment_ids=segments, kv_segment_ids=segments)
            return attention.attend(q, k, v, implementation="xla", scale=1.0, causal=False,
                                    mask_Bx1xQxK=mask, bias_1xHxQxK=bias, dtype=dtype,
                                    recompute_weights=recompute)
        return attention.attend(q, k, v, implementation="xla", scale=D**-0.5, causal=True,
                                segment_ids_BxL=segments, dtype=dtype,
                                recompute_weights=recompute)
    return run


def _inputs(kind: str, dtype):
    keys = jax.random.split(jax.random.key(3), 5)
    kv_heads = H if kind == "t5" else H // 2
    q = jax.random.normal(keys[0], (B, Q, H, D)).astype(dtype)
    k = jax.random.normal(keys[1], (B, Q, kv_heads, D)).astype(dtype)
    v = jax.random.normal(keys[2], (B, Q, kv_heads, D)).astype(dtype)
    bias = jax.random.normal(keys[3], (1, H, Q, Q))
    cotangent = jax.random.normal(keys[4], (B, Q, H, D))
    return (q, k, v, bias), cotangent


def _saved_shapes(fn, *args) -> collections.Counter:
    """The residuals JAX keeps for the backward pass, as (dtype, shape) strings."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    return collections.Counter(re.match(r"\S+", line).group(0)
                               for line in printed.getvalue().splitlines() if line.strip())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["t5", "decoder"])
def test_recomputed_weights_give_the_gradients_of_kept_weights(kind, dtype):
    args, cotangent = _inputs(kind, dtype)
    loss = lambda recompute: lambda *a: jnp.sum(
        _call(kind, dtype, recompute)(*a).astype(jnp.float32) * cotangent)
    argnums = (0, 1, 2, 3) if kind == "t5" else (0, 1, 2)
    ours = jax.jit(jax.value_and_grad(loss(True), argnums=argnums))(*args)
    kept = jax.jit(jax.value_and_grad(loss(False), argnums=argnums))(*args)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(a, b)

    weights = f"f32[{B},{H},{Q},{Q}]"        # the softmax's float32 output, per call
    saved_kept = _saved_shapes(loss(False), *args)
    saved_ours = _saved_shapes(loss(True), *args)
    assert saved_kept[weights] >= 1, saved_kept
    assert not any(f"{B},{H},{Q},{Q}]" in shape or f"{B},{H // 2},2,{Q},{Q}]" in shape
                   for shape in saved_ours), saved_ours


T5_TINY = t5.T5Config(vocab_size=128, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                      num_encoder_layers=3, num_decoder_layers=2, dtype="bfloat16")
DECODER_TINY = decoder.DecoderConfig(vocab_size=64, emb_dim=32, num_heads=4, num_kv_heads=2,
                                     head_dim=8, mlp_dim=48, num_layers=3, dtype="bfloat16")
LENGTH = 128


def _model_loss(family: str, config):
    rng = np.random.default_rng(0)
    tokens = lambda n: rng.integers(3, config.vocab_size, (2, n)).astype(np.int32)
    if family == "t5":
        model = t5.EncoderDecoderModel(config=config)
        params = model.init_params(jax.random.key(0), batch_size=1, encoder_length=LENGTH,
                                   decoder_length=8)
        batch = {"encoder_input_tokens": tokens(LENGTH), "decoder_input_tokens": tokens(8),
                 "decoder_target_tokens": tokens(8)}
    else:
        model = decoder.DecoderOnlyModel(config=config)
        params = model.init_params(jax.random.key(0), batch_size=1, decoder_length=LENGTH)
        batch = {"decoder_input_tokens": tokens(LENGTH),
                 "decoder_target_tokens": tokens(LENGTH)}
    batch["decoder_loss_weights"] = np.ones_like(batch["decoder_target_tokens"])
    return (lambda p: model.loss_and_metrics(p, batch, dropout_rng=None)[0]), nn.unbox(params)


@pytest.mark.parametrize("family,config", [("t5", T5_TINY), ("decoder", DECODER_TINY)],
                         ids=["t5", "decoder"])
def test_models_recompute_by_default_with_equal_gradients_and_less_memory(family, config):
    """The models' default: gradients bitwise those of keeping the weights, and XLA's
    compiled backward pass holds less (at least one layer's float32 weights)."""
    assert config.recompute_attention_weights
    results = {}
    for recompute in (True, False):
        loss, params = _model_loss(family, dataclasses.replace(
            config, recompute_attention_weights=recompute))
        grad = jax.jit(jax.value_and_grad(loss))
        results[recompute] = (grad(params),
                              grad.lower(params).compile().memory_analysis().temp_size_in_bytes)
    for a, b in zip(jax.tree.leaves(results[True][0]), jax.tree.leaves(results[False][0])):
        np.testing.assert_array_equal(a, b)
    one_layer_weights = 2 * config.num_heads * LENGTH * LENGTH * 4
    assert results[False][1] - results[True][1] >= one_layer_weights, (
        results[False][1], results[True][1])


@pytest.mark.parametrize("policy", ["save_dots", "full"])
def test_a_remat_policy_decides_alone(policy):
    """Under a remat policy the setting changes nothing: the layer's policy already
    says what the backward pass keeps (tests/test_models_layers.py counts its dots)."""
    jaxprs = []
    for recompute in (True, False):
        loss, params = _model_loss("t5", dataclasses.replace(
            T5_TINY, remat_policy=policy, recompute_attention_weights=recompute))
        jaxprs.append(str(jax.make_jaxpr(jax.grad(loss))(params)))
    assert jaxprs[0] == jaxprs[1]
