"""A task's metric_fns on decoded predictions: the scores equal a recomputation by hand.

The predictor is the real one (predictions.Decoded: greedy `decode.predict_batch`)
of a real T5 that is nudged, on examples whose first input token is even, to copy its
input (so ROUGE-L is not 0 and decoding visibly follows the model). The expected
predictions come from `decode.predict_batch` on batches built here in numpy from
the raw examples, on one device, and are decoded and scored independently.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import data.tasks  # noqa: F401 - registers pydocs_section_titles
import seqio
from t5x_like.decoding import decode
from t5x_like.training import optimizers
from t5x_like.parallel import partitioning
from t5x_like.evaluation import predictions
from t5x_like.training import trainer
from t5x_like.data import pipeline, text_metrics
from t5x_like.models import decoder, t5

LENGTHS = {"inputs": 64, "targets": 16}
NUM_EXAMPLES = 12            # a full batch of 8 and a padded one of 4
CONFIG = t5.T5Config(vocab_size=8192, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                     num_encoder_layers=1, num_decoder_layers=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartlyCopyingModel(t5.EncoderDecoderModel):
    """The real model, plus a large bonus, on rows whose first input token is even,
    for generated token t being input token t: those rows decode to their input."""

    def _nudged(self, logits_BxV, tokens_BxE, position):
        wanted_B = jnp.take(tokens_BxE, jnp.minimum(position, tokens_BxE.shape[1] - 1), axis=1)
        copies_B = tokens_BxE[:, 0] % 2 == 0
        return logits_BxV + 100.0 * copies_B[:, None] * jax.nn.one_hot(
            wanted_B, logits_BxV.shape[-1])

    def decode_prefill(self, params, batch, *, max_decode_length):
        logits_BxV, state = super().decode_prefill(params, batch,
                                                   max_decode_length=max_decode_length)
        tokens_BxE = batch["encoder_input_tokens"]
        return self._nudged(logits_BxV, tokens_BxE, 0), (state, tokens_BxE)

    def decode_step(self, params, state, tokens_B, position):
        inner, tokens_BxE = state
        logits_BxV, inner = super().decode_step(params, inner, tokens_B, position)
        return self._nudged(logits_BxV, tokens_BxE, position + 1), (inner, tokens_BxE)


def expected_predictions(model, params, examples, vocabulary):
    """Greedy predict_batch on batches of 8 built from the raw examples, decoded."""
    texts, config = [], decode.DecodeConfig(max_decode_length=LENGTHS["targets"])
    for start in range(0, len(examples), 8):
        inputs = np.zeros((8, LENGTHS["inputs"]), np.int32)
        for row, ex in enumerate(examples[start:start + 8]):
            inputs[row, :len(ex["inputs"])] = ex["inputs"]
        result = decode.predict_batch(model, params, {"encoder_input_tokens": inputs},
                                        config=config)
        for row in range(len(examples[start:start + 8])):
            ids = [int(i) for i in np.asarray(result.tokens_BxL)[row]]
            ids = ids[:ids.index(1)] if 1 in ids else ids           # EOS and after: dropped
            texts.append(vocabulary.decode(ids))
    return texts


def test_metric_fns_score_decoded_predictions_as_recomputed_by_hand():
    model = PartlyCopyingModel(config=CONFIG)
    partitioner = partitioning.Partitioner()                   # data parallel, 8 devices
    source = pipeline.SeqioDataSource(mixture_or_task_name="pydocs_section_titles",
                                      task_feature_lengths=LENGTHS)
    scorer = source.prediction_metrics(split="validation", num_examples=NUM_EXAMPLES)
    assert scorer.task_names == ["pydocs_section_titles"] and not scorer.needs_scores
    assert scorer.max_target_length == LENGTHS["targets"]
    layout = trainer.state_layout(
        model=model, optimizer=optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule()),
        partitioner=partitioner, feature_lengths=source.model_feature_lengths())
    params = jax.jit(lambda r: nn.unbox(model.init_params(r, batch_size=1, encoder_length=64,
                                                          decoder_length=16)),
                     out_shardings=layout.shardings.params)(jax.random.key(3))
    predictor = predictions.Decoded()
    assert predictor.name == "greedy"
    predict = predictor.bind(model=model, partitioner=partitioner,
                             param_shardings=layout.shardings.params,
                             max_decode_length=scorer.max_target_length)
    scores, examples = scorer.evaluate(predict=lambda batch: predict(params, batch),
                                       score=None, batch_size=8)
    scorer.close()

    task = seqio.get_mixture_or_task("pydocs_section_titles")
    raw = list(task.get_dataset(LENGTHS, split="validation", shuffle=False)
               .take(NUM_EXAMPLES).as_numpy_iterator())
    targets = [ex["targets_pretokenized"].decode() for ex in raw]
    vocabulary = task.output_features["targets"].vocabulary
    want = expected_predictions(model, params, raw, vocabulary)
    assert examples["pydocs_section_titles"] == list(zip(targets, want))
    copied = [i for i, ex in enumerate(raw) if ex["inputs"][0] % 2 == 0]
    assert 0 < len(copied) < NUM_EXAMPLES
    for i in copied:                                           # decoding followed the model
        assert want[i] == vocabulary.decode([int(t) for t in raw[i]["inputs"][:16]])
    post = [text_metrics.normalize_whitespace(t) for t in want]
    expected = {**text_metrics.exact_match(targets, post), **text_metrics.rouge_l(targets, post)}
    assert scores["pydocs_section_titles"] == pytest.approx(expected)
    assert scores["pydocs_section_titles"]["rouge_l"] > 0


def test_a_prefix_lm_is_scored_on_its_decoded_continuation_of_the_prompt():
    """The decoder-only family: seqio's prefix-LM batches (inputs ++ targets, with
    decoder_causal_attention on the prompt) decode from the prompt only; the scorer's
    predictions equal predict_batch on prompt-only batches built here."""
    model = decoder.DecoderOnlyModel(config=decoder.DecoderConfig(
        vocab_size=8192, emb_dim=32, num_heads=3, num_kv_heads=1, head_dim=16, mlp_dim=64,
        num_layers=2))                     # 2: the prompt's attention changes its keys
    partitioner = partitioning.Partitioner()
    source = pipeline.SeqioDataSource(mixture_or_task_name="pydocs_section_titles",
                                      task_feature_lengths=LENGTHS,
                                      feature_converter="prefix_lm")
    scorer = source.prediction_metrics(split="validation", num_examples=8)
    params = jax.jit(lambda r: nn.unbox(model.init_params(r, batch_size=1,
                                                          decoder_length=80)))(jax.random.key(1))
    shardings = jax.tree.map(lambda _: partitioner.sharding(()), params)
    predict = predictions.Decoded().bind(model=model, partitioner=partitioner,
                                         param_shardings=shardings,
                                         max_decode_length=scorer.max_target_length)
    _, examples = scorer.evaluate(predict=lambda batch: predict(params, batch), score=None,
                                  batch_size=8)
    scorer.close()

    task = seqio.get_mixture_or_task("pydocs_section_titles")
    raw = list(task.get_dataset(LENGTHS, split="validation", shuffle=False)
               .take(8).as_numpy_iterator())
    prompts = np.zeros((8, 1 + LENGTHS["inputs"]), np.int32)    # [0] ++ inputs, then 0s
    for row, ex in enumerate(raw):
        prompts[row, 1:1 + len(ex["inputs"])] = ex["inputs"]
    result = decode.predict_batch(
        model, params, {"decoder_input_tokens": prompts,
                        "decoder_causal_attention": (np.arange(prompts.shape[1])
                                                     <= (prompts > 0).sum(1)[:, None])},
        config=decode.DecodeConfig(max_decode_length=LENGTHS["targets"]))
    vocabulary = task.output_features["targets"].vocabulary
    want = [vocabulary.decode(predictions.strip_after_eos(row, eos_id=1))
            for row in np.asarray(result.tokens_BxL)]
    assert [p for _, p in examples["pydocs_section_titles"]] == want
    assert any(want)


def test_predictions_stop_before_eos():
    assert predictions.strip_after_eos(np.array([5, 6, 1, 7]), eos_id=1) == [5, 6]
    assert predictions.strip_after_eos(np.array([5, 6]), eos_id=1) == [5, 6]
    assert predictions.strip_after_eos(np.array([5, 2, 6]), eos_id=2) == [5]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScriptedDecoder(decoder.DecoderOnlyModel):
    """The real decoder, plus a large bonus for generated token t being script[t]."""
    script: tuple[int, ...]

    def _forced(self, logits_BxV, t):
        wanted = jnp.asarray(self.script)[jnp.minimum(t, len(self.script) - 1)]
        return logits_BxV + 100.0 * jax.nn.one_hot(wanted, logits_BxV.shape[-1])

    def decode_prefill(self, params, batch, *, max_decode_length):
        logits_BxV, state = super().decode_prefill(params, batch,
                                                   max_decode_length=max_decode_length)
        return self._forced(logits_BxV, 0), state

    def decode_step(self, params, state, tokens_B, position):
        logits_BxV, state = super().decode_step(params, state, tokens_B, position)
        return self._forced(logits_BxV, position + 1), state


def test_predictions_end_at_the_models_own_eos():
    """A model whose EOS is 5 (an imported Llama's is 2, Llama 3's 128001) generates
    7, 5, 1, 9: its prediction is [7], not [7, 5] (what ending at id 1 gives)."""
    model = ScriptedDecoder(config=decoder.DecoderConfig(
        vocab_size=64, emb_dim=16, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32,
        num_layers=1, eos_token_id=5), script=(7, 5, 1, 9))
    partitioner = partitioning.Partitioner(devices=jax.devices()[:1])
    params = nn.unbox(model.init_params(jax.random.key(0), batch_size=1, decoder_length=8))
    predict = predictions.Decoded().bind(
        model=model, partitioner=partitioner, max_decode_length=4,
        param_shardings=jax.tree.map(lambda _: partitioner.sharding(()), params))
    prompts = np.array([[0, 3, 4, 0], [0, 6, 0, 0]], np.int32)
    causal = (np.arange(4) <= np.array([[2], [1]])).astype(np.int32)
    assert predict(params, {"decoder_input_tokens": prompts,
                            "decoder_causal_attention": causal}) == [[7], [7]]


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
