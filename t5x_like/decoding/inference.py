"""Inference to files: prompts in (a JSONL file or a seqio task split), decodes out.

`launch/infer.py` parses flags and gin and calls the functions here, in this order,
so that bad input fails before any weight is read or anything is compiled:

  source (a run's checkpoint: `from_run`, or a Hugging Face directory: `from_hf`)
  -> prompts (`read_prompts` / `task_prompts`) -> `run_inference` (length checks,
  weights, batches through `decode.predict_batch`, one JSON line per prompt).

Input file: one JSON object per line, `{"inputs": "some text"}` (tokenized with the
run's task vocabulary, or the HF directory's tokenizer, EOS appended where the task
or model appends one) or `{"input_ids": [5, 17, ...]}` (used as they are). Blank
lines are skipped. Output: one object per prompt, in input order: `inputs`,
`input_ids`, `prediction` (text; absent without a tokenizer), `prediction_ids` (up
to, not including, EOS), `score` (decode.DecodeResult.scores_B), and `targets`
for prompts read from a task.

How prompt ids become model features depends only on the feature converter the
model was trained with (`PromptLayout`): 'enc_dec' -> encoder_input_tokens;
'lm' -> decoder_input_tokens = [BOS] + ids with decoder_prompt_lengths; 'prefix_lm'
-> decoder_input_tokens = [0] + ids with decoder_causal_attention, as in training.
Single process: the batch is the whole global batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from t5x_like import run_dir, storage
from t5x_like.checkpointing import base_model, checkpoints
from t5x_like.data import converters
from t5x_like.decoding import decode
from t5x_like.parallel import partitioning
from t5x_like.parallel import params_layout

log = logging.getLogger(__name__)


class InferError(ValueError):
    """Bad input; the message says what is wrong and what to do."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextCodec:
    """Text <-> ids for one model: a tokenizer plus the EOS convention of its inputs."""

    tokenizer: Any            # .encode(text) -> ids, .decode(ids) -> text
    eos_id: int
    append_eos: bool          # the task (or model) ends every input with EOS

    def encode(self, text: str) -> list[int]:
        ids = [int(i) for i in self.tokenizer.encode(text)]
        return ids + [self.eos_id] if self.append_eos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptLayout:
    """How prompt ids become the model's batch features (see the module docstring)."""

    converter: str            # 'enc_dec' | 'lm' | 'prefix_lm'
    bos_id: int | None = 0    # prepended for 'lm' (None: nothing)
    # A prompt-tuned model's placeholders, before the inputs as in training
    # (data/seqio_converters.py); its soft prompt replaces them.
    soft_prompt_length: int = 0

    def model_tokens(self, ids: Sequence[int]) -> list[int]:
        placeholders = [converters.SOFT_PROMPT_ID] * self.soft_prompt_length
        if self.converter == "enc_dec":
            return [*placeholders, *ids]
        if self.converter == "prefix_lm":
            return [0, *placeholders, *ids]
        return list(ids) if self.bos_id is None else [self.bos_id, *ids]

    def batch(self, prompts: Sequence[Sequence[int]], *, width: int) -> dict[str, np.ndarray]:
        rows = [self.model_tokens(p) for p in prompts]
        tokens = np.zeros((len(rows), width), np.int32)
        for row, ids in zip(tokens, rows):
            row[:len(ids)] = ids
        if self.converter == "enc_dec":
            return {"encoder_input_tokens": tokens}
        lengths = np.array([len(ids) for ids in rows], np.int32)
        if self.converter == "prefix_lm":
            causal = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
            return {"decoder_input_tokens": tokens, "decoder_causal_attention": causal}
        return {"decoder_input_tokens": tokens, "decoder_prompt_lengths": lengths}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Source:
    """A model to decode with, described before its weights are read (the slow part)."""

    name: str                          # for the log, e.g. 'runs/base step 300'
    partitioner: partitioning.Partitioner
    layout: PromptLayout
    codec: TextCodec | None            # None: prompts must be input_ids
    eos_id: int
    max_input_length: int              # default prompt slots of the cache
    task_lengths: Mapping[str, int]    # lengths to read a task split with
    load: Callable[[], tuple[Any, Any]]   # -> (model, params placed on the mesh)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prompt:
    where: str                 # 'line 3' or 'example 3', for messages
    ids: list[int]
    text: str | None = None
    targets: str | None = None


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------

