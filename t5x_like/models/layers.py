"""Building blocks every model family shares (Flax Linen).

What lives here is used by more than one family: RMSNorm, the bias-free dense
projection, token embeddings, the gated feed-forward block, rotary position
embeddings, the initialisers, and the stacking of N identical layers (a Python loop
or `nn.scan` over depth, optionally rematerialised) with the conversion between the
two parameter layouts. Family-specific layers live with their family
(`t5_layers.py`, `decoder.py`); attention kernels and masks live in `attention.py`.

Conventions shared by every module here:
- Parameters are always created in float32; activations are computed in the
  module's ``dtype`` (e.g. bfloat16). Attention logits/softmax and output logits
  are float32.
- Every parameter carries logical axis names (``nn.with_logical_partitioning``);
  key activations are pinned with ``nn.with_logical_constraint``. Which mesh axes
  these names map to is decided by `parallel/partitioning.py`, not here.
- Dense kernels use a truncated normal (cut at +-2 standard deviations) rescaled so
  that the *actual* standard deviation equals the target.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.ad_checkpoint import checkpoint_name

from t5x_like.models import attention, ordering

Array = jax.Array
Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]

# Standard deviation of a unit normal truncated to [-2, 2].
_TRUNCATED_STD = 0.87962566103423978

# Activation logical axes.
BLE = ('batch', 'length', 'embed')
BLM = ('batch', 'length', 'mlp')
BLHK = ('batch', 'length', 'heads', 'kv')
BLV = ('batch', 'length', 'vocab')


def truncated_normal_init(stddev: float) -> Initializer:
    """Normal truncated at +-2 sigma, rescaled so the result has std `stddev`."""

    def init(key, shape, dtype=jnp.float32):
        unit = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
        return (unit * (stddev / _TRUNCATED_STD)).astype(dtype)

    return init


# ----------------------------------------------------------------------------
# Norm, dense, embedding, feed-forward
# ----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Scale by the root mean square; no mean, no bias (T5's and LLaMA's norm).

    The variance is always computed in float32 so bf16 activations do not lose the
    small-magnitude features.
    """

    dtype: Any = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        features = x_BxLxD.shape[-1]
        scale_D = self.param(
            'scale',
            nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
            (features,),
            jnp.float32,
        )
        x32 = x_BxLxD.astype(jnp.float32)
        mean_sq = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(mean_sq + self.epsilon)
        return y.astype(self.dtype) * scale_D.astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table, also usable as a tied output projection (`attend`).

    Initialised N(0, 1) by default, as in T5 (whose tied-logits path compensates
    with an emb_dim**-0.5 scale in the model).
    """

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

    def setup(self):
        self.embedding = self.param(
            'embedding',
            nn.with_logical_partitioning(self.embedding_init, ('vocab', 'embed')),
            (self.num_embeddings, self.features),
            jnp.float32,
        )

    def __call__(self, ids_BxL: Array) -> Array:
        if not jnp.issubdtype(ids_BxL.dtype, jnp.integer):
            raise ValueError(f'Embed expects integer ids, got {ids_BxL.dtype}.')
        table_VxD = self.embedding.astype(self.dtype)
        return jnp.take(table_VxD, ids_BxL, axis=0)

    def attend(self, query_BxLxD: Array) -> Array:
        """Scores every vocabulary row against `query` (tied logits), in float32."""
        table_VxD = self.embedding.astype(self.dtype)
        return jnp.einsum(
            'bld,vd->blv',
            query_BxLxD.astype(self.dtype),
            table_VxD,
            preferred_element_type=jnp.float32,
        )


class SoftPrompt(nn.Module):
    """Where a soft prompt enters the model: the identity here, holding no parameters.

    Both families call it on their input embeddings, right after the lookup, with
    each token's index within its example's input (`input_index_BxL`: the encoder's
    in-segment position; the decoder-only family's position minus one, the first
    being the shifted-in start token). Prompt tuning (finetuning/prompt_tuning.py)
    intercepts the call and writes its learned vectors over the tokens at indices
    0 .. N-1, the N placeholders the data layer puts at the start of every example's
    inputs (data/converters.py, `SOFT_PROMPT_ID`); packing, padding and decoding need
    nothing more, because those indices are per example.
    """

    @nn.compact
    def __call__(self, x_BxLxD: Array, input_index_BxL: Array) -> Array:
        del input_index_BxL
        return x_BxLxD


# The name every projection's output carries, so that the remat policies that keep
# matmul outputs keep these too (`project_trailing`'s custom VJP hides its dot from them).
PROJECTION_OUTPUT = 'projection_output'


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _project_trailing(x: Array, kernel: Array, num_contracted: int, dtype: Any,
                      out_dtype: Any) -> Array:
    batch_dims = x.ndim - num_contracted
    contract = (tuple(range(batch_dims, x.ndim)), tuple(range(num_contracted)))
    return jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())),
                               preferred_element_type=out_dtype)


def _project_trailing_fwd(x, kernel, num_contracted, dtype, out_dtype):
    # With symbolic zeros, x and kernel arrive with whether each is differentiated.
    # A kernel that is not (an adapter run's frozen base) needs no gradient, and the
    # backward pass learns so from the key its residual is kept under, which is a
    # static part of the residuals' structure.
    out = _project_trailing(x.value, kernel.value, num_contracted, dtype, out_dtype)
    return out, (x.value, {'trained' if kernel.perturbed else 'frozen': kernel.value})


def _project_trailing_bwd(num_contracted, dtype, out_dtype, residuals, dy):
    x, kernel_by_role = residuals
    (role, kernel), = kernel_by_role.items()
    if isinstance(dy, SymbolicZero):
        return None, None
    batch = tuple(range(x.ndim - num_contracted))
    features_of_dy = tuple(range(len(batch), dy.ndim))
    features_of_kernel = tuple(range(num_contracted, kernel.ndim))
    d_kernel = None
    if role == 'trained':
        d_kernel = jax.lax.dot_general(x.astype(dtype), dy, ((batch, batch), ((), ())),
                                       preferred_element_type=out_dtype)
    if jnp.dtype(dtype) != kernel.dtype:
        # The barrier keeps XLA from merging this cast with the forward pass's, which
        # would keep every kernel's low-precision copy alive from the forward dot to
        # here (70 MiB of T5.1.1-small's 1-device bf16 step at its peak).
        kernel = jax.lax.optimization_barrier(kernel)
    d_x = jax.lax.dot_general(dy, kernel.astype(dtype),
                              ((features_of_dy, features_of_kernel), ((), ())),
                              preferred_element_type=out_dtype)
    if d_kernel is None:
        return d_x.astype(dtype).astype(x.dtype), None
    if attention.target_platform() == 'cpu' and _one_device():
        # XLA's CPU scheduler otherwise computes every encoder kernel's gradient at
        # the end of the step, holding each layer's float32 operands until then
        # (see `ordering`): d_x, which the layer below waits for, now waits for it.
        # Not where the gradient is reduced across devices: the tie would wait for
        # each kernel's reduction in turn, which XLA otherwise combines (8 CPU
        # devices, data parallel: 12.1 -> 13.1 s/step with the tie) and which
        # accelerators' schedulers overlap with the layers below.
        d_x = ordering.after(d_x, d_kernel.reshape(-1)[0])
    # As autodiff: the cotangent of each cast operand, then cast back.
    return (d_x.astype(dtype).astype(x.dtype), d_kernel.astype(dtype).astype(kernel.dtype))


_project_trailing.defvjp(_project_trailing_fwd, _project_trailing_bwd, symbolic_zeros=True)


def _one_device() -> bool:
    """Whether the mesh being traced for (none: one device) has a single device."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or math.prod(mesh.shape.values()) == 1


