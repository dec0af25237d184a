import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_like.training import optimizers


def test_rsqrt_schedule_matches_t5_numbers():
    lr = optimizers.rsqrt_schedule(base_learning_rate=1.0, warmup_steps=10_000)
    np.testing.assert_allclose([lr(0), lr(5_000), lr(10_000), lr(40_000)],
                               [0.01, 0.01, 0.01, 0.005], rtol=1e-6)


def t5x_learning_rate(step, *, factors, base_learning_rate, warmup_steps,
                      min_learning_rate=1e-8):
    """T5X's utils.create_learning_rate_scheduler(...)(step), the factors we offer,
    transcribed (t5x/utils.py); T5X passes the 0-based step of the update."""
    rate = 1.0
    for name in factors.split(" * "):
        rate *= {"constant": base_learning_rate,
                 "linear_warmup": min(1.0, step / warmup_steps),
                 "rsqrt_decay": 1 / np.sqrt(max(step, warmup_steps))}[name]
    return max(rate, min_learning_rate)


@pytest.mark.parametrize("linear_warmup", [False, True])
def test_rsqrt_schedule_equals_t5x_at_the_edges_of_the_warmup(linear_warmup):
    warmup = 100
    lr = optimizers.rsqrt_schedule(base_learning_rate=0.5, warmup_steps=warmup,
                                   linear_warmup=linear_warmup)
    factors = "constant * linear_warmup * rsqrt_decay" if linear_warmup else \
        "constant * rsqrt_decay"
    steps = [0, 1, warmup - 1, warmup, 4 * warmup]
    want = [t5x_learning_rate(s, factors=factors, base_learning_rate=0.5,
                              warmup_steps=warmup) for s in steps]
    np.testing.assert_allclose([lr(s) for s in steps], want, rtol=1e-6)
    if linear_warmup:                 # the first update gets only the floor
        assert want[:2] == [1e-8, 0.5 * 0.1 / 100]


def test_adafactor_factors_large_matrices_and_updates():
    opt = optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule())
    params = {"w": jnp.ones((256, 512)), "b": jnp.ones((3,))}
    state = opt.transform.init(params)
    shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(state))
    assert (256, 1) in shapes and (1, 512) in shapes  # factored row/column stats
    grads = {"w": jnp.full((256, 512), 0.1), "b": jnp.full((3,), 0.1)}
    updates, _ = opt.transform.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert float(new["w"][0, 0]) < 1.0


def test_adamw_clips_and_decays():
    opt = optimizers.adamw(learning_rate=lambda step: 1e-3, max_grad_norm=1.0)
    params = {"w": jnp.ones((4,))}
    updates, _ = opt.transform.update({"w": jnp.full((4,), 100.0)},
                                      opt.transform.init(params), params)
    # First Adam step moves each coordinate by ~lr (plus decoupled weight decay).
    np.testing.assert_allclose(updates["w"], -1e-3 * (1 + 0.1), rtol=1e-3)


# ------------------------------------------------------------------ Adafactor as T5X factors it

# T5X's logical factor rules (t5x/adafactor.py, standard_logical_factor_rules), with our
# names: rows over `embed`, columns over the rest; `layers` is a batch (scan) dimension.
T5X_FACTOR = {"embed": "row", "mlp": "col", "heads": "col", "kv_heads": "col", "kv": "col",
              "vocab": "col", "relpos_buckets": None, "layers": "batch"}


def t5x_second_moment_shapes(shape, axes, min_dim_size_to_factor=128):
    """The shapes of T5X's second-moment statistics for one parameter, from T5X's rule:
    a rank <= 2 parameter without a batch dimension falls back to the heuristic (factor
    the two largest dims if the smaller of them is >= min_dim_size_to_factor);
    otherwise rows/columns come from the names and v_row drops the column dims, v_col
    the row dims. Unfactored: one statistic shaped like the parameter."""
    rule = [T5X_FACTOR[a] for a in axes]
    if not ("row" in rule and "col" in rule):
        rule = [r if r == "batch" else None for r in rule]
    if len(shape) <= 2 and "batch" not in rule:
        if len(shape) < 2:
            return [tuple(shape)]
        order = np.argsort(shape, kind="stable")
        if shape[order[-2]] < min_dim_size_to_factor:
            return [tuple(shape)]
        rows, cols = [int(order[-2])], [int(order[-1])]
    else:
        rows = [d for d, r in enumerate(rule) if r == "row"]
        cols = [d for d, r in enumerate(rule) if r == "col"]
        if not rows:
            return [tuple(shape)]
    v_row = tuple(s for d, s in enumerate(shape) if d not in cols)
    v_col = tuple(s for d, s in enumerate(shape) if d not in rows)
    return sorted([v_row, v_col])


