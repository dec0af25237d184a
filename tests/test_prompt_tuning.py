"""Prompt tuning (finetuning/prompt_tuning.py): the soft prompt stands exactly where
the data's placeholders are, in packed training rows and in decoding; only the prompt
trains; the data, eval and inference all reserve the same placeholders."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from t5x_like import errors, tree_paths
from t5x_like.data import converters
from t5x_like.decoding import decode, inference
from t5x_like.finetuning import lora, prompt_tuning, trainable
from t5x_like.models import decoder, t5
from t5x_like.parallel import partitioning
from t5x_like.training import optimizers, run_config, trainer

T5_CONFIG = t5.T5Config(vocab_size=256, emb_dim=32, num_heads=8, head_dim=8, mlp_dim=64,
                        num_encoder_layers=2, num_decoder_layers=2)
DECODER_CONFIG = decoder.DecoderConfig(vocab_size=256, emb_dim=32, num_heads=8,
                                       num_kv_heads=4, head_dim=8, mlp_dim=64, num_layers=2)
N = 3
ADAPTER = prompt_tuning.PromptTuning(length=N)
# The tokens whose embeddings the prompt is set to: the prompted model on
# placeholders must then be the base model on these tokens, bit for bit.
STAND_INS = [5, 9, 13]
SLOTS = [converters.SOFT_PROMPT_ID] * N
INIT_LENGTHS = {"encoder_input_tokens": 16, "decoder_target_tokens": 16}


def make_model(family, adapter=ADAPTER):
    if family == "t5":
        return t5.EncoderDecoderModel(config=T5_CONFIG, adapter=adapter)
    return decoder.DecoderOnlyModel(config=DECODER_CONFIG, adapter=adapter)


def init(model, seed):
    return jax.device_get(nn.unbox(model.init_params(
        jax.random.key(seed), batch_size=1, **model.init_lengths(INIT_LENGTHS))))


def params_pair(family):
    """(base params, prompted params whose prompt is the base's embeddings of
    STAND_INS): fresh prompt on the base, as a prompt-tuning run starts."""
    base = init(make_model(family, adapter=None), seed=7)
    prompt_path = {"t5": "encoder/soft_prompt/prompt", "decoder": "soft_prompt/prompt"}[family]
    fresh = tree_paths.flatten(init(make_model(family), seed=0))
    assert [k for k in fresh if "prompt" in k] == [prompt_path]
    assert fresh[prompt_path].shape == (N, 32)
    table = tree_paths.flatten(base)["token_embedder/embedding"]
    prompt = traverse_util.unflatten_dict({prompt_path: table[STAND_INS]}, sep="/")
    return base, trainable.merge(prompt, base)


def packed(family, examples, *, prefix, width=32):
    """A packed batch of one row, as seqio packs it, of (inputs, targets) examples
    whose inputs start with `prefix` (placeholders, or the stand-in tokens)."""
    def stream(seqs, *, shift):
        tokens, inputs, segments, positions = (np.zeros(width, np.int32) for _ in range(4))
        at = 0
        for i, seq in enumerate(seqs):
            n = len(seq)
            tokens[at:at + n] = seq
            inputs[at:at + n] = [0, *seq[:-1]] if shift else seq
            segments[at:at + n] = i + 1
            positions[at:at + n] = np.arange(n)
            at += n
        return tokens, inputs, segments, positions
    if family == "t5":
        enc, _, enc_seg, enc_pos = stream([prefix + x for x, _ in examples], shift=False)
        dec, dec_in, dec_seg, dec_pos = stream([y for _, y in examples], shift=True)
        batch = {"encoder_input_tokens": enc, "encoder_segment_ids": enc_seg,
                 "encoder_positions": enc_pos, "decoder_target_tokens": dec,
                 "decoder_input_tokens": dec_in, "decoder_segment_ids": dec_seg,
                 "decoder_positions": dec_pos, "decoder_loss_weights": (dec > 0) * 1}
    else:   # prefix LM: inputs ++ targets, bidirectional over the prefix and one more
        seqs = [prefix + x + y for x, y in examples]
        dec, dec_in, dec_seg, dec_pos = stream(seqs, shift=True)
        causal, weights = np.zeros(width, np.int32), np.zeros(width, np.int32)
        at = 0
        for (x, y), seq in zip(examples, seqs):
            prefix_length = len(seq) - len(y)
            causal[at:at + prefix_length + 1] = 1
            weights[at + prefix_length:at + len(seq)] = 1
            at += len(seq)
        batch = {"decoder_target_tokens": dec, "decoder_input_tokens": dec_in,
                 "decoder_segment_ids": dec_seg, "decoder_positions": dec_pos,
                 "decoder_causal_attention": causal, "decoder_loss_weights": weights}
    return {k: v[None] for k, v in batch.items()}


EXAMPLES = [([40, 41, 42, 1], [60, 61, 1]), ([50, 51, 1], [70, 1]), ([44, 45, 46, 47, 1], [80, 81, 82, 1])]


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_the_prompt_stands_where_each_packed_example_has_its_placeholders(family):
    base, prompted = params_pair(family)
    with_placeholders = packed(family, EXAMPLES, prefix=SLOTS)
    with_tokens = packed(family, EXAMPLES, prefix=STAND_INS)
    got = make_model(family).logits(prompted, with_placeholders)
    want = make_model(family, adapter=None).logits(base, with_tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # ...and the placeholders themselves are never read: the base model on them differs.
    unprompted = make_model(family, adapter=None).logits(base, with_placeholders)
    assert not np.allclose(np.asarray(unprompted), np.asarray(want))


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_decoding_with_the_prompt_is_decoding_its_stand_in_tokens(family):
    base, prompted = params_pair(family)
    prompts = [[40, 41, 42, 1], [50, 1], [44, 45, 46, 47, 48, 1]]   # ragged: padding differs
    config = decode.DecodeConfig(max_decode_length=6)
    converter = "enc_dec" if family == "t5" else "prefix_lm"
    layout = inference.PromptLayout(converter=converter, soft_prompt_length=N)
    assert layout.model_tokens([40, 1])[:N + 1] == (
        SLOTS + [40] if family == "t5" else [0] + SLOTS)
    got = decode.predict_batch(make_model(family), prompted,
                               layout.batch(prompts, width=12), config=config)
    plain = inference.PromptLayout(converter=converter)
    want = decode.predict_batch(make_model(family, adapter=None), base,
                                plain.batch([STAND_INS + p for p in prompts], width=12),
                                config=config)
    np.testing.assert_array_equal(np.asarray(got.tokens_BxL), np.asarray(want.tokens_BxL))
    np.testing.assert_array_equal(np.asarray(got.scores_B), np.asarray(want.scores_B))


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_steps_train_the_prompt_only_and_leave_the_base_bitwise_alone(family):
    """Adafactor at a constant 0.3, configs/runs/finetune_prompt.gin's recipe."""
    model = make_model(family)
    optimizer = optimizers.adafactor(learning_rate=optax.constant_schedule(0.3))
    partitioner = partitioning.Partitioner(devices=jax.devices()[:1])
    batch = packed(family, EXAMPLES, prefix=SLOTS)
    lengths = {k: v.shape[1] for k, v in batch.items()}
    layout = trainer.state_layout(model=model, optimizer=optimizer, partitioner=partitioner,
                                  feature_lengths=lengths)
    state = trainer.init_train_state(model=model, optimizer=optimizer, partitioner=partitioner,
                                     feature_lengths=lengths, seed=0, layout=layout)
    _, prompted = params_pair(family)
    prompt, base = trainable.split(prompted, prompt_tuning.TRAINABLE_PATTERN)
    state = state.replace(params=jax.device_put(prompt, layout.shardings.params))
    frozen = jax.device_put(base, layout.frozen.shardings)
    step = trainer.jit_train_step(
        trainer.make_train_step(model=model, optimizer=optimizer, dropout_seed=0),
        partitioner=partitioner, layout=layout, batch_feature_names=tuple(batch))
    losses = []
    for _ in range(4):
        state, metrics = step(state, partitioning.global_batch(batch, partitioner), frozen)
        losses.append(float(metrics["loss"]))
    assert list(tree_paths.flatten(state.params)) == list(tree_paths.flatten(prompt))
    moved = next(iter(tree_paths.flatten(state.params).values()))
    assert not np.array_equal(np.asarray(moved), next(iter(tree_paths.flatten(prompt).values())))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), frozen, base)
    assert losses[-1] < losses[0]


