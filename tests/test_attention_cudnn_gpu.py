"""cuDNN flash attention against the einsum path, on a GPU only.

On CPU these are skipped with their reason (cuDNN needs a GPU), never passed: a
request for 'cudnn' there falls back to the einsum path, and comparing it with
itself would prove nothing. On a GPU each test first checks that cuDNN really is
what runs. The packed case guards against a known trap: a cuDNN path that ignores
segment ids silently attends across packed sequences (MaxText issue 4476).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.models import attention

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason=f"cuDNN flash attention needs a GPU (backend is {jax.default_backend()})")

B, L, H, G, D = 2, 256, 8, 2, 64


def _inputs():
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, L, H, D), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, L, G, D), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, L, G, D), jnp.bfloat16)
    # Row 0: three packed sequences then padding; row 1: one sequence, no padding.
    segments = np.zeros((B, L), np.int32)
    segments[0, :100], segments[0, 100:180], segments[0, 180:240] = 1, 2, 3
    segments[1, :] = 1
    return q, k, v, jnp.asarray(segments)


def _attend(impl, q, k, v, segments, causal):
    return attention.attend(q, k, v, implementation=impl, scale=D ** -0.5, causal=causal,
                            segment_ids_BxL=segments, dtype=jnp.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_equals_einsum_on_packed_rows_forward_and_gradients(causal):
    q, k, v, segments = _inputs()
    assert attention.choose_implementation("cudnn", dtype=jnp.bfloat16, has_bias=False,
                                           has_prefix=False, dropout=False) == "cudnn"
    real = segments > 0
    out = _attend("cudnn", q, k, v, segments, causal)
    ref = _attend("xla", q, k, v, segments, causal)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-2)

    # Attending across segments would change the first segment's outputs when the
    # later segments' values change: it must not.
    v_moved = v.at[0, 100:].multiply(-3.0)
    moved = _attend("cudnn", q, k, v_moved, segments, causal)
    np.testing.assert_allclose(np.asarray(moved)[0, :100], np.asarray(out)[0, :100], atol=1e-3)

    def loss(impl, q, k, v):
        y = _attend(impl, q, k, v, segments, causal)
        return jnp.sum(jnp.where(real[..., None, None], y, 0.0) ** 2)
    grads = jax.grad(lambda *a: loss("cudnn", *a), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, ref_grads):
        scale = float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=3e-2 * scale)