def project_trailing(x: Array, kernel: Array, num_contracted: int, dtype: Any,
                     out_dtype: Any) -> Array:
    """x's trailing `num_contracted` dims times the kernel's leading ones, whose
    gradient is computed as x^T . dy, in the kernel's own dimension order.

    Why: autodiff of the plain dot_general computes the kernel's gradient as
    dy^T . x and then transposes it. XLA's CPU backend keeps that transposed
    layout through the data-parallel all-reduce and into every fused optimizer op,
    each of which then reads the gradient with a stride, and it holds transposed
    copies among the step's temporaries (benchmarks/RESULTS.md, "The training step
    on CPU" and "A leaner training step"). The dots and dtype casts are autodiff's
    own, in the other operand order, so values agree to float summation order
    (tests/test_models_layers.py).

    The custom VJP hides the forward dot from the remat policies that look for
    `dot_general`; the output is therefore named `PROJECTION_OUTPUT`, and those
    policies (`REMAT_POLICIES`) save that name as well, so a rematerialised layer
    keeps exactly what it would keep with plain autodiff.
    """
    return checkpoint_name(_project_trailing(x, kernel, num_contracted, dtype, out_dtype),
                           PROJECTION_OUTPUT)


class DenseGeneral(nn.Module):
    """Bias-free projection contracting `axis` of the input into `features`.

    The kernel has shape ``input_shape[axis] + features`` and logical axes
    ``kernel_axes`` (one name per kernel dimension). When `axis` is the input's
    trailing dims (every projection in both families) the product goes through
    `project_trailing`, whose kernel gradient comes out in the kernel's order.
    """

    features: int | Sequence[int]
    kernel_axes: Sequence[str]
    kernel_init: Initializer
    axis: int | Sequence[int] = -1
    dtype: Any = jnp.float32
    # Dtype of the matmul result; defaults to `dtype`. Set float32 for logits.
    out_dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = tuple(a % x.ndim for a in axis)
        kernel_shape = tuple(x.shape[a] for a in axis) + features
        if len(self.kernel_axes) != len(kernel_shape):
            raise ValueError(
                f'kernel_axes {self.kernel_axes} do not match kernel shape {kernel_shape}.')
        kernel = self.param(
            'kernel',
            nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
            kernel_shape,
            jnp.float32,
        )
        out_dtype = jnp.dtype(self.out_dtype or self.dtype)
        if axis == tuple(range(x.ndim - len(axis), x.ndim)):
            return project_trailing(x, kernel, len(axis), jnp.dtype(self.dtype), out_dtype)
        return jax.lax.dot_general(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            ((axis, tuple(range(len(axis)))), ((), ())),
            preferred_element_type=out_dtype,
        )


