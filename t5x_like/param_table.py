"""A table of every parameter: shape, logical axes, mesh sharding and count.

Printed at the start of training so a reader sees exactly what is being trained
and how it is laid out on the devices.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def count_parameters(abstract_params: Any) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params)))


def parameter_table(abstract_params: Any, logical_specs: Any, shardings: Any) -> str:
    rows = []
    flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(
        x, jax.sharding.PartitionSpec))
    flat_shardings = jax.tree.leaves(shardings)
    for (path, leaf), spec, sharding in zip(flat_params, flat_specs, flat_shardings):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        rows.append((name, str(tuple(leaf.shape)), str(leaf.dtype),
                     str(tuple(spec)), str(tuple(sharding.spec)),
                     f"{int(np.prod(leaf.shape)):,}"))
    header = ("parameter", "shape", "dtype", "logical axes", "mesh axes", "count")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + f"  {{:>{widths[-1]}}}"
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    lines.append(f"Total parameters: {count_parameters(abstract_params):,}")
    return "\n".join(lines)
