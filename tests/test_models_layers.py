"""`layers.project_trailing`: autodiff's gradient, with the kernel's in kernel order,
for every projection of both families, and seen by the remat policies as a dot.

Tolerances. One projection: the input's gradient is bitwise autodiff's (the same
dot); the kernel's, in bfloat16, within one bfloat16 ulp per element (a float32
accumulation in another order, then rounded), and in float32 within Higham's bound
for any two orders of a sum of n products, (n - 1) * eps * sum|terms|. Whole models:
every non-kernel gradient bitwise equal; each kernel's within a few ulps of the
tensor's largest element in the compute dtype (float32: 8, observed at most 4;
bfloat16: 4, observed 0 on JAX 0.10 and at most 3 on JAX 0.11, whose CPU backend
keeps some bfloat16 intermediates of one program at float32 precision and not the
other's: XLA's excess precision depends on fusion).

`layers.gated_activation` and `attention.mix_values` keep less for the backward pass
(the activation's inputs only; the attention weights in float32 only) and recompute
the rest: their gradients are bitwise autodiff's, and the whole-model tests compare
against plain autodiff of all three.
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
import optax
import pytest

from t5x_like.training import optimizers
from t5x_like.parallel import partitioning
from t5x_like.training import trainer
from t5x_like.data import synthetic
from t5x_like.models import attention, decoder, layers, t5


def _plain(x, kernel, num_contracted, dtype, out_dtype):
    batch_dims = x.ndim - num_contracted
    contract = (tuple(range(batch_dims, x.ndim)), tuple(range(num_contracted)))
    return jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())),
                               preferred_element_type=out_dtype)


def _plain_mix_values(weights, v, dtype):
    return attention._weighted_sum(weights.astype(dtype), v)


def _use_plain_autodiff(monkeypatch):
    """Every layer as autodiff alone would do it: the reference."""
    monkeypatch.setattr(layers, "project_trailing", _plain)
    monkeypatch.setattr(layers, "gated_activation", layers._gate)
    monkeypatch.setattr(attention, "mix_values", _plain_mix_values)


BFLOAT16_ULP_IN_FLOAT32_ULPS = 2**16


def _assert_projection_gradient(ours, reference, *, bfloat16: bool, float32_bound):
    """One projection: per element, one bfloat16 ulp, or the float32 bound."""
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    error = np.abs(ours.astype(np.float64) - reference)
    if bfloat16:
        ulp = (np.spacing(np.abs(reference).astype(np.float32)).astype(np.float64)
               * BFLOAT16_ULP_IN_FLOAT32_ULPS)
        assert (error <= ulp).all(), float((error / ulp).max())
    else:
        assert (error <= float32_bound).all(), float(
            (error / np.maximum(float32_bound, 1e-30)).max())


def _assert_kernel_gradient_in_scale(ours, reference, *, bfloat16: bool):
    """A whole model's kernel gradient: within a few ulps of the tensor's scale."""
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    scale_ulp = float(np.spacing(np.abs(reference).max()))
    allowed = 4 * BFLOAT16_ULP_IN_FLOAT32_ULPS * scale_ulp if bfloat16 else 8 * scale_ulp
    error = float(np.abs(ours.astype(np.float64) - reference).max())
    assert error <= allowed, error / scale_ulp


# Every projection shape of both families: query/key/value (embed -> heads, kv; GQA
# has fewer kv heads), attention out (heads, kv -> embed), MLP in and out, logits.
@pytest.mark.parametrize("x_shape,kernel_shape,num_contracted,out_dtype", [
    ((4, 7, 16), (16, 4, 8), 1, None),          # query
    ((4, 7, 16), (16, 2, 8), 1, None),          # GQA key / value
    ((4, 7, 4, 8), (4, 8, 16), 2, None),        # attention out
    ((4, 7, 16), (16, 40), 1, None),            # MLP wi / wi_0 / wi_1
    ((4, 7, 40), (40, 16), 1, None),            # MLP wo
    ((4, 7, 16), (16, 96), 1, jnp.float32),     # logits, always float32 out
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_equal_autodiff_of_the_plain_dot(x_shape, kernel_shape, num_contracted,
                                                   out_dtype, dtype):
    out_dtype = out_dtype or dtype
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
    np.testing.assert_array_equal(ours[1][0], plain[1][0])   # d_x: the same dot
    # d_kernel: the same products summed over the n = batch x length rows, in
    # another order. Higham's bound on the float32 difference, from |x|^T |dy|.
    batch = x_shape[:len(x_shape) - num_contracted]
    n = int(np.prod(batch))
    x_rows = np.abs(np.asarray(x, np.float64).reshape(n, -1))
    dy_rows = np.abs(np.asarray(cotangent, np.float64).reshape(n, -1))
    bound = (n - 1) * np.finfo(np.float32).eps * (x_rows.T @ dy_rows).reshape(kernel_shape)
    _assert_projection_gradient(ours[1][1], plain[1][1], bfloat16=dtype == jnp.bfloat16,
                                float32_bound=bound)


# ----------------------------------------------------------------------------
# What the backward pass keeps: the activation's inputs, the float32 weights
# ----------------------------------------------------------------------------


def _saved_residuals(fn, *args) -> list[str]:
    """Where each array the backward pass keeps comes from, constants left out."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    sources = [line.split(" from ", 1)[1] for line in printed.getvalue().splitlines()]
    return [source for source in sources if source not in ("a constant", "a literal")]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_frozen_kernel_costs_no_gradient_product(dtype):
    """An adapter run's frozen base: the compiled backward pass holds one product
    (d_x), not two. The defect: on CPU, d_x waits for the kernel's gradient
    (`ordering.after`), so XLA could no longer drop a gradient nobody asked for, and
    LoRA paid every frozen kernel's product."""
    x = jax.random.normal(jax.random.key(0), (4, 7, 16))
    kernel = jax.random.normal(jax.random.key(1), (16, 40))
    loss = lambda x, kernel: jnp.sum(layers.project_trailing(
        x, kernel, 1, jnp.dtype(dtype), jnp.dtype(dtype)).astype(jnp.float32) ** 2)
    products = lambda argnums: jax.jit(jax.grad(loss, argnums=argnums)).lower(
        x, kernel).compile().as_text().count(" dot(")
    assert products(0) == 2             # the forward's and d_x
    assert products((0, 1)) == 3        # and the kernel's gradient
    frozen = jax.jit(jax.grad(loss))(x, kernel)
    trained = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)[0]
    np.testing.assert_array_equal(frozen, trained)


