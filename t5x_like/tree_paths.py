"""Tree path -> string: the one spelling of a parameter's name everywhere.

Checkpoints (Orbax names arrays the same way), the parameter table, sharding errors
and optimizer settings all show a leaf as 'encoder/layers_0/attention/query/kernel'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax


def to_string(path: Sequence[Any]) -> str:
    """'a/b/0/c' for a jax key path (dict keys, attribute names, sequence indices)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def flatten(tree: Any) -> dict[str, Any]:
    """{'params/encoder/.../kernel': leaf}, in the tree's leaf order."""
    return {to_string(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
