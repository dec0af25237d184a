"""Which parameters a run trains: the split into trainable and frozen, and back.

A full run trains everything (pattern None). An adapter run (finetuning/lora.py)
trains only the parameters whose path ('encoder/layers_0/attention/query/lora_a')
fully matches the adapter's pattern; the rest is the frozen base. The train state,
its optimizer state and its checkpoints hold the trainable part only; the frozen
part is an argument of the train step, never donated and never updated.

Both halves keep the nested structure of the parameter tree, so `merge(split(p))`
is `p` and each half can be restored, sharded and fingerprinted like a full tree.
"""

from __future__ import annotations

import re
from flax import traverse_util

from t5x_like import errors

# What an adapter may hold its frozen base in (the model computes in its own dtype).
FROZEN_DTYPES = ("float32", "bfloat16")


def check_frozen_dtype(adapter: str, frozen_dtype: str) -> None:
    """ConfigError unless `frozen_dtype` is one of FROZEN_DTYPES."""
    if frozen_dtype not in FROZEN_DTYPES:
        raise errors.ConfigError(f"{adapter} frozen_dtype={frozen_dtype!r}",
                                 fix=f"choose one of {list(FROZEN_DTYPES)}")


def split(tree: dict, pattern: str | None) -> tuple[dict, dict]:
    """(trainable, frozen) halves of a parameter-shaped tree (values, specs or
    shardings alike); with pattern None everything is trainable."""
    if pattern is None:
        return tree, {}
    flat = traverse_util.flatten_dict(tree, sep="/")
    trainable = {k: v for k, v in flat.items() if re.fullmatch(pattern, k)}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return (traverse_util.unflatten_dict(trainable, sep="/"),
            traverse_util.unflatten_dict(frozen, sep="/"))


def merge(trainable: dict, frozen: dict | None) -> dict:
    """The model's whole parameter tree from its two halves."""
    if not frozen:
        return trainable
    flat = {**traverse_util.flatten_dict(frozen, sep="/"),
            **traverse_util.flatten_dict(trainable, sep="/")}
    return traverse_util.unflatten_dict(flat, sep="/")