# Feed-forward variants: 'gated-gelu' (T5.1.1), 'gated-silu' (LLaMA's SwiGLU) and
# 'relu' (the original T5, ungated).
MLP_ACTIVATIONS = ('gated-gelu', 'gated-silu', 'relu')


GATES = {'gated-gelu': functools.partial(nn.gelu, approximate=True), 'gated-silu': nn.silu}


def _gate(activation: str, gate_in: Array, linear_in: Array) -> Array:
    return GATES[activation](gate_in) * linear_in


def gated_activation(activation: str, gate_in_BxLxM: Array, linear_in_BxLxM: Array
                     ) -> Array:
    """act(gate_in) * linear_in, whose backward pass keeps only its two inputs.

    Why: autodiff keeps every intermediate of the activation for the backward pass
    (for the tanh-approximated GELU in bfloat16: the tanh, its argument's pieces,
    the activation, ...), each as large as the MLP's hidden layer: with
    T5.1.1-small's 512-token encoder, batch 8, 56 MiB a layer where the inputs are
    16 MiB. They are recomputed from the two inputs instead, elementwise work beside
    the MLP's matmuls; the ops are the same, so the gradients are autodiff's
    (tests/test_models_layers.py). In float32 compute autodiff's way is kept: on the
    float32 default CPU run the recompute cost 16% of the step for 0.05 GiB
    (benchmarks/RESULTS.md, "What the backward pass keeps").
    """
    if jnp.dtype(gate_in_BxLxM.dtype).itemsize >= 4:
        return _gate(activation, gate_in_BxLxM, linear_in_BxLxM)
    return jax.checkpoint(_gate, static_argnums=(0,))(activation, gate_in_BxLxM,
                                                      linear_in_BxLxM)


