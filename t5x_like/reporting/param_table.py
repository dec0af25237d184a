"""What is being trained: a per-module summary for the log, and the full table.

The summary (a few lines even for a 24-layer unscanned model) is logged at the
start of training; the full table, one row per parameter with its shape, logical
axes, mesh sharding and count, goes to `MODEL_DIR/parameters.txt`.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

from t5x_like import tree_paths

TOTAL_LINE = "Total parameters: {:,}"
_LAYER = re.compile(r"layers(_\d+)?$")


def count_parameters(abstract_params: Any) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params)))


def _format(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + f"  {{:>{widths[-1]}}}"
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [
        fmt.format(*r) for r in rows]


def parameter_table(abstract_params: Any, logical_specs: Any, shardings: Any) -> str:
    """Every parameter: shape, dtype, logical axes, mesh axes and count."""
    flat_specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(
        x, jax.sharding.PartitionSpec))
    flat_shardings = jax.tree.leaves(shardings)
    rows = [(name, str(tuple(leaf.shape)), str(leaf.dtype), str(tuple(spec)),
             str(tuple(sharding.spec)), f"{int(np.prod(leaf.shape)):,}")
            for (name, leaf), spec, sharding in zip(tree_paths.flatten(abstract_params).items(),
                                                    flat_specs, flat_shardings)]
    header = ("parameter", "shape", "dtype", "logical axes", "mesh axes", "count")
    lines = _format(header, rows)
    lines.append(TOTAL_LINE.format(count_parameters(abstract_params)))
    return "\n".join(lines)


def _module_of(name: str) -> tuple[str, str | None]:
    """('encoder/layers', 'layers_3') for 'encoder/layers_3/mlp/wo/kernel'; a layer
    stack is one module, anything else is grouped by its first two path parts."""
    parts = name.split("/")
    for i, part in enumerate(parts[:-1]):
        if _LAYER.match(part):
            return "/".join(parts[:i] + ["layers"]), part
    return "/".join(parts[:2] if len(parts) > 2 else parts[:1]), None


def module_summary(abstract_params: Any) -> str:
    """Parameters per module (a layer stack counts once, with its depth), and the total."""
    groups: dict[str, dict[str, Any]] = {}
    for name, leaf in tree_paths.flatten(abstract_params).items():
        module, layer = _module_of(name)
        group = groups.setdefault(module, {"tensors": 0, "count": 0, "layers": set()})
        group["tensors"] += 1
        group["count"] += int(np.prod(leaf.shape))
        if layer == "layers":           # scanned: the leading axis is the depth
            group["layers"].update(range(leaf.shape[0]))
        elif layer:
            group["layers"].add(layer)
    total = count_parameters(abstract_params)
    rows = [(module, f"{len(g['layers'])} layers" if g["layers"] else "", str(g["tensors"]),
             f"{100 * g['count'] / max(total, 1):.1f}%", f"{g['count']:,}")
            for module, g in groups.items()]
    lines = _format(("module", "depth", "tensors", "share", "parameters"), rows)
    lines.append(TOTAL_LINE.format(total))
    return "\n".join(lines)