def test_data_eval_and_inference_reserve_the_placeholders():
    pytest.importorskip("seqio")
    import data.tasks  # noqa: F401 - registers pydocs_section_titles
    from t5x_like.data import pipeline
    lengths = {"inputs": 64, "targets": 16}
    plain = pipeline.SeqioDataSource(mixture_or_task_name="pydocs_section_titles",
                                     task_feature_lengths=lengths, shuffle=False, pack=False)
    prompted = dataclasses.replace(plain, soft_prompt_length=N)
    assert prompted.model_feature_lengths()["encoder_input_tokens"] == 64 + N
    assert plain.stream_identity() != prompted.stream_identity()
    assert "soft_prompt_length" not in plain.stream_identity()   # old runs' stream names
    take = lambda source: next(source.iterator(per_host_batch_size=4, shard_index=0,
                                               num_shards=1, start_step=0))
    a, b = take(plain), take(prompted)
    # Every example keeps all its tokens, behind N placeholders.
    np.testing.assert_array_equal(b["encoder_input_tokens"][:, :N], np.full((4, N), 2))
    np.testing.assert_array_equal(b["encoder_input_tokens"][:, N:], a["encoder_input_tokens"])
    np.testing.assert_array_equal(b["decoder_target_tokens"], a["decoder_target_tokens"])
    # Packed: each example of a row starts with its own placeholders.
    row = take(dataclasses.replace(prompted, pack=True,
                                   task_feature_lengths={"inputs": 256, "targets": 16}))
    tokens, positions = row["encoder_input_tokens"], row["encoder_positions"]
    starts = (positions == 0) & (row["encoder_segment_ids"] > 0)
    assert starts.sum() > 4                     # several examples per row
    for offset in range(N):
        np.testing.assert_array_equal(tokens[np.roll(starts, offset, axis=1)], 2)
    # Eval's prediction features are the same (unpacked, N longer).
    metrics = prompted.eval_sources()["pydocs_section_titles"].prediction_metrics()
    try:
        assert metrics._evaluator.model_feature_shapes["encoder_input_tokens"] == (64 + N,)
    finally:
        metrics.close()


