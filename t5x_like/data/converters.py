"""Feature converters: what each one consumes, and the batch it hands the model.

A seqio feature converter turns task features (`inputs`, `targets`) into the model's
batch features (`encoder_input_tokens`, `decoder_target_tokens`, ...). This module
describes each converter without TensorFlow, so the AOT fit check
(`t5x_like.training.aot`, `launch.compile`) knows the batch shapes on a machine without the
data stack, and training (`pipeline.SeqioDataSource`) builds the real seqio
converter from the same entry. Adding a converter is one entry in `CONVERTERS`;
tests check every entry against seqio's real converter.

The conventions are seqio's, so T5X-style models read the batches unchanged:
  enc_dec    encoder_* [B, inputs], decoder_* [B, targets]
  lm         decoder_* [B, targets]; loss on every real token
  prefix_lm  decoder_* [B, inputs + targets] holding inputs ++ targets, plus
             decoder_causal_attention (1 on the prefix and one position after it:
             bidirectional there); loss on the targets part only
Packing adds `<prefix>_segment_ids` and `<prefix>_positions` for each packed stream.

Prompt tuning (finetuning/prompt_tuning.py) asks for `soft_prompt_length` N: every
example's `inputs` then start with N `SOFT_PROMPT_ID` placeholders, which the model
replaces by its learned vectors, and the encoder (or the prefix) is N longer than
TASK_FEATURE_LENGTHS says (data/seqio_converters.py adds them, before packing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from t5x_like import errors

# The placeholder of a soft prompt's positions. Any id but padding's 0 would do (the
# model never reads its embedding); 2 is the unknown token of T5's vocabularies.
SOFT_PROMPT_ID = 2

_DECODER = ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights")
_PACKING = ("segment_ids", "positions")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Converter:
    """One feature converter.

    Attributes:
      consumes: the task features it reads (a task must emit exactly these).
      seqio_class: the seqio class implementing it (built by the data pipeline).
      seqio_kwargs: extra constructor arguments for that class.
      decoder_length: task lengths -> decoder length.
      encoder_length: task lengths -> encoder length (None: decoder-only).
      extra_decoder_features: unpacked decoder features beyond the standard three.
    """
    consumes: tuple[str, ...]
    seqio_class: str
    decoder_length: Callable[[Mapping[str, int]], int]
    encoder_length: Callable[[Mapping[str, int]], int] | None = None
    extra_decoder_features: tuple[str, ...] = ()
    seqio_kwargs: Mapping[str, object] = dataclasses.field(default_factory=dict)


CONVERTERS: dict[str, Converter] = {
    "enc_dec": Converter(consumes=("inputs", "targets"),
                         seqio_class="EncDecFeatureConverter",
                         encoder_length=lambda lengths: lengths["inputs"],
                         decoder_length=lambda lengths: lengths["targets"]),
    "lm": Converter(consumes=("targets",), seqio_class="LMFeatureConverter",
                    decoder_length=lambda lengths: lengths["targets"]),
    "prefix_lm": Converter(consumes=("inputs", "targets"),
                           seqio_class="PrefixLMFeatureConverter",
                           seqio_kwargs={"loss_on_targets_only": True},
                           decoder_length=lambda lengths: lengths["inputs"] + lengths["targets"],
                           extra_decoder_features=("decoder_causal_attention",)),
}


def get(name: str) -> Converter:
    if name not in CONVERTERS:
        raise errors.ConfigError(f"feature_converter {name!r} is not supported",
                                 fix=f"choose from {sorted(CONVERTERS)}")
    return CONVERTERS[name]


def check_soft_prompt(converter: str, soft_prompt_length: int) -> None:
    """A soft prompt goes in front of `inputs`: the converter must consume them."""
    if soft_prompt_length < 0:
        raise errors.ConfigError(f"soft_prompt_length is {soft_prompt_length}",
                                 fix="use 0 (no soft prompt) or the prompt's length")
    if soft_prompt_length and "inputs" not in get(converter).consumes:
        raise errors.ConfigError(
            f"prompt tuning puts its prompt before the inputs, and the {converter!r} "
            "converter's tasks have none (targets only)",
            fix="prompt-tune on an inputs/targets task ('enc_dec' or 'prefix_lm')")


def with_soft_prompt(task_feature_lengths: Mapping[str, int],
                     soft_prompt_length: int) -> dict[str, int]:
    """The task lengths once N placeholders lead every example's inputs."""
    lengths = dict(task_feature_lengths)
    if soft_prompt_length:
        lengths["inputs"] += soft_prompt_length
    return lengths


def model_feature_lengths(task_feature_lengths: Mapping[str, int], *, converter: str,
                          pack: bool = True, soft_prompt_length: int = 0) -> dict[str, int]:
    """The batch features `converter` produces from these task lengths, with lengths.

    e.g. ({'inputs': 512, 'targets': 114}, 'enc_dec') -> encoder_input_tokens: 512,
    encoder_segment_ids: 512, ..., decoder_target_tokens: 114, ...; a soft prompt's
    placeholders lengthen the encoder (or the prefix) by `soft_prompt_length`.
    """
    spec = get(converter)
    check_soft_prompt(converter, soft_prompt_length)
    missing = [k for k in spec.consumes if k not in task_feature_lengths]
    if missing:
        raise errors.ConfigError(
            f"the {converter} converter needs task lengths for {missing}; got "
            f"{dict(task_feature_lengths)}",
            fix="add them to TASK_FEATURE_LENGTHS (SeqioDataSource.task_feature_lengths)")
    task_feature_lengths = with_soft_prompt(task_feature_lengths, soft_prompt_length)
    out: dict[str, int] = {}
    if spec.encoder_length is not None:
        encoder = int(spec.encoder_length(task_feature_lengths))
        out["encoder_input_tokens"] = encoder
        if pack:
            out.update({f"encoder_{p}": encoder for p in _PACKING})
    decoder = int(spec.decoder_length(task_feature_lengths))
    out.update({name: decoder for name in (*spec.extra_decoder_features, *_DECODER)})
    if pack:
        out.update({f"decoder_{p}": decoder for p in _PACKING})
    return out