def _second_moment_shapes_per_parameter(optimizer, layout):
    """For each parameter: the shapes of its optimizer-state statistics, size-1
    dimensions left out, and placeholders (one number per layer at most) too."""
    per_param = {}

    def collect(leaf, path, axes):
        layers = int(np.prod([s for s, a in zip(leaf.shape, tuple(axes)) if a == "layers"]))
        if leaf.size > layers:
            per_param.setdefault(path, []).append(tuple(s for s in leaf.shape if s != 1))
        return leaf

    paths = jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p),
                                             layout.abstract.params)
    optax.tree_utils.tree_map_params(optimizer.transform, collect, layout.abstract.opt_state,
                                     paths, layout.logical_specs.params,
                                     transform_non_params=lambda x: x,
                                     is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return {k: sorted(v) for k, v in per_param.items()}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_adafactor_second_moments_of_t5_1_1_base_follow_t5x_rule(scan_layers):
    """Abstract init only (no FLOPs): every T5.1.1-base parameter's statistics have
    the shapes T5X's factored Adafactor gives them; attention kernels are factored."""
    from t5x_like.parallel import partitioning
    from t5x_like.training import trainer
    from t5x_like.models import t5
    config = t5.T5Config(vocab_size=32128, emb_dim=768, num_heads=12, head_dim=64,
                         mlp_dim=2048, num_encoder_layers=12, num_decoder_layers=12,
                         scan_layers=scan_layers)
    optimizer = optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule())
    layout = trainer.state_layout(
        model=t5.EncoderDecoderModel(config=config), optimizer=optimizer,
        partitioner=partitioning.Partitioner(devices=jax.devices()[:1]),
        feature_lengths={"encoder_input_tokens": 8, "decoder_target_tokens": 8})
    ours = _second_moment_shapes_per_parameter(optimizer, layout)
    flat_params = jax.tree_util.tree_flatten_with_path(layout.abstract.params)[0]
    flat_axes = jax.tree.leaves(layout.logical_specs.params,
                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    floats = 0
    for (path, param), axes in zip(flat_params, flat_axes):
        name = jax.tree_util.keystr(path)
        expected = t5x_second_moment_shapes(param.shape, tuple(axes))
        assert ours[name] == expected, (name, param.shape, tuple(axes))
        floats += sum(int(np.prod(s)) for s in expected)
    query = "['encoder']['layers']" if scan_layers else "['encoder']['layers_0']"
    expected_query = [(12, 12, 64), (12, 768)] if scan_layers else [(12, 64), (768,)]
    assert ours[f"{query}['attention']['query']['kernel']"] == expected_query
    # 248M parameters, 0.54M second-moment floats (85M before: 7.08M of the 7.17M
    # per encoder+decoder layer pair were the unfactored attention kernels).
    assert floats == 538_112, floats


def _numpy_factored_adafactor(w, grads, *, lr, rows, decay_exponent=0.8, eps1=1e-30,
                              eps2=1e-3, clip=1.0):
    """Adafactor (Shazeer & Stern 2018, T5 defaults) on a matrix view of `w`: the
    `rows` leading dims form the rows, the rest the columns. Returns the parameter
    after each step."""
    shape = w.shape
    w = w.reshape(int(np.prod(shape[:rows])), -1).astype(np.float64)
    r = np.zeros(w.shape[0])
    c = np.zeros(w.shape[1])
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.reshape(w.shape).astype(np.float64)
        beta = 1.0 - t ** -decay_exponent
        g2 = g * g + eps1
        r = beta * r + (1 - beta) * g2.mean(axis=1)
        c = beta * c + (1 - beta) * g2.mean(axis=0)
        v_hat = np.outer(r, c) / r.mean()
        u = g / np.sqrt(v_hat)
        u /= max(1.0, np.sqrt(np.mean(u * u)) / clip)
        scale = max(np.sqrt(np.mean(w * w)), eps2)
        w = w - lr * scale * u
        out.append(w.reshape(shape))
    return out


@pytest.mark.parametrize("axes,rows_first", [
    (("embed", "heads", "kv"), True),       # query/key/value kernels: rows = embed
    (("heads", "kv", "embed"), False),      # output kernel: rows = embed, last
])
def test_adafactor_update_equals_numpy_factored_adafactor_on_a_3d_kernel(axes, rows_first):
    from jax.sharding import PartitionSpec
    rng = np.random.default_rng(0)
    shape = (6, 3, 4) if rows_first else (3, 4, 6)
    w0 = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) * s for s in (1.0, 0.3, 2.0)]
    lr = 0.01
    opt = optimizers.adafactor(learning_rate=lambda step: lr)
    tx = opt.transform_for({"w": PartitionSpec(*axes)})
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    assert sorted(x.size for x in jax.tree.leaves(state) if x.size > 1) == [6, 12]
    # The matrix view: embed rows x (heads*kv) columns.
    as_matrix = (lambda x: x) if rows_first else (lambda x: np.moveaxis(x, -1, 0))
    expected = _numpy_factored_adafactor(as_matrix(w0), [as_matrix(g) for g in grads],
                                         lr=lr, rows=1)
    step = jax.jit(opt.transform.update)
    for g, want in zip(grads, expected):
        updates, state = step({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(as_matrix(np.asarray(params["w"])), want,
                                   rtol=2e-5, atol=1e-7)