def test_disagreeing_prompt_lengths_and_targets_only_data_are_config_errors():
    from t5x_like.data import synthetic
    source = synthetic.SyntheticEncDecSource(encoder_length=16, decoder_length=8,
                                             vocab_size=256)
    with pytest.raises(errors.ConfigError, match="soft prompt has 3 vectors but the data "
                       "puts 0 placeholder"):
        run_config.check_soft_prompt(make_model("t5"), source)
    run_config.check_soft_prompt(make_model("t5", adapter=None), source)
    with pytest.raises(errors.ConfigError, match="'lm' converter's tasks have none"):
        converters.model_feature_lengths({"targets": 8}, converter="lm", soft_prompt_length=N)
    with pytest.raises(errors.ConfigError, match="length=0"):
        prompt_tuning.PromptTuning(length=0)
    with pytest.raises(errors.ConfigError, match="init='random'"):
        prompt_tuning.PromptTuning(init="random")
    with pytest.raises(errors.ConfigError, match="tokens must be distinct"):
        prompt_tuning.PromptTuning(length=20, init="vocabulary", vocabulary_sample_from=10)


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_the_vocabulary_init_is_the_base_on_sampled_common_tokens(family):
    """Lester et al.'s init: the prompted model at step 0 is the base model with
    `length` distinct tokens from the vocabulary's most common in front, bit for bit."""
    adapter = prompt_tuning.PromptTuning(length=N, init="vocabulary",
                                         vocabulary_sample_from=40)
    base = init(make_model(family, adapter=None), seed=7)
    fresh, _ = trainable.split(init(make_model(family, adapter), seed=0),
                               prompt_tuning.TRAINABLE_PATTERN)
    started = make_model(family, adapter).started_from_base(
        trainable_params=fresh, frozen_params=base, seed=11)

    ids = adapter.vocabulary_ids(seed=11, vocab_size=256)
    assert len(set(ids.tolist())) == N and all(3 <= i < 43 for i in ids)
    np.testing.assert_array_equal(ids, adapter.vocabulary_ids(seed=11, vocab_size=256))
    assert not np.array_equal(ids, adapter.vocabulary_ids(seed=12, vocab_size=256))

    got = make_model(family, adapter).logits(trainable.merge(started, base),
                                             packed(family, EXAMPLES, prefix=SLOTS))
    want = make_model(family, adapter=None).logits(
        base, packed(family, EXAMPLES, prefix=[int(i) for i in ids]))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    # The uniform init (the default) and LoRA leave what init made.
    for other in (ADAPTER, lora.LoRA()):
        assert make_model(family, other).started_from_base(
            trainable_params=fresh, frozen_params=base, seed=11) is fresh
