"""`layers.project_trailing`: autodiff's gradient, with the kernel's in kernel order."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_like.training import optimizers
from t5x_like.parallel import partitioning
from t5x_like.training import trainer
from t5x_like.data import synthetic
from t5x_like.models import layers, t5


def _plain(x, kernel, num_contracted, dtype, out_dtype):
    batch_dims = x.ndim - num_contracted
    contract = (tuple(range(batch_dims, x.ndim)), tuple(range(num_contracted)))
    return jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())),
                               preferred_element_type=out_dtype)


@pytest.mark.parametrize("x_shape,kernel_shape,num_contracted,dtype,out_dtype", [
    ((4, 7, 16), (16, 40), 1, jnp.float32, jnp.float32),           # logits-like, float32
    ((4, 7, 16), (16, 40), 1, jnp.bfloat16, jnp.float32),          # bf16 compute, f32 logits
    ((4, 7, 3, 8), (3, 8, 16), 2, jnp.bfloat16, jnp.bfloat16),     # output projection
])
def test_gradients_equal_autodiff_of_the_plain_dot(x_shape, kernel_shape, num_contracted,
                                                   dtype, out_dtype):
    kx, kk, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape, jnp.float32)
    kernel = jax.random.normal(kk, kernel_shape, jnp.float32)
    out_shape = x_shape[:len(x_shape) - num_contracted] + kernel_shape[num_contracted:]
    cotangent = jax.random.normal(kc, out_shape, jnp.float32)

    def loss(fn):
        return lambda x, k: jnp.sum(fn(x, k, num_contracted, jnp.dtype(dtype),
                                       jnp.dtype(out_dtype)).astype(jnp.float32) * cotangent)

    ours = jax.value_and_grad(loss(layers.project_trailing), argnums=(0, 1))(x, kernel)
    plain = jax.value_and_grad(loss(_plain), argnums=(0, 1))(x, kernel)
    assert ours[0] == plain[0]                     # the forward is the same op
    for a, b in zip(ours[1], plain[1]):
        assert a.shape == b.shape and a.dtype == b.dtype
        # Same dots and casts; only the summation order may differ (bf16: one ulp).
        tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max())


def test_data_parallel_logits_gradient_is_all_reduced_in_the_kernels_order():
    """The defect: on CPU the logits kernel's gradient went through the all-reduce
    (and every fused optimizer op after it) transposed, [vocab, embed]."""
    config = t5.T5Config(vocab_size=1024, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
                         num_encoder_layers=1, num_decoder_layers=1, dtype="bfloat16")
    model = t5.EncoderDecoderModel(config=config)
    source = synthetic.SyntheticEncDecSource(encoder_length=32, decoder_length=16,
                                             vocab_size=config.vocab_size)
    lengths = source.model_feature_lengths()
    partitioner = partitioning.Partitioner()           # data parallel over 8 devices
    optimizer = optimizers.adafactor(learning_rate=optax.constant_schedule(0.01))
    layout = trainer.state_layout(model=model, optimizer=optimizer, partitioner=partitioner,
                                  feature_lengths=lengths)
    step = trainer.jit_train_step(trainer.make_train_step(model=model, optimizer=optimizer),
                                  partitioner=partitioner, layout=layout,
                                  batch_feature_names=tuple(lengths))
    batch = {name: jax.ShapeDtypeStruct((8, n), np.int32, sharding=partitioner.batch_sharding())
             for name, n in lengths.items()}
    hlo = step.lower(layout.abstract_with_shardings(), batch).compile().as_text()
    reduced = re.findall(r"= (f32\[\d+,\d+\])\{1,0\} get-tuple-element\(%all-reduce[^\n]*"
                         r"logits_dense", hlo)
    assert reduced == ["f32[64,1024]"]
