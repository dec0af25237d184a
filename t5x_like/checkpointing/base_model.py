"""An adapter run's frozen base: loading it, and knowing it is the same one.

An adapter run (finetuning/) checkpoints its adapters and their optimizer state only;
the frozen base is read again from where it came from (`init_from`: a run's
checkpoints or a Hugging Face directory) whenever the run resumes or a checkpoint is
evaluated. So each checkpoint records the base's identity: its directory, step and
one fingerprint of all its arrays (checkpointing/integrity.py, the same for every
sharding). Adapters applied to another base would give a model nobody trained,
silently; instead that is one CheckpointMismatchError naming both bases.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax

from t5x_like import errors, storage, tree_paths
from t5x_like.checkpointing import checkpoints, integrity
from t5x_like.finetuning import trainable
from t5x_like.checkpointing.init_from import InitFrom, resolved_step, restore_params_from


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseIdentity:
    """Where a frozen base came from, and a fingerprint of its values."""
    directory: str
    step: int | None          # None: a Hugging Face directory
    fingerprint: str          # hex; equal iff every array is bitwise equal (to 2^-64)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        at = "" if self.step is None else f" step {self.step}"
        return f"{self.directory}{at} (fingerprint {self.fingerprint})"


def fingerprint(params: Any) -> str:
    """One hex fingerprint of a parameter tree: every array's, by name, hashed."""
    per_array = integrity.fingerprints(tree_paths.flatten(params))
    text = "\n".join(f"{name} {value}" for name, value in sorted(per_array.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_loadable(init_from: InitFrom | None) -> None:
    """Raises ConfigError unless `init_from` can give an adapter run its whole base
    (checked before any model init)."""
    if init_from is None:
        raise errors.ConfigError(
            "this run trains an adapter (the model's `adapter` is set), which needs a "
            "pretrained base to adapt, and no init_from is given",
            fix="set train_loop.train.init_from = @init_from.InitFrom() with "
            "PRETRAINED_DIR (configs/runs/finetune_lora.gin does)")
    if not init_from.strict:
        raise errors.ConfigError(
            "an adapter run's base must be whole: init_from.InitFrom.strict=False would "
            "leave parts of it at a random initialisation, frozen",
            fix="drop init_from.InitFrom.strict=False")


def load(init_from: InitFrom | None, *, abstract_frozen: Any) -> tuple[Any, BaseIdentity]:
    """The frozen base, read from `init_from` into the shardings of
    `abstract_frozen`, and its identity."""
    check_loadable(init_from)
    step = resolved_step(init_from)
    params = restore_params_from(dataclasses.replace(init_from, step=step),
                                 abstract_params=abstract_frozen,
                                 fresh_params=abstract_frozen)
    return params, BaseIdentity(directory=storage.resolve(init_from.directory), step=step,
                                fingerprint=fingerprint(params))


def check_same(saved: dict | None, base: BaseIdentity, *, checkpoint: str) -> None:
    """Raises CheckpointMismatchError unless `checkpoint`'s adapters were trained on
    `base` (its saved record `saved`)."""
    if saved is None:
        raise checkpoints.CheckpointMismatchError(
            f"{checkpoint} holds no record of a frozen base, so it is not an adapter "
            f"run's checkpoint, but this run trains an adapter on {base.describe()}",
            fix="use a new MODEL_DIR for the adapter run, or drop the model's adapter")
    if saved.get("fingerprint") != base.fingerprint:
        trained_on = BaseIdentity(**{k: saved.get(k) for k in ("directory", "step",
                                                                "fingerprint")})
        raise checkpoints.CheckpointMismatchError(
            f"the adapters in {checkpoint} were trained on the base "
            f"{trained_on.describe()}, but this run's base is {base.describe()}",
            fix="point PRETRAINED_DIR (init_from) at the base they were trained on, "
            "or use a new MODEL_DIR")


def restore_model_params(reader: checkpoints.CheckpointReader, step: int, *, model: Any,
                         abstract_params: Any,
                         loaded_bases: dict[str, Any] | None = None) -> Any:
    """Every parameter of the model whose checkpoint is `step` (eval, inference).

    `model` says which parameters are trained (`trainable_pattern`) and the
    dtype of the rest. A full run's checkpoint holds them all. An adapter run's holds the adapters;
    the frozen base is read from where its record says (checked against the record's
    fingerprint) and kept in `loaded_bases` for the next step of the same run.
    """
    if model.trainable_pattern is None:
        return reader.restore_params(step, abstract_params=abstract_params)
    abstract_adapters, abstract_frozen = trainable.split(abstract_params,
                                                         model.trainable_pattern)
    # Held as in training (e.g. bfloat16), so its fingerprint is the recorded one.
    abstract_frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, model.frozen_dtype, sharding=a.sharding), abstract_frozen)
    where = f"checkpoint step {step} in {reader.directory}"
    record = reader.read_base_model(step)
    if record is None:
        raise checkpoints.CheckpointMismatchError(
            f"{where} holds no record of a frozen base, so it is not an adapter run's "
            "checkpoint, but the model has an adapter",
            fix="evaluate it with the run's own gin config (without the adapter)")
    loaded_bases = {} if loaded_bases is None else loaded_bases
    if record["fingerprint"] not in loaded_bases:
        frozen, base = load(InitFrom(directory=record["directory"], step=record["step"]),
                            abstract_frozen=abstract_frozen)
        check_same(record, base, checkpoint=where)
        loaded_bases[record["fingerprint"]] = frozen
    adapters = reader.restore_params(step, abstract_params=abstract_adapters)
    return trainable.merge(adapters, loaded_bases[record["fingerprint"]])
