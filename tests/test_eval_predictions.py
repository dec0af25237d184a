"""A task's metric_fns on predictions: the scores equal a recomputation by hand.

The predictor is the real teacher-forced argmax (predictions.py) of a real T5 whose
logits are nudged towards the target on some examples (so exact match and ROUGE-L
are neither 0 nor 100); the expected predictions are recomputed from the same
logits in numpy, one example at a time, and decoded and scored independently.
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import linen as nn

import data.tasks  # noqa: F401 - registers pydocs_section_titles
import seqio
from t5x_like import optimizers, partitioning, predictions, trainer
from t5x_like.data import pipeline, text_metrics
from t5x_like.models import t5

LENGTHS = {"inputs": 64, "targets": 16}
NUM_EXAMPLES = 12            # a full batch of 8 and a padded one of 4
CONFIG = t5.T5Config(vocab_size=8192, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                     num_encoder_layers=1, num_decoder_layers=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartlyRightModel(t5.EncoderDecoderModel):
    """The real model, plus a large bonus on the target token for examples whose first
    input token is even: their teacher-forced argmax is exactly the target."""

    def logits(self, params, batch, *, dropout_rng=None):
        logits = super().logits(params, batch, dropout_rng=dropout_rng)
        echo = (batch["encoder_input_tokens"][:, :1, None] % 2 == 0)
        return logits + 100.0 * echo * jax.nn.one_hot(batch["decoder_target_tokens"],
                                                      logits.shape[-1])


def expected_predictions(model, params, examples, vocabulary):
    """Teacher-forced argmax of each example alone, in numpy, decoded."""
    texts, logits_fn = [], jax.jit(model.logits)
    for ex in examples:
        targets = np.zeros((1, LENGTHS["targets"]), np.int32)
        targets[0, :len(ex["targets"])] = ex["targets"]
        inputs = np.zeros((1, LENGTHS["inputs"]), np.int32)
        inputs[0, :len(ex["inputs"])] = ex["inputs"]
        batch = {"encoder_input_tokens": inputs, "decoder_target_tokens": targets,
                 "decoder_input_tokens": np.concatenate([[[0]], targets[:, :-1]], axis=1)}
        logits = np.asarray(logits_fn(params, batch))
        ids = list(logits[0].argmax(-1)[:len(ex["targets"])])
        ids = ids[:ids.index(1)] if 1 in ids else ids             # EOS and after: dropped
        texts.append(vocabulary.decode([int(i) for i in ids]))
    return texts


def test_metric_fns_score_teacher_forced_predictions_as_recomputed_by_hand():
    model = PartlyRightModel(config=CONFIG)
    partitioner = partitioning.Partitioner()                   # data parallel, 8 devices
    source = pipeline.SeqioDataSource(mixture_or_task_name="pydocs_section_titles",
                                      task_feature_lengths=LENGTHS)
    scorer = source.prediction_metrics(split="validation", num_examples=NUM_EXAMPLES)
    assert scorer.task_names == ["pydocs_section_titles"] and not scorer.needs_scores
    layout = trainer.state_layout(
        model=model, optimizer=optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule()),
        partitioner=partitioner, feature_lengths=source.model_feature_lengths())
    params = jax.jit(lambda r: nn.unbox(model.init_params(r, batch_size=1, encoder_length=64,
                                                          decoder_length=16)),
                     out_shardings=layout.shardings.params)(jax.random.key(3))
    predict = predictions.TeacherForcedArgmax().bind(
        model=model, partitioner=partitioner, param_shardings=layout.shardings.params)
    scores, examples = scorer.evaluate(predict=lambda batch: predict(params, batch),
                                       score=None, batch_size=8)
    scorer.close()

    task = seqio.get_mixture_or_task("pydocs_section_titles")
    raw = list(task.get_dataset(LENGTHS, split="validation", shuffle=False)
               .take(NUM_EXAMPLES).as_numpy_iterator())
    targets = [ex["targets_pretokenized"].decode() for ex in raw]
    want = expected_predictions(model, params, raw,
                                task.output_features["targets"].vocabulary)
    assert examples["pydocs_section_titles"] == list(zip(targets, want))
    post = [text_metrics.normalize_whitespace(t) for t in want]
    echoed = sum(ex["inputs"][0] % 2 == 0 for ex in raw)
    assert 0 < echoed < NUM_EXAMPLES
    expected = {**text_metrics.exact_match(targets, post), **text_metrics.rouge_l(targets, post)}
    assert scores["pydocs_section_titles"] == pytest.approx(expected)
    assert scores["pydocs_section_titles"]["exact_match"] == pytest.approx(
        100 * echoed / NUM_EXAMPLES)


def test_teacher_forced_argmax_stops_at_eos_and_keeps_target_positions_only():
    assert predictions.strip_after_eos(np.array([5, 6, 1, 7])) == [5, 6]
    assert predictions.strip_after_eos(np.array([5, 6])) == [5, 6]


def test_log_likelihood_is_minus_the_summed_cross_entropy_per_row():
    model = t5.EncoderDecoderModel(config=dataclasses.replace(CONFIG, vocab_size=40),
                                   label_smoothing=0.1)
    partitioner = partitioning.Partitioner()
    rng = np.random.default_rng(0)
    targets = rng.integers(2, 40, (8, 5)).astype(np.int32)
    targets[::2, 3:] = 0                                        # padded rows
    batch = {"encoder_input_tokens": rng.integers(2, 40, (8, 6)).astype(np.int32),
             "decoder_target_tokens": targets,
             "decoder_input_tokens": np.concatenate([np.zeros((8, 1), np.int32),
                                                     targets[:, :-1]], 1),
             "decoder_loss_weights": (targets > 0).astype(np.int32)}
    params = jax.jit(lambda r: nn.unbox(model.init_params(r, batch_size=1, encoder_length=6,
                                                          decoder_length=5)))(jax.random.key(0))
    shardings = jax.tree.map(lambda _: partitioner.sharding(()), params)
    got = predictions.log_likelihood_fn(model=model, partitioner=partitioner,
                                        param_shardings=shardings)(params, batch)
    logits = np.asarray(jax.jit(model.logits)(params, batch), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, (token * (targets > 0)).sum(-1), rtol=1e-5)