class MlpBlock(nn.Module):
    """Gated feed-forward wo(act(wi_0 x) * wi_1 x), or ungated wo(relu(wi x)).

    `dropout_rate` drops the hidden activations (T5); LLaMA-style blocks pass 0.
    """

    emb_dim: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    activation: str = 'gated-gelu'

    @nn.compact
    def __call__(self, x_BxLxD: Array, *, enable_dropout: bool) -> Array:
        dense = functools.partial(
            DenseGeneral,
            features=self.mlp_dim,
            kernel_axes=('embed', 'mlp'),
            kernel_init=truncated_normal_init(self.emb_dim**-0.5),
            dtype=self.dtype,
        )
        if self.activation == 'relu':
            h_BxLxM = nn.relu(dense(name='wi')(x_BxLxD))
        elif self.activation in GATES:
            h_BxLxM = gated_activation(self.activation, dense(name='wi_0')(x_BxLxD),
                                       dense(name='wi_1')(x_BxLxD))
        else:
            raise ValueError(f'MLP activation {self.activation!r}; choose one of '
                             f'{MLP_ACTIVATIONS}.')
        h_BxLxM = nn.with_logical_constraint(h_BxLxM, BLM)
        h_BxLxM = nn.Dropout(self.dropout_rate)(h_BxLxM, deterministic=not enable_dropout)
        out_BxLxD = DenseGeneral(
            features=self.emb_dim,
            kernel_axes=('mlp', 'embed'),
            kernel_init=truncated_normal_init(self.mlp_dim**-0.5),
            dtype=self.dtype,
            name='wo',
        )(h_BxLxM)
        return nn.with_logical_constraint(out_BxLxD, BLE)


# ----------------------------------------------------------------------------
# Rotary position embeddings
# ----------------------------------------------------------------------------


def rope_inverse_frequencies(*, head_dim: int, theta: float, scaling_factor: float = 1.0,
                             low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                             original_max_position: int = 8192) -> np.ndarray:
    """theta**(-2i/D) for i < D/2, with optional Llama-3 long-context rescaling.

    The Llama-3 rule leaves high frequencies (wavelength shorter than
    original_max_position / high_freq_factor) alone, divides low frequencies
    (wavelength longer than original_max_position / low_freq_factor) by
    `scaling_factor`, and interpolates linearly in between.
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling_factor == 1.0:
        return inv.astype(np.float32)
    wavelength = 2 * math.pi / inv
    smooth = np.clip((original_max_position / wavelength - low_freq_factor)
                     / (high_freq_factor - low_freq_factor), 0.0, 1.0)
    scaled = (1 - smooth) * inv / scaling_factor + smooth * inv
    return scaled.astype(np.float32)


def rope_tables(positions_BxL: Array, inverse_frequencies_F: np.ndarray
                ) -> tuple[Array, Array]:
    """cos and sin, float32 [B, L, F] (F = head_dim/2), for integer positions."""
    angles = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies_F)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BxLxHxD: Array, cos_BxLxF: Array, sin_BxLxF: Array) -> Array:
    """Rotates feature pairs (i, i + D/2) by position-dependent angles, in float32.

    The "two halves" layout is how Hugging Face Llama checkpoints store q/k, so
    imported weights need no permutation.
    """
    x = x_BxLxHxD.astype(jnp.float32)
    first, second = jnp.split(x, 2, axis=-1)
    cos, sin = cos_BxLxF[:, :, None, :], sin_BxLxF[:, :, None, :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin],
                              axis=-1)
    return rotated.astype(x_BxLxHxD.dtype)


# ----------------------------------------------------------------------------
# A stack of identical layers: loop or scan, optionally rematerialised
# ----------------------------------------------------------------------------


def _save_dots_and_named(save_dots: Callable[..., bool], *names: str
                         ) -> Callable[..., bool]:
    """A dot-saving policy that also saves the named outputs of the matmuls that a
    custom VJP hides from it: the projections' (no batch dims) and, where batched
    dots are kept too, the attention's weighted sum of values."""
    return jax.checkpoint_policies.save_from_both_policies(
        save_dots, jax.checkpoint_policies.save_only_these_names(*names))