@pytest.mark.parametrize("activation", sorted(layers.GATES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_activation_keeps_its_inputs_alone_and_gives_autodiffs_gradients(
        activation, dtype):
    k_gate, k_linear, k_cotangent = jax.random.split(jax.random.key(1), 3)
    gate_in = (3 * jax.random.normal(k_gate, (4, 7, 40))).astype(dtype)
    linear_in = jax.random.normal(k_linear, (4, 7, 40)).astype(dtype)
    cotangent = jax.random.normal(k_cotangent, (4, 7, 40))
    loss = lambda fn: lambda a, b: jnp.sum(fn(activation, a, b).astype(jnp.float32) * cotangent)
    ours = jax.jit(jax.value_and_grad(loss(layers.gated_activation), argnums=(0, 1)))(
        gate_in, linear_in)
    plain = jax.jit(jax.value_and_grad(loss(layers._gate), argnums=(0, 1)))(gate_in, linear_in)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(a, b)
    saved = _saved_residuals(loss(layers.gated_activation), gate_in, linear_in)
    plain_saved = _saved_residuals(loss(layers._gate), gate_in, linear_in)
    if dtype == jnp.float32:            # kept as autodiff does it: recomputing cost time
        assert saved == plain_saved
    else:
        assert saved == ["the argument a", "the argument b"]
        # Plain autodiff keeps intermediates of the activation as well.
        assert len(plain_saved) > 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mix_values_keeps_the_float32_weights_alone_and_gives_autodiffs_gradients(dtype):
    # [batch, kv heads, group, queries, keys] weights; values [batch, keys, kv heads, D].
    k_logits, k_values, k_cotangent = jax.random.split(jax.random.key(2), 3)
    weights = jax.nn.softmax(3 * jax.random.normal(k_logits, (2, 2, 3, 5, 9)), axis=-1)
    values = jax.random.normal(k_values, (2, 9, 2, 8)).astype(dtype)
    cotangent = jax.random.normal(k_cotangent, (2, 5, 2, 3, 8))
    loss = lambda fn: lambda w, v: jnp.sum(fn(w, v, jnp.dtype(dtype)).astype(jnp.float32)
                                           * cotangent)
    ours = jax.jit(jax.value_and_grad(loss(attention.mix_values), argnums=(0, 1)))(
        weights, values)
    plain = jax.jit(jax.value_and_grad(loss(_plain_mix_values), argnums=(0, 1)))(
        weights, values)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(a, b)
    saved = _saved_residuals(loss(attention.mix_values), weights, values)
    assert saved == ["the argument w", "the argument v"]


def test_compiled_backward_holds_less_than_plain_autodiffs(monkeypatch):
    """What XLA allocates, not only what JAX hands it: without the barrier in
    `mix_values`' backward, XLA merges its cast with the forward's and keeps the
    bfloat16 weights after all (the saving here drops to 0; on the CPU benchmark's
    1-device step the temporaries were 1.75 GiB with it, 1.96 without)."""
    # The weights kept, as before the models recomputed them (test_models_attention.py).
    config = dataclasses.replace(T5_TINY, dtype="bfloat16", num_encoder_layers=4,
                                 recompute_attention_weights=False)
    model = t5.EncoderDecoderModel(config=config)
    params = nn.unbox(model.init_params(jax.random.key(0), batch_size=1, encoder_length=256,
                                        decoder_length=8))
    tokens = lambda n: np.random.default_rng(0).integers(3, 128, (2, n)).astype(np.int32)
    batch = {"encoder_input_tokens": tokens(256), "decoder_input_tokens": tokens(8),
             "decoder_target_tokens": tokens(8), "decoder_loss_weights": np.ones((2, 8))}
    loss = lambda p: model.loss_and_metrics(p, batch, dropout_rng=None)[0]
    temporaries = lambda: jax.jit(jax.grad(loss)).lower(params).compile(
        ).memory_analysis().temp_size_in_bytes
    ours = temporaries()
    monkeypatch.setattr(attention, "mix_values", _plain_mix_values)
    plain_attention = temporaries()
    monkeypatch.setattr(layers, "gated_activation", layers._gate)
    plain = temporaries()
    weights_copy = 2 * 2 * 256 * 256 * 2     # one encoder layer's bfloat16 weights
    mlp_hidden = 2 * 256 * 64 * 2            # one of its MLP's bfloat16 hidden tensors
    # Observed (JAX 0.10.2): half a weights copy less (249,280 bytes; the peak is
    # where the last layer's copy would have been freed anyway), six hidden tensors
    # less (196,608). JAX 0.11's XLA keeps no copy of this tiny model's weights with
    # plain autodiff either (16,384 bytes apart), so there it must only not cost more.
    if jax.__version_info__ < (0, 11):
        assert plain_attention - ours >= weights_copy // 4, (ours, plain_attention)
    else:
        assert ours <= plain_attention, (ours, plain_attention)
    assert plain - plain_attention >= 3 * mlp_hidden, (plain_attention, plain)


# ----------------------------------------------------------------------------
# Whole models: every kernel's gradient against autodiff; remat policies
# ----------------------------------------------------------------------------

T5_TINY = t5.T5Config(vocab_size=128, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                      num_encoder_layers=2, num_decoder_layers=2)
DECODER_TINY = decoder.DecoderConfig(vocab_size=64, emb_dim=32, num_heads=4, num_kv_heads=2,
                                     head_dim=8, mlp_dim=48, num_layers=2)


def _loss_and_params(family: str, config):
    rng = np.random.default_rng(0)
    tokens = lambda n: rng.integers(3, config.vocab_size, (2, n)).astype(np.int32)
    if family == "t5":
        model = t5.EncoderDecoderModel(config=config)
        params = model.init_params(jax.random.key(0), batch_size=1, encoder_length=12,
                                   decoder_length=6)
        batch = {"encoder_input_tokens": tokens(12), "decoder_input_tokens": tokens(6),
                 "decoder_target_tokens": tokens(6)}
    else:
        model = decoder.DecoderOnlyModel(config=config)
        params = model.init_params(jax.random.key(0), batch_size=1, decoder_length=12)
        batch = {"decoder_input_tokens": tokens(12), "decoder_target_tokens": tokens(12)}
    batch["decoder_loss_weights"] = np.ones_like(batch["decoder_target_tokens"])
    loss = lambda p: model.loss_and_metrics(p, batch, dropout_rng=None)[0]
    return loss, nn.unbox(params)


def _model_cases():
    """Both families x float32/bfloat16 x loop/scan; two of the eight (each family,
    dtype and stacking once) in the default suite, the rest in the slow pass."""
    for family, config in (("t5", T5_TINY), ("decoder", DECODER_TINY)):
        for dtype in ("float32", "bfloat16"):
            for scan in (False, True):
                default = (family, dtype, scan) in {("t5", "bfloat16", True),
                                                    ("decoder", "float32", False)}
                yield pytest.param(family, config, dtype, scan,
                                   id=f"{family}-{dtype}-{'scan' if scan else 'loop'}",
                                   marks=() if default else pytest.mark.slow)


@pytest.mark.parametrize("family,config,dtype,scan", _model_cases())
def test_model_gradients_equal_autodiffs(monkeypatch, family, config, dtype, scan):
    loss, params = _loss_and_params(family, dataclasses.replace(config, dtype=dtype,
                                                                scan_layers=scan))
    ours = jax.jit(jax.grad(loss))(params)
    _use_plain_autodiff(monkeypatch)
    reference = jax.jit(jax.grad(loss))(params)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(ours)]
    for path, a, b in zip(paths, jax.tree.leaves(ours), jax.tree.leaves(reference)):
        if "kernel" not in path:   # norms, embeddings, biases: the same ops in the same order
            np.testing.assert_array_equal(a, b, err_msg=path)
        else:
            _assert_kernel_gradient_in_scale(a, b, bfloat16=dtype == "bfloat16")


def _saved_from_the_stack(loss, params) -> collections.Counter:
    """The residuals the scanned layer stack saves for the backward pass, as (dtype,
    number of elements): `save_dots` keeps the attention's weighted sum as its dot
    leaves it, before einsum's transpose, and `mix_values`' name sits after it."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(loss, params)
    sizes = []
    for line in printed.getvalue().splitlines():
        if "output of scan" in line:
            dtype, dims = re.fullmatch(r"(\w+)\[([\d,]*)\]", line.split()[0]).groups()
            sizes.append((dtype, int(np.prod([int(d) for d in dims.split(",") if d]))))
    return collections.Counter(sizes)


@pytest.mark.parametrize("policy", ["save_dots", "save_dots_no_batch", "full"])
@pytest.mark.parametrize("family,config", [("t5", T5_TINY), ("decoder", DECODER_TINY)],
                         ids=["t5", "decoder"])
def test_remat_policies_save_the_projections_as_they_save_plain_dots(monkeypatch, family,
                                                                      config, policy):
    """`save_dots` keeps each projection's output instead of recomputing it: the
    backward holds as many dots and the stack saves the same tensors as with plain
    autodiff's projections (a policy blind to the custom VJP recomputes every
    projection: 91 dots instead of 75 in the T5 case)."""
    loss, params = _loss_and_params(family, dataclasses.replace(
        config, dtype="bfloat16", scan_layers=True, remat_policy=policy))
    dots = lambda: str(jax.make_jaxpr(jax.grad(loss))(params)).count("dot_general")
    ours = dots(), _saved_from_the_stack(loss, params)
    _use_plain_autodiff(monkeypatch)
    reference = dots(), _saved_from_the_stack(loss, params)
    assert ours == reference
    assert sum(ours[1].values()) > 0


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
    # Its own all-reduce, or one element of a combined one.
    reduced = re.findall(r"= (f32\[\d+,\d+\])\{1,0\} (?:all-reduce\(|get-tuple-element\("
                         r"%all-reduce)[^\n]*logits_dense", hlo)
    assert reduced == ["f32[64,1024]"]
