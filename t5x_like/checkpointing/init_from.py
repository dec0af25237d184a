"""`init_from`: start a new run from another run's parameters or a Hugging Face model.

`InitFrom(directory=...)` takes either another run's checkpoints directory (only the
selected arrays are read, each straight into this run's sharding) or a directory
written by transformers' `save_pretrained` (config.json and safetensors) of a family
we import: T5 / T5.1.1 (`model_type` 't5') or Llama ('llama'). The family's import
(hf/t5.py, hf/llama.py) converts each tensor to our layout and places it into this
run's parameter sharding one tensor at a time, so no host holds more than one full
tensor. The optimizer always starts fresh.

The run's model (gin) must describe the same network: a Hugging Face model is taken
whole (every parameter present with its shape, every tensor used), else a
CheckpointMismatchError names the differences. Settings that have no weights
(relative-attention max distance, RoPE theta, norm epsilon) come from gin, not from
config.json: keep them equal to the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from t5x_like import errors, storage, tree_paths
from t5x_like.checkpointing import checkpoints
from t5x_like.hf import llama, safetensors_io, t5

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True, kw_only=True)
class InitFrom:
    """Start a new run from another run's parameters (the optimizer starts fresh).

    Attributes:
      directory: the other run's checkpoints directory (MODEL_DIR/checkpoints), or
        a Hugging Face model directory (config.json + *.safetensors; T5 or Llama).
      step: which step; the latest when None.
      rename: (regex, replacement) pairs applied in order to *this* model's
        parameter paths (e.g. 'encoder/layers_0/mlp/wi_0/kernel') to find the name
        in the checkpoint; the first full match wins, unmatched paths map to
        themselves. Lets a checkpoint seed a model with renamed or reused parts.
      strict: if True, every parameter must be found and every checkpoint
        parameter used; otherwise missing ones keep their fresh initialisation and
        unused ones are ignored (both listed in the log).
    Values are cast to this model's parameter dtypes (e.g. bfloat16 <-> float32).
    """
    directory: str
    step: int | None = None
    rename: tuple[tuple[str, str], ...] = ()
    strict: bool = True

    def source_path(self, ours: str) -> str:
        for pattern, replacement in self.rename:
            if re.fullmatch(pattern, ours):
                return re.sub(f"^(?:{pattern})$", replacement, ours)
        return ours


def resolved_step(init_from: InitFrom) -> int | None:
    """The step `init_from` reads: its own, or the directory's latest now (None for a
    Hugging Face directory, which has no steps)."""
    if init_from.step is not None or is_hugging_face_dir(init_from.directory):
        return init_from.step
    return checkpoints.latest_committed_step(storage.resolve(init_from.directory))


def restore_params_from(init_from: InitFrom, *, abstract_params: Any, fresh_params: Any
                        ) -> Any:
    """Returns `fresh_params` with every parameter found in the checkpoint replaced.

    Only the selected arrays are read (Orbax partial restore), each directly into
    the shard layout of `abstract_params`. A Hugging Face directory (config.json +
    safetensors) is converted by its family's importer (hf/t5.py, hf/llama.py) instead.
    """
    if is_hugging_face_dir(init_from.directory):
        return _restore_hugging_face_params(init_from, abstract_params=abstract_params)
    manager = ocp.CheckpointManager(
        storage.resolve(init_from.directory),
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers=checkpoints.item_handlers(ocp.PyTreeCheckpointHandler()))
    step = init_from.step if init_from.step is not None else manager.latest_step()
    if step is None or step not in manager.all_steps():
        raise errors.InputNotFoundError(
            f"No checkpoint{'' if step is None else f' at step {step}'} in "
            f"{init_from.directory} (steps there: {sorted(manager.all_steps())})",
            fix="point train.init_from at a run's MODEL_DIR/checkpoints and an existing step")
    saved = tree_paths.flatten(manager.item_metadata(step)["state"])
    saved_params = {k[len("params/"):]: v for k, v in saved.items() if k.startswith("params/")}
    ours = tree_paths.flatten(abstract_params)
    mapping = {k: init_from.source_path(k) for k in ours}
    missing = sorted(k for k, src in mapping.items() if src not in saved_params)
    unused = sorted(set(saved_params) - set(mapping.values()))
    reshaped = sorted(k for k, src in mapping.items() if src in saved_params
                      and tuple(saved_params[src].shape) != tuple(ours[k].shape))
    problems = (f"missing (not in the checkpoint): {missing}; unused checkpoint "
                f"parameters: {unused}; shape mismatches: {reshaped}")
    if reshaped or (init_from.strict and (missing or unused)):
        raise checkpoints.CheckpointMismatchError(
            f"Cannot initialise from {init_from.directory} step {step}: {problems}",
            fix="add `rename` rules, or set strict=False to keep fresh values for "
            "missing parameters")
    if missing or unused:
        log.warning("Partial init from %s step %d: %s", init_from.directory, step, problems)

    # Build the partial tree in the checkpoint's own layout: {'params': {...}}.
    item, restore_args = {}, {}
    for k, src in mapping.items():
        if src not in saved_params:
            continue
        _set_path(item, ("params", *src.split("/")), ours[k])
        _set_path(restore_args, ("params", *src.split("/")), ocp.ArrayRestoreArgs(
            sharding=ours[k].sharding, dtype=ours[k].dtype, global_shape=ours[k].shape))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))).state
    manager.close()
    loaded = tree_paths.flatten(restored)
    fresh = tree_paths.flatten(fresh_params)
    merged = {k: loaded.get(f"params/{mapping[k]}", fresh[k]) for k in ours}
    treedef = jax.tree.structure(fresh_params)
    log.info("Initialised %d/%d parameters from %s step %d", len(ours) - len(missing),
             len(ours), init_from.directory, step)
    return jax.tree.unflatten(treedef, [merged[k] for k in tree_paths.flatten(fresh_params)])


def _set_path(tree: dict, path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ------------------------------------------------------------ a Hugging Face directory

FAMILIES = {"t5": t5, "llama": llama}     # config.json's model_type -> importer


def is_hugging_face_dir(directory: str) -> bool:
    return storage.exists(storage.join(directory, safetensors_io.CONFIG_FILE))


def _is_scanned(paths: list[str]) -> bool:
    """Scanned stacks name their layers 'layers' (one array per parameter, stacked
    on a leading axis) instead of 'layers_0', 'layers_1', ..."""
    return any("layers" in path.split("/") for path in paths)


def _restore_hugging_face_params(init_from: InitFrom, *, abstract_params: Any) -> Any:
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
                                 fix="drop init_from.InitFrom.strict=False")
    ours = tree_paths.flatten(abstract_params)
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
    loaded = tree_paths.flatten(imported)
    reshaped = [f"{path} {tuple(loaded[source_of[path]].shape)}->{tuple(leaf.shape)}"
                for path, leaf in ours.items()
                if tuple(loaded[source_of[path]].shape) != tuple(leaf.shape)]
    if reshaped:
        raise checkpoints.CheckpointMismatchError(
            f"{problem}: shapes differ (checkpoint->run): {reshaped[:8]}",
            fix="make the gin model config match its config.json")
    values = [loaded[source_of[path]].astype(leaf.dtype) for path, leaf in ours.items()]
    return jax.tree.unflatten(jax.tree.structure(abstract_params), values)