# What the backward pass may keep instead of recomputing, per layer.
REMAT_POLICIES = {
    'none': None,  # no rematerialisation: keep every activation
    'full': jax.checkpoint_policies.nothing_saveable,  # keep only layer inputs
    # Keep matmul outputs, recompute the cheap elementwise ops (norms, activations).
    'save_dots': _save_dots_and_named(jax.checkpoint_policies.checkpoint_dots,
                                      PROJECTION_OUTPUT, attention.ATTENTION_CONTEXT),
    # Keep only weight matmuls (no batch dims): attention scores are recomputed.
    'save_dots_no_batch': _save_dots_and_named(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, PROJECTION_OUTPUT),
}


def check_remat_policy(remat_policy: str) -> None:
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f'remat_policy {remat_policy!r}; choose one of '
                         f'{sorted(REMAT_POLICIES)}.')


def recomputes_attention_weights(*, requested: bool, remat_policy: str) -> bool:
    """Whether a stack's attention recomputes its weights in the backward pass
    (`attention.attend(recompute_weights=...)`): as requested, under
    `remat_policy='none'` only. A rematerialised layer's policy already decides what
    its backward pass keeps, and a second recomputation nested in it would change
    what each policy means (the dot counts in tests/test_models_layers.py)."""
    return requested and remat_policy == 'none'


def apply_stack(layer_cls: type[nn.Module], x: Array, *broadcast: Any, num_layers: int,
                scan_layers: bool, remat_policy: str, **layer_kwargs: Any) -> Array:
    """Runs `num_layers` layers `layer_cls(**layer_kwargs)` over `x`.

    Each layer maps `(x, *broadcast) -> (x, None)`; the `broadcast` inputs (masks,
    biases, rotary tables, ...) are shared by every layer. Call this from a parent
    module's `nn.compact` method: the layers become that parent's children, named
    `layers_0..N-1`, or, with `scan_layers`, one `layers` module whose parameters
    carry a leading depth axis (logical axis 'layers'; one compiled layer body, so
    compile time stays flat in depth). `remat_policy` rematerialises each layer.
    A decoding cache (collection 'cache', see kv_cache.py) is stacked on axis 1, so
    its leaves keep the batch first ([B, layers, ...]) whichever way the layers run.
    """
    if remat_policy != 'none':
        layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[remat_policy],
                             prevent_cse=not scan_layers)
    if scan_layers:
        stack = nn.scan(layer_cls, variable_axes={'params': 0, 'cache': 1},
                        split_rngs={'params': True, 'dropout': True},
                        in_axes=(nn.broadcast,) * len(broadcast), length=num_layers,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
        x, _ = stack(**layer_kwargs, name='layers')(x, *broadcast)
        return x
    for i in range(num_layers):
        x, _ = layer_cls(**layer_kwargs, name=f'layers_{i}')(x, *broadcast)
    return x


def scan_params(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """One stack's unscanned tree (layers_0..layers_{N-1}) -> scanned ('layers').

    numpy in, numpy out: a Hugging Face import stacks each tensor on the host and
    only then places it into its shards.
    """
    out = {k: v for k, v in params.items() if not k.startswith('layers_')}
    per_layer = [params[f'layers_{i}'] for i in range(num_layers)]
    stack = lambda *xs: (np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs)
                         else jnp.stack(xs))
    out['layers'] = jax.tree.map(stack, *per_layer)
    return out


def unscan_params(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Scanned tree -> unscanned; the exact inverse of `scan_params`."""
    out = {k: v for k, v in params.items() if k != 'layers'}
    for i in range(num_layers):
        out[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], params['layers'])
    return out
