"""A run's checkpoint out to Hugging Face: the whole model, a LoRA run's adapters, or a
T5 prompt-tuning run's soft prompt.

`launch.export` calls `export_run_checkpoint`. 'hf' writes what transformers'
`from_pretrained` loads (T5ForConditionalGeneration or LlamaForCausalLM), with a
LoRA run's adapters merged into the kernels they adapt (W + alpha/r A B), so the
result needs no PEFT. 'peft' writes the adapters alone as a PEFT adapter directory
(hf/peft.py) for the Hugging Face copy of the base: when the run's base was a Hugging
Face directory, `adapter_config.json` names it; when it was one of our runs, export
that run with 'hf' first and load the adapter onto the export. A soft prompt goes out
as PEFT's prompt tuning only: it is no weight of the model that 'hf' could merge.
"""

from __future__ import annotations

import logging
from typing import Any

from t5x_like import errors, run_dir
from t5x_like.checkpointing import base_model, checkpoints, init_from
from t5x_like.finetuning import lora, prompt_tuning
from t5x_like.hf import llama, peft, t5
from t5x_like.models import decoder
from t5x_like.models import t5 as t5_model
from t5x_like.parallel import params_layout

log = logging.getLogger(__name__)

KINDS = ("hf", "peft")


def export_run_checkpoint(*, run: Any, model_dir: str, checkpoint: str | None, kind: str,
                          output_dir: str) -> int:
    """Writes checkpoint `checkpoint` (a step, or None/'latest') of the run in
    `model_dir` to `output_dir` as `kind`; returns the step exported."""
    model = run.model
    adapter = getattr(model, "adapter", None)
    if kind not in KINDS:
        raise errors.ConfigError(f"--format={kind}", fix=f"choose one of {list(KINDS)}")
    prompted = isinstance(adapter, prompt_tuning.PromptTuning)
    if prompted and kind == "hf":
        raise errors.ConfigError(
            "this run prompt-tunes: its soft prompt is not a weight of the Hugging Face "
            "model and cannot be merged into one",
            fix="export it with --format=peft (T5), or export its base run")
    if prompted and not isinstance(model.config, t5_model.T5Config):
        raise errors.ConfigError(
            "PEFT's prompt tuning prepends the prompt to the whole input, and this "
            "decoder-only run's prompt follows the start token",
            fix="use the run with launch.eval and launch.infer")
    if kind == "peft" and adapter is None:
        raise errors.ConfigError("--format=peft exports LoRA adapters or a soft prompt, and "
                                 "this run's model has neither",
                                 fix="use --format=hf, or the LoRA run's gin file")
    export_model = {t5_model.T5Config: t5.export_checkpoint,
                    decoder.DecoderConfig: llama.export_checkpoint}.get(type(model.config))
    if export_model is None:
        raise errors.ConfigError(f"{type(model.config).__name__} has no Hugging Face export",
                                 fix="export a T5 or decoder-only (Llama) run")
    directory = run_dir.checkpoints(model_dir)
    step = _step(directory, checkpoint)
    partitioner = run.partitioner()
    abstract = params_layout.for_model(
        model=model, partitioner=partitioner,
        feature_lengths={"encoder_input_tokens": 1, "decoder_target_tokens": 1}
    ).abstract_with_shardings()
    reader = checkpoints.CheckpointReader(directory)
    try:
        params = base_model.restore_model_params(
            reader, step, model=model, abstract_params=abstract)
        record = reader.read_base_model(step)
    finally:
        reader.close()
    if kind == "peft":
        base_dir = record["directory"]
        hf_base = base_dir if init_from.is_hugging_face_dir(base_dir) else None
        if prompted:
            peft.export_prompt_tuning(params, config=model.config, adapter=adapter,
                                      directory=output_dir, base_model_name_or_path=hf_base)
            what = f"the soft prompt of {adapter.length} vectors"
        else:
            modules = peft.export_lora_adapter(params, config=model.config, adapter=adapter,
                                               directory=output_dir,
                                               base_model_name_or_path=hf_base)
            what = f"the LoRA adapters of {len(modules)} modules"
        log.info("Exported %s at step %d to %s (base: %s)", what, step, output_dir,
                 hf_base or f"{base_dir}, ours: export it with --format=hf to load it")
        return step
    if isinstance(adapter, lora.LoRA):
        params = lora.merged(params, scale=adapter.scale)
    try:
        export_model(params, model.config, output_dir)
    except ValueError as e:
        raise errors.ConfigError(f"cannot export step {step}: {e}",
                                 fix="set what it names in the model's gin config") from e
    log.info("Exported step %d%s to %s", step,
             " (adapters merged into the base)" if adapter else "", output_dir)
    return step


def _step(directory: str, wanted: str | None) -> int:
    steps = checkpoints.existing_steps(directory)
    if not steps:
        raise errors.InputNotFoundError(f"no checkpoints in {directory}",
                                        fix="train first, or check MODEL_DIR")
    if wanted in (None, "latest"):
        return steps[-1]
    if not wanted.isdigit() or int(wanted) not in steps:
        raise errors.InputNotFoundError(f"no checkpoint at step {wanted} in {directory} "
                                        f"(steps there: {steps})",
                                        fix="pass one of them or --checkpoint=latest")
    return int(wanted)