def read_prompts(path: str, codec: TextCodec | None) -> list[Prompt]:
    """The prompts of a JSONL file; InferError naming the line of any bad one."""
    if not storage.exists(path) or storage.is_dir(path):
        raise InferError(f"prompts file {path} does not exist — pass a JSONL file with "
                         'one {"inputs": "..."} object per line')
    prompts = []
    for number, line in enumerate(storage.read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        prompts.append(_parse_line(line, f"line {number} of {path}", codec))
    if not prompts:
        raise InferError(f"prompts file {path} is empty — write one JSON object per line, "
                         'e.g. {"inputs": "def fibonacci(n):"}')
    return prompts


def _parse_line(line: str, where: str, codec: TextCodec | None) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InferError(f"{where} is not valid JSON ({e.msg}) — each line must be an "
                         'object like {"inputs": "text"} or {"input_ids": [5, 17]}') from None
    if isinstance(record, dict) and isinstance(record.get("inputs"), str):
        if codec is None:
            raise InferError(f"{where} gives text, but this model has no tokenizer — give "
                             'token ids instead: {"input_ids": [...]}')
        ids, text = codec.encode(record["inputs"]), record["inputs"]
    elif isinstance(record, dict) and isinstance(record.get("input_ids"), list) and all(
            isinstance(i, int) and i >= 0 for i in record["input_ids"]):
        ids = record["input_ids"]
        text = codec.decode(ids) if codec else None
    else:
        raise InferError(f'{where} has neither "inputs" (a string) nor "input_ids" (a list '
                         'of non-negative ints) — e.g. {"inputs": "text"}')
    if not ids:
        raise InferError(f"{where} is an empty prompt — give it at least one token")
    return Prompt(where=where, ids=ids, text=text)


def task_prompts(task: str, *, split: str, lengths: Mapping[str, int],
                 limit: int | None) -> list[Prompt]:
    """The examples of a seqio task split, in order (needs the data layer)."""
    from t5x_like.data import task_examples
    prompts = [Prompt(where=f"example {i} of {task}:{split}", ids=ex["input_ids"],
                      text=ex["inputs"], targets=ex["targets"])
               for i, ex in enumerate(task_examples.examples(
                   task, split=split, feature_lengths=lengths, limit=limit))]
    if not prompts:
        raise InferError(f"task {task} split {split} has no examples — check the task's "
                         "files, or choose another --split")
    return prompts


# ---------------------------------------------------------------------------
# Sources of weights
# ---------------------------------------------------------------------------

def abstract_params(model: Any, partitioner: partitioning.Partitioner) -> Any:
    """The model's parameters as ShapeDtypeStructs in training's fitted shardings.

    Parameter shapes do not depend on sequence lengths, hence the 1s.
    """
    lengths = {"encoder_input_tokens": 1, "decoder_target_tokens": 1}
    return params_layout.for_model(model=model, partitioner=partitioner,
                                 feature_lengths=lengths).abstract_with_shardings()


def checkpoint_step(directory: str, wanted: str | None) -> int:
    """The step to load: `wanted` (a number) or the newest; InferError if absent."""
    steps = checkpoints.committed_steps(directory) if storage.is_dir(directory) else []
    if not steps:
        raise InferError(f"no checkpoints in {directory} — train first (python -m "
                         "launch.train with the same --gin_file and MODEL_DIR), or load "
                         "a Hugging Face directory with --hf_checkpoint")
    if wanted in (None, "latest"):
        return steps[-1]
    if not wanted.isdigit() or int(wanted) not in steps:
        raise InferError(f"no checkpoint at step {wanted} in {directory} — steps there: "
                         f"{steps}; pass one of them or --checkpoint=latest")
    return int(wanted)


def from_run(*, model_dir: str, checkpoint: str | None, run: Any) -> Source:
    """A run's checkpoint (its RunConfig from gin: model, mesh, task vocabulary)."""
    directory = run_dir.checkpoints(model_dir)
    step = checkpoint_step(directory, checkpoint)
    data = run.train_data
    converter = getattr(data, "feature_converter", None)
    if converter is None:
        raise InferError("the run has no seqio task to take the vocabulary from — use a "
                         "run gin file with a task (e.g. configs/base.gin)")
    from t5x_like.data import task_examples
    vocabulary, append_eos = task_examples.prompt_vocabulary(data.mixture_or_task_name)
    lengths = dict(data.task_feature_lengths)
    soft_prompt = run.model.soft_prompt_length
    prompt_slots = {"enc_dec": lengths.get("inputs", 0) + soft_prompt,
                    "lm": lengths.get("targets"),
                    "prefix_lm": lengths.get("inputs", 0) + soft_prompt + 1}[converter]
    partitioner = run.partitioner()

    def load():
        target = abstract_params(run.model, partitioner)
        reader = checkpoints.CheckpointReader(directory)
        try:        # an adapter run's checkpoint: its adapters on their recorded base
            return run.model, base_model.restore_model_params(
                reader, step, model=run.model, abstract_params=target)
        finally:
            reader.close()
    return Source(name=f"{model_dir} step {step}", partitioner=partitioner,
                  layout=PromptLayout(converter=converter, soft_prompt_length=soft_prompt),
                  codec=TextCodec(tokenizer=vocabulary, eos_id=vocabulary.eos_id,
                                  append_eos=append_eos),
                  eos_id=vocabulary.eos_id, max_input_length=prompt_slots,
                  task_lengths=lengths, load=load)


def from_hf(directory: str, *, partitioner: partitioning.Partitioner) -> Source:
    """A Hugging Face safetensors directory; its config.json decides the model."""
    from t5x_like.hf import llama, safetensors_io, t5, tokenizer
    from t5x_like.models import decoder, t5 as t5_model
    if not storage.exists(storage.join(directory, "config.json")):
        raise InferError(f"{directory} has no config.json — pass a directory written by "
                         "transformers' save_pretrained (config.json + *.safetensors)")
    hf_config = safetensors_io.read_config(directory)
    model_type = hf_config.get("model_type")
    eos = hf_config.get("eos_token_id", 1)
    eos = int(eos[0] if isinstance(eos, list) else eos)

    if model_type == "llama":
        layout = PromptLayout(converter="lm", bos_id=hf_config.get("bos_token_id"))
        append_eos = False

        def load():
            model = decoder.DecoderOnlyModel(config=llama.config_from_hf(hf_config))
            target = abstract_params(model, partitioner)
            _, params = llama.import_checkpoint(
                directory, shardings=jax.tree.map(lambda a: a.sharding, target))
            return model, params
    elif model_type == "t5":
        layout, append_eos = PromptLayout(converter="enc_dec"), True    # T5 inputs end in EOS

        def load():
            # The import decides from the tensors whether the output layer is tied, so
            # the layout (and the shardings) are known only after reading them.
            config, params = t5.import_checkpoint(directory)
            model = t5_model.EncoderDecoderModel(config=config)
            target = abstract_params(model, partitioner)
            return model, jax.device_put(params, jax.tree.map(lambda a: a.sharding, target))
    else:
        raise InferError(f"{directory} holds a {model_type!r} model — supported: 'llama', 't5'")
    text = tokenizer.load(directory)
    return Source(name=directory, partitioner=partitioner, layout=layout,
                  codec=text and TextCodec(tokenizer=text, eos_id=eos, append_eos=append_eos),
                  eos_id=eos, max_input_length=_hf_prompt_slots(directory, hf_config),
                  task_lengths={}, load=load)


# transformers' `model_max_length` when a tokenizer sets none (VERY_LARGE_INTEGER).
_HF_UNSET_LENGTH = int(1e30)


def _hf_prompt_slots(directory: str, hf_config: Mapping[str, Any]) -> int:
    """Default prompt slots for a Hugging Face model: the input length it was made for.

    Llama: config.json's max_position_embeddings, the context its positions were
    trained on (2048, transformers' LlamaConfig default, when absent). T5's relative
    positions set no limit, so: config.json's n_positions where present (the original
    T5 checkpoints have 512), else tokenizer_config.json's model_max_length unless it
    is transformers' "unset" value, else 512, T5's pretraining input length.
    """
    if hf_config.get("model_type") == "llama":
        return int(hf_config.get("max_position_embeddings") or 2048)
    if hf_config.get("n_positions"):
        return int(hf_config["n_positions"])
    path = storage.join(directory, "tokenizer_config.json")
    if storage.exists(path):
        length = json.loads(storage.read_text(path)).get("model_max_length")
        if length and length < _HF_UNSET_LENGTH:
            return int(length)
    return 512


# ---------------------------------------------------------------------------
# Decoding to a file
# ---------------------------------------------------------------------------

def run_inference(source: Source, prompts: Sequence[Prompt], *, output: str,
                  config: decode.DecodeConfig, batch_size: int,
                  max_input_length: int | None = None, seed: int = 0) -> dict[str, float]:
    """Decodes every prompt into `output` (JSONL, input order); returns a summary.

    Checks every prompt against the cache's prompt slots and the batch against the
    mesh before reading any weight. The last batch is filled up with copies of its
    first prompt, whose results are dropped. EOS is the vocabulary's (or config.json's).
    """
    if jax.process_count() > 1:
        raise InferError("launch.infer runs in one process (its batches are whole global "
                         "batches) — start it without --num_processes")
    width = max_input_length or source.max_input_length
    for prompt in prompts:
        length = len(source.layout.model_tokens(prompt.ids))
        if length > width:
            raise InferError(f"the prompt on {prompt.where} has {length} tokens, more than "
                             f"the {width} prompt slots of the cache — shorten it, or raise "
                             "--max_input_length")
    if batch_size < 1 or batch_size % source.partitioner.data_shards:
        raise InferError(f"--batch_size={batch_size} must be a positive multiple of the "
                         f"{source.partitioner.data_shards} data shards of "
                         f"{source.partitioner}")
    config = dataclasses.replace(config, eos_id=source.eos_id)
    log.info("Loading %s", source.name)
    model, params = source.load()
    log.info("Decoding %d prompts, %d per batch: %s", len(prompts), batch_size, config)
    start, first_batch_s, first_tokens, tokens = time.perf_counter(), None, 0, 0
    # Locally each line is on disk as it is decoded; on an object store the file
    # appears whole when it is closed.
    with storage.open_file(output, "w") as f:
        for index in range(0, len(prompts), batch_size):
            chunk = list(prompts[index:index + batch_size])
            rows = [p.ids for p in chunk] + [chunk[0].ids] * (batch_size - len(chunk))
            result = decode.predict_batch(
                model, params, source.layout.batch(rows, width=width), config=config,
                rng=jax.random.fold_in(jax.random.key(seed), index),
                partitioner=source.partitioner)
            tokens_BxL, lengths_B, scores_B = jax.device_get(
                (result.tokens_BxL, result.lengths_B, result.scores_B))
            for prompt, row, length, score in zip(chunk, tokens_BxL, lengths_B, scores_B):
                f.write(json.dumps(_record(prompt, row[:length], float(score), source.codec,
                                           config.eos_id), ensure_ascii=False) + "\n")
            f.flush()
            tokens += int(lengths_B[:len(chunk)].sum())
            done, elapsed = index + len(chunk), time.perf_counter() - start
            if first_batch_s is None:
                first_batch_s, first_tokens = elapsed, tokens
            log.info("%d/%d prompts | %d tokens | %.0f tok/s", done, len(prompts), tokens,
                     tokens / elapsed)
    seconds = time.perf_counter() - start
    summary = {"prompts": len(prompts), "tokens": tokens, "seconds": seconds,
               "tokens_per_second": tokens / seconds, "first_batch_seconds": first_batch_s,
               "tokens_per_second_after_first_batch": (
                   (tokens - first_tokens) / (seconds - first_batch_s)
                   if len(prompts) > batch_size else None)}
    after = summary["tokens_per_second_after_first_batch"]
    log.info("Wrote %d predictions to %s: %d tokens in %.1f s, %.0f tok/s with compilation "
             "(the first batch took %.1f s)%s", len(prompts), output, tokens, seconds,
             summary["tokens_per_second"], first_batch_s,
             "" if after is None else f", {after:.0f} tok/s after it")
    return summary


def _record(prompt: Prompt, generated: np.ndarray, score: float, codec: TextCodec | None,
            eos_id: int) -> dict[str, Any]:
    ids = [int(t) for t in generated]
    if ids and ids[-1] == eos_id:
        ids = ids[:-1]
    record: dict[str, Any] = {"inputs": prompt.text, "input_ids": prompt.ids}
    if prompt.targets is not None:
        record["targets"] = prompt.targets
    if codec is not None:
        record["prediction"] = codec.decode(ids)
    record.update(prediction_ids=ids, score=score)
    return record


def infer_from_gin(*, input_path: str | None, task: str | None, split: str,
                   limit: int | None, output: str, checkpoint: str | None,
                   hf_checkpoint: str | None, batch_size: int,
                   max_input_length: int | None, seed: int,
                   run_from_gin: Callable[[], Any]) -> dict[str, float]:
    """What launch.infer runs once gin is parsed: decode.DecodeConfig from gin; the
    weights from --hf_checkpoint, or else from the run's MODEL_DIR, with the run's
    RunConfig from `run_from_gin` (training's, passed in: decoding sits below it)."""
    import gin
    config = gin.get_configurable(decode.DecodeConfig)()
    if hf_checkpoint:
        try:
            partitioner = gin.get_configurable(partitioning.Partitioner)()
        except ValueError:     # no partitioning gin file: data parallel on all devices
            partitioner = partitioning.Partitioner()
        source = from_hf(hf_checkpoint, partitioner=partitioner)
        task_lengths = {"inputs": max_input_length or source.max_input_length,
                        "targets": config.max_decode_length}
    else:
        try:
            model_dir = gin.query_parameter("%MODEL_DIR")
        except ValueError:
            raise InferError("no weights given — set the run's --gin.MODEL_DIR=... (with "
                             "its --gin_file), or pass --hf_checkpoint=DIR") from None
        source = from_run(model_dir=model_dir, checkpoint=checkpoint, run=run_from_gin())
        task_lengths = source.task_lengths
    if task:
        prompts = task_prompts(task, split=split, lengths=task_lengths, limit=limit)
    else:
        prompts = read_prompts(input_path, source.codec)[:limit]
    return run_inference(source, prompts, output=output, config=config,
                         batch_size=batch_size, max_input_length=max_input_length, seed=seed)
