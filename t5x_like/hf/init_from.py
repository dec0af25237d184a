"""`init_from` a Hugging Face directory: start a run (fine-tuning) from HF weights.

`checkpoints.InitFrom(directory=...)` takes either another run's checkpoints
directory or a directory written by transformers' `save_pretrained` (config.json
and safetensors) of a family we import: T5 / T5.1.1 (`model_type` 't5') or Llama
('llama'). The family's import (hf/t5.py, hf/llama.py) converts each tensor to our
layout and places it straight into this run's parameter sharding, one tensor at a
time, so no host ever holds more than one full tensor.

The run's model (gin) must describe the same network: every parameter must be in the
checkpoint with the same shape and every checkpoint tensor must be used, else a
CheckpointMismatchError names the differences. `InitFrom.rename` applies as for our
checkpoints; `strict=False` does not (a Hugging Face model is taken whole). Settings
that have no weights (relative-attention buckets' max distance, RoPE theta, norm
epsilon) come from gin, not from config.json: keep them equal to the checkpoint's.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import traverse_util

from t5x_like import checkpoints, errors, storage
from t5x_like.hf import llama, safetensors_io, t5

FAMILIES = {"t5": t5, "llama": llama}     # config.json's model_type -> importer


def is_hugging_face_dir(directory: str) -> bool:
    return storage.exists(storage.join(directory, safetensors_io.CONFIG_FILE))


def _is_scanned(paths: list[str]) -> bool:
    """Scanned stacks name their layers 'layers' (one array per parameter, stacked
    on a leading axis) instead of 'layers_0', 'layers_1', ..."""
    return any("layers" in path.split("/") for path in paths)


def restore_params(init_from: checkpoints.InitFrom, *, abstract_params: Any) -> Any:
    """This run's parameters read from the Hugging Face directory `init_from.directory`,
    in the shardings the `abstract_params` leaves carry."""
    directory = init_from.directory
    model_type = safetensors_io.read_config(directory).get("model_type")
    if model_type not in FAMILIES:
        raise errors.ConfigError(
            f"{directory} holds a Hugging Face {model_type!r} model; init_from reads "
            f"{sorted(FAMILIES)} (config.json's model_type)",
            fix="point PRETRAINED_DIR at a T5 or Llama checkpoint")
    if not init_from.strict:
        raise errors.ConfigError("init_from a Hugging Face directory takes the model whole: "
                                 "strict=False is not supported there",
                                 fix="drop checkpoints.InitFrom.strict=False")
    ours = checkpoints.flatten_with_paths(abstract_params)
    source_of = {path: init_from.source_path(path) for path in ours}
    shardings = traverse_util.unflatten_dict(
        {tuple(source_of[path].split("/")): leaf.sharding for path, leaf in ours.items()})
    problem = f"Cannot initialise from the Hugging Face checkpoint {directory}"
    try:
        _, imported = FAMILIES[model_type].import_checkpoint(
            directory, shardings=shardings, scan_layers=_is_scanned(list(ours)))
    except (KeyError, ValueError) as e:   # a parameter on one side only; unsplittable shape
        raise checkpoints.CheckpointMismatchError(
            f"{problem}: {e.args[0] if e.args else e}",
            fix="make the gin model config match its config.json") from e
    loaded = checkpoints.flatten_with_paths(imported)
    reshaped = [f"{path} {tuple(loaded[source_of[path]].shape)}->{tuple(leaf.shape)}"
                for path, leaf in ours.items()
                if tuple(loaded[source_of[path]].shape) != tuple(leaf.shape)]
    if reshaped:
        raise checkpoints.CheckpointMismatchError(
            f"{problem}: shapes differ (checkpoint->run): {reshaped[:8]}",
            fix="make the gin model config match its config.json")
    values = [loaded[source_of[path]].astype(leaf.dtype) for path, leaf in ours.items()]
    return jax.tree.unflatten(jax.tree.structure(abstract_params), values)
