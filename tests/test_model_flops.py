"""Analytic model FLOPs (MFU's numerator): hand counts, XLA's count, the progress line."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import pytest

from t5x_like.reporting import device_peaks
from t5x_like.reporting import metrics
from t5x_like.data import synthetic
from t5x_like.models import decoder, t5


def test_decoder_count_equals_a_hand_count():
    cfg = decoder.DecoderConfig(vocab_size=64, emb_dim=16, num_heads=4, num_kv_heads=2,
                                head_dim=8, mlp_dim=32, num_layers=2)
    model = decoder.DecoderOnlyModel(config=cfg)
    # Forward FLOPs per token and layer, 2 per multiply-add.
    q = o = 2 * 16 * (4 * 8)          # 1024 each: emb -> 4 query heads x 8
    k = v = 2 * 16 * (2 * 8)          # 512 each: emb -> 2 kv heads x 8
    mlp = 3 * 2 * 16 * 32             # gate, up, down: 3072
    scores = values = 2 * 16 * 8 * 4  # 16 keys x 8 x 4 heads, QK^T and AV: 1024 each
    causal_attention = (scores + values) / 2
    layer = q + k + v + o + mlp + causal_attention      # 7168
    logits = 2 * 16 * 64                                 # 2048
    per_sequence = 3 * 16 * (2 * layer + logits)         # 786,432
    assert per_sequence == 786_432
    got = model.training_flops_per_step(feature_lengths={'decoder_target_tokens': 16},
                                        batch_size=2)
    assert got == 2 * per_sequence


def test_encoder_decoder_count_equals_a_hand_count():
    cfg = t5.T5Config(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                      num_encoder_layers=2, num_decoder_layers=1)
    model = t5.EncoderDecoderModel(config=cfg)
    encoder_length, decoder_length = 12, 6
    projection = 2 * 16 * (2 * 8)                 # one of q/k/v/o: 512
    mlp = 3 * 2 * 16 * 32                         # gated GELU: 3072
    attention_over = lambda keys: 2 * 2 * keys * 8 * 2   # QK^T + AV, full, 2 heads
    encoder_token = 2 * (4 * projection + mlp + attention_over(12))          # 2 layers
    cross_k_v_per_encoder_token = 1 * 2 * projection                        # 1 dec layer
    decoder_token = 1 * (4 * projection + 2 * projection + mlp
                         + attention_over(6) / 2 + attention_over(12)) + 2 * 16 * 64
    per_sequence = 3 * (encoder_length * (encoder_token + cross_k_v_per_encoder_token)
                        + decoder_length * decoder_token)
    assert per_sequence == 625_536
    got = model.training_flops_per_step(
        feature_lengths={'encoder_input_tokens': 12, 'decoder_target_tokens': 6},
        batch_size=3)
    assert got == 3 * per_sequence


def _xla_training_flops(model, batch):
    lengths = model.init_lengths({name: x.shape[1] for name, x in batch.items()})
    batch_size = next(iter(batch.values())).shape[0]
    abstract = jax.eval_shape(
        lambda rng: model.init_params(rng, batch_size=batch_size, **lengths),
        jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                          flax.core.meta.unbox(abstract))
    grad = jax.jit(jax.grad(lambda p, b: model.loss_and_metrics(p, b, dropout_rng=None)[0]))
    cost = grad.lower(params, batch).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']


@pytest.mark.parametrize('family', ['decoder', 't5'])
def test_count_agrees_with_xla_cost_analysis(family):
    """XLA counts every op of the unscanned training step; the analytic count only
    the matmuls, and XLA's dense causal attention computes the full square. With
    causal attention counted in full, XLA must be at most a few percent higher (the
    elementwise ops: norms, softmax, activations, the loss)."""
    length, batch_size = 128, 4
    if family == 'decoder':
        cfg = decoder.DecoderConfig(vocab_size=1024, emb_dim=128, num_heads=4,
                                    num_kv_heads=2, head_dim=32, mlp_dim=512, num_layers=2)
        model = decoder.DecoderOnlyModel(config=cfg)
        source = synthetic.SyntheticDecoderSource(decoder_length=length, vocab_size=1024,
                                                  pack_segments=2)
        analytic = batch_size * cfg.training_flops_per_sequence(decoder_length=length,
                                                                causal_at_half=False)
    else:
        cfg = t5.T5Config(vocab_size=1024, emb_dim=128, num_heads=4, head_dim=32,
                          mlp_dim=512, num_encoder_layers=2, num_decoder_layers=2)
        model = t5.EncoderDecoderModel(config=cfg)
        source = synthetic.SyntheticEncDecSource(encoder_length=length,
                                                 decoder_length=length // 4, vocab_size=1024)
        analytic = batch_size * cfg.training_flops_per_sequence(
            encoder_length=length, decoder_length=length // 4, causal_at_half=False)
    batch = {name: jnp.asarray(x) for name, x in
             source.batch(step=0, shard_index=0, batch_size=batch_size).items()}
    xla = _xla_training_flops(model, batch)
    assert 1.0 <= xla / analytic <= 1.04, (xla, analytic)


def test_peaks_by_device_kind():
    assert device_peaks.peak_bf16_flops('NVIDIA H100 80GB HBM3') == 989e12
    assert device_peaks.peak_bf16_flops('NVIDIA H100 PCIe') == 756e12
    assert device_peaks.peak_bf16_flops('NVIDIA H200') == 989e12
    assert device_peaks.peak_bf16_flops('NVIDIA A100-SXM4-80GB') == 312e12
    assert device_peaks.peak_bf16_flops('TPU v5 lite') == 197e12
    assert device_peaks.peak_bf16_flops('TPU v5p') == 459e12
    assert device_peaks.peak_bf16_flops('TPU v4') == 275e12
    assert device_peaks.peak_bf16_flops('TPU v6 lite') == 918e12
    assert device_peaks.peak_bf16_flops('cpu') is None


def test_progress_reports_per_device_rates_and_mfu(monkeypatch):
    clock = iter([100.0, 102.0, 200.0, 202.0])   # each Progress: 10 steps in 2 s
    monkeypatch.setattr(metrics.time, 'perf_counter', lambda: next(clock))
    progress = metrics.Progress(total_steps=100, start_step=0, num_devices=4,
                                flops_per_step=8e12, peak_flops_per_device=989e12)
    progress.add_tokens(40_000)
    rates = progress.tick(10)
    assert rates['tokens_per_sec'] == 20_000 and rates['tokens_per_sec_per_device'] == 5_000
    assert rates['tflops_per_device'] == pytest.approx(10.0)   # 80e12 FLOP / 2 s / 4
    assert rates['mfu'] == pytest.approx(10e12 / 989e12)
    line = progress.line(10, {'loss': 3.0, 'accuracy': 0.5, 'learning_rate': 0.01}, rates)
    assert '5,000 tok/s/device | 10 TFLOP/s/device | MFU 1.0%' in line
    no_peak = metrics.Progress(total_steps=100, start_step=0, flops_per_step=1e9)
    no_peak.add_tokens(1)
    assert 'mfu' not in no_peak.tick(10)


@pytest.mark.parametrize('family', ['decoder', 't5'])
def test_a_frozen_base_counts_its_weight_matmuls_twice_not_thrice(family):
    """An adapter run: forward and the activations' gradient, no weight gradient;
    attention (activations on both sides) keeps its three passes."""
    from t5x_like.finetuning import lora, prompt_tuning
    if family == 'decoder':
        cfg = decoder.DecoderConfig(vocab_size=64, emb_dim=16, num_heads=4, num_kv_heads=2,
                                    head_dim=8, mlp_dim=32, num_layers=2)
        lengths = {'decoder_target_tokens': 16}
        # From the hand count above: weights 2 * (4096 + 3072) + 2048 per token.
        weights, attention = 16 * (2 * (1024 * 2 + 512 * 2 + 3072) + 2048), 16 * 2 * 1024
        full = decoder.DecoderOnlyModel(config=cfg)
    else:
        cfg = t5.T5Config(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                          num_encoder_layers=2, num_decoder_layers=1)
        lengths = {'encoder_input_tokens': 12, 'decoder_target_tokens': 6}
        attention_over = lambda keys: 2 * 2 * keys * 8 * 2
        weights = 12 * (2 * (4 * 512 + 3072) + 2 * 512) + 6 * (6 * 512 + 3072 + 2 * 16 * 64)
        attention = 12 * 2 * attention_over(12) + 6 * (attention_over(6) / 2
                                                       + attention_over(12))
        full = t5.EncoderDecoderModel(config=cfg)
    assert full.training_flops_per_step(feature_lengths=lengths, batch_size=1) == (
        3 * weights + 3 * attention)
    for adapter in (lora.LoRA(rank=4), prompt_tuning.PromptTuning(length=4)):
        adapted = dataclasses.replace(full, adapter=adapter)
        assert adapted.training_flops_per_step(feature_lengths=lengths, batch_size=1) == (
            2 * weights + 3 * attention)
