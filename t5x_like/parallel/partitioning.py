"""Device meshes, the logical-axis rule table, and the shardings derived from them.

Model code names *logical* axes only ('batch', 'embed', 'mlp', 'heads', ...). One
table, `LOGICAL_AXIS_RULES`, maps those names onto the three mesh axes `data`,
`fsdp` and `model`, and the mesh shape alone chooses the strategy: a size-1 axis
splits nothing, so

    data=N                  data parallel (parameters replicated)
    fsdp=N                  FSDP / ZeRO-3 (parameters and optimizer state split
                            along `embed`, gathered per layer by XLA)
    model=N                 tensor parallel (Megatron-style: MLP hidden, heads and
                            vocabulary split)
    fsdp=N, model=M, ...    any mix; the batch is always split over data x fsdp.

There is no separate "rules preset" that could disagree with the mesh (FSDP rules
on a mesh whose fsdp axis is 1 used to replicate everything without a word).

The rules are then fitted to the model (`Partitioner.fit_to_parameters`, which
`params_layout.for_model` calls for train, eval and infer alike, before anything is
placed or compiled): attention heads fewer than the mesh axes they map to are replicated across them instead of split (as
MaxText and vLLM do for the few key/value heads of GQA models under tensor
parallelism), and any other dimension that its mesh axes cannot split evenly is an
error naming the parameter, its logical axis, the mesh axis and the setting to change.

Multi-slice (several TPU slices joined by the data-center network, DCN): with
`num_slices > 1` the `data` axis spans the slices, outermost, so only the data
parallel gradient reduction crosses DCN while FSDP and tensor parallelism stay on
each slice's fast interconnect (ICI). The other axis sizes are per slice.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from t5x_like import errors, tree_paths
from t5x_like.models import attention

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "model")
# The Partitioner setting that sizes each mesh axis (named in error messages).
MESH_AXIS_SETTINGS = {"data": "data_parallelism", "fsdp": "fsdp_parallelism",
                      "model": "tensor_parallelism"}

# A rule maps one logical axis to a mesh axis, a tuple of mesh axes, or None
# (replicated).
LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# The one rule table. Flax applies, per array dimension, the first rule for its
# logical name whose mesh axes no other dimension of the same array has taken, so
# order matters: `batch` comes first and takes (data, fsdp), and an activation's
# `embed` then falls through to the replicated rule further down. Parameters have no
# batch dimension, so their `embed` takes `fsdp`.
LOGICAL_AXIS_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("vocab", "model"),
    # Replicated: what is left (and the fallbacks of the axes above).
    ("embed", None), ("mlp", None), ("heads", None), ("kv_heads", None), ("vocab", None),
    ("kv", None), ("length", None), ("relpos_buckets", None), ("layers", None),
    ("lora_rank", None), ("soft_prompt_length", None),
)
KNOWN_LOGICAL_AXES = frozenset(name for name, _ in LOGICAL_AXIS_RULES)
# Axes replicated, rather than refused, when a model has fewer of them than the mesh
# axes they map to: e.g. 2 kv heads under 8-way tensor parallelism (each device then
# holds every kv head, while query heads, MLP and vocabulary still split), or 4 query
# heads over 8 devices (the attention then runs whole on each device).
REPLICATED_WHEN_TOO_FEW = frozenset({"heads", "kv_heads"})


def rules_for_mesh(mesh_shape: Mapping[str, int]) -> LogicalRules:
    """`LOGICAL_AXIS_RULES` with every rule onto a single size-1 mesh axis set to None.

    A size-1 axis splits nothing either way; dropping it makes the specs (and the
    parameter table) name only the axes that really split something. The batch's
    (data, fsdp) rule is kept whole, so every batch array has the same spec on any
    mesh.
    """
    return tuple((name, None if isinstance(axes, str) and mesh_shape[axes] == 1 else axes)
                 for name, axes in LOGICAL_AXIS_RULES)


def resolve_mesh_shape(*, num_devices: int, data: int, fsdp: int, model: int
                       ) -> tuple[int, int, int]:
    """Fills in the single -1 entry so that data*fsdp*model == num_devices."""
    sizes = [data, fsdp, model]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got data={data}, "
                         f"fsdp={fsdp}, model={model}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"{num_devices} devices cannot be split into a mesh with fixed axes "
                f"product {known} (data={data}, fsdp={fsdp}, model={model}).")
        sizes[unknown[0]] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"Mesh data={sizes[0]} x fsdp={sizes[1]} x model={sizes[2]} needs "
            f"{int(np.prod(sizes))} devices, but {num_devices} are available. Set one "
            "axis to -1 to absorb the remaining devices.")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(*, data: int = -1, fsdp: int = 1, model: int = 1,
              devices: Sequence[jax.Device] | None = None, num_slices: int = 1) -> Mesh:
    """Builds a ('data', 'fsdp', 'model') mesh in topology-aware device order.

    With `num_slices > 1`, `data`, `fsdp` and `model` describe one slice and the
    mesh's `data` axis is `num_slices * data` long, slices outermost (see top).
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_slices < 1 or len(devices) % num_slices:
        raise ValueError(f"{len(devices)} devices cannot be split into "
                         f"num_slices={num_slices} equal slices.")
    shape = resolve_mesh_shape(num_devices=len(devices) // num_slices, data=data,
                               fsdp=fsdp, model=model)
    if num_slices > 1:
        device_array = _hybrid_device_array(shape, devices, num_slices)
        return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # Topology-aware placement is unavailable for some device kinds (e.g. a
        # subset of devices); fall back to the given order, which is still correct.
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _hybrid_device_array(ici_shape: tuple[int, int, int], devices: list[jax.Device],
                         num_slices: int) -> np.ndarray:
    """[num_slices * data, fsdp, model] devices: each slice's ICI mesh, stacked on data.

    Slices are told apart by `slice_index` (TPU multi-slice, also the AOT topology
    devices), else by process (one GPU node per "slice"), else by position (fake
    CPU devices in tests: consecutive groups).
    """
    for attr, by_process in (("slice_index", False), ("process_index", True)):
        keys = [getattr(d, attr, None) for d in devices]
        if None in keys or len(set(keys)) != num_slices:
            continue
        try:
            return mesh_utils.create_hybrid_device_mesh(
                ici_shape, (num_slices, 1, 1), devices, process_is_granule=by_process)
        except (ValueError, NotImplementedError, AssertionError):
            groups = [[d for d, k in zip(devices, keys) if k == key]
                      for key in sorted(set(keys))]
            break
    else:
        per_slice = len(devices) // num_slices
        groups = [devices[i * per_slice:(i + 1) * per_slice] for i in range(num_slices)]
    if any(len(g) * num_slices != len(devices) for g in groups):
        raise ValueError(f"Slices of unequal size: {[len(g) for g in groups]} devices.")
    return np.concatenate([np.asarray(g).reshape(ici_shape) for g in groups], axis=0)


class Partitioner:
    """A mesh plus the rule table resolved for it: everything needed to place arrays.

    Built from gin (configs/partitioning/*.gin set the mesh shape). -1 on one axis
    means "the remaining devices", so the same config runs on 1, 8 or 256 devices.
    `num_slices` > 1 splits the devices into that many slices joined over DCN; the
    parallelism sizes are then per slice and `data` also spans the slices.

    Every tensor with an `embed` axis is split under FSDP, however small: keeping
    small ones replicated (big_vision's size threshold) did not change the step time
    on the 8-device CPU mesh (benchmarks/RESULTS.md, "FSDP size threshold").
    """

    def __init__(self, *, data_parallelism: int = -1, fsdp_parallelism: int = 1,
                 tensor_parallelism: int = 1, devices: Sequence[jax.Device] | None = None,
                 num_slices: int = 1):
        self.num_slices = num_slices
        self.mesh = make_mesh(data=data_parallelism, fsdp=fsdp_parallelism,
                              model=tensor_parallelism, devices=devices,
                              num_slices=num_slices)
        self.rules = rules_for_mesh(self.mesh.shape)
        self.replicated_axes: tuple[str, ...] = ()    # set by fit_to_parameters

    def __repr__(self) -> str:
        shape = ", ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
        slices = f", slices={self.num_slices}" if self.num_slices > 1 else ""
        replicated = (f"; {', '.join(self.replicated_axes)} replicated (too few to split)"
                      if self.replicated_axes else "")
        return f"Partitioner(mesh=({shape}){slices}: {self.strategy}{replicated})"

    def fit_to_parameters(self, abstract_params: Any, logical_specs: Any) -> None:
        """Fits the rules to a model's parameter sizes, or says why its mesh cannot.

        Every parameter dimension must split evenly over the mesh axes its logical
        axis maps to. Axes in REPLICATED_WHEN_TOO_FEW that are smaller than their
        mesh axes are replicated for the whole model (parameters and activations);
        anything else that does not divide raises a ConfigError naming the parameter,
        logical axis, mesh axis and the Partitioner setting to change. Call it before
        tracing the model under `context()` (params_layout.for_model does).
        """
        base = rules_for_mesh(self.mesh.shape)
        replicated: set[str] = set()
        while True:
            rules = tuple((name, None if name in replicated else axes)
                          for name, axes in base)
            too_few = self._check_divisible(abstract_params, logical_specs, rules)
            if not too_few - replicated:
                break
            replicated |= too_few
        self.rules, self.replicated_axes = rules, tuple(sorted(replicated))
        for name in self.replicated_axes:
            log.info("Logical axis %r has fewer entries than the mesh axes it maps to; "
                     "it is replicated instead of split.", name)

    def _check_divisible(self, abstract_params: Any, logical_specs: Any,
                         rules: LogicalRules) -> set[str]:
        """Replicable axes found too small under `rules`; raises for any other misfit."""
        too_few = set()
        flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
        flat_specs = jax.tree.leaves(logical_specs,
                                     is_leaf=lambda x: isinstance(x, PartitionSpec))
        for (path, param), spec in zip(flat_params, flat_specs):
            logical = tuple(spec) + (None,) * (len(param.shape) - len(spec))
            mesh_spec = nn.logical_to_mesh_axes(logical, rules)
            for dim, (size, name, mesh_axes) in enumerate(zip(param.shape, logical,
                                                              mesh_spec)):
                if mesh_axes is None:
                    continue
                mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
                ways = int(np.prod([self.mesh.shape[a] for a in mesh_axes]))
                if size % ways == 0:
                    continue
                if name in REPLICATED_WHEN_TOO_FEW and size < ways:
                    too_few.add(name)
                    continue
                where = tree_paths.to_string(path)
                axes_text = " x ".join(f"{a!r} ({self.mesh.shape[a]})" for a in mesh_axes)
                settings = " / ".join(f"partitioning.Partitioner.{MESH_AXIS_SETTINGS[a]}"
                                      for a in mesh_axes)
                raise errors.ConfigError(
                    f"Parameter {where} {tuple(param.shape)}: dimension {dim} (logical "
                    f"axis {name!r}, size {size}) cannot be split evenly over mesh axis "
                    f"{axes_text} devices",
                    fix=f"set {settings} to a divisor of {size}, or change the model's "
                    f"{name!r} size")
        return too_few

    @property
    def strategy(self) -> str:
        """What the mesh shape amounts to, e.g. 'data parallel' or 'FSDP x TP'."""
        parts = [name for axis, name in (("fsdp", "FSDP"), ("model", "TP"))
                 if self.mesh.shape[axis] > 1]
        if self.mesh.shape["data"] > 1 and parts:
            parts.insert(0, "DP")
        return " x ".join(parts) if parts else "data parallel"

    @property
    def data_shards(self) -> int:
        """How many ways the batch dimension is split."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def logical_to_mesh_spec(self, logical_axes: Sequence[str | None]) -> PartitionSpec:
        unknown = set(logical_axes) - KNOWN_LOGICAL_AXES - {None}
        if unknown:
            raise ValueError(f"Logical axes {sorted(unknown)} have no rule; add them to "
                             "partitioning.LOGICAL_AXIS_RULES.")
        return nn.logical_to_mesh_axes(tuple(logical_axes), self.rules)

    def sharding(self, logical_axes: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.logical_to_mesh_spec(logical_axes))

    def shardings(self, logical_specs: Any) -> Any:
        """Maps a tree of logical PartitionSpecs to a tree of NamedShardings."""
        return jax.tree.map(self.sharding, logical_specs,
                            is_leaf=lambda x: isinstance(x, PartitionSpec))

    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        return self.sharding(("batch",) + (None,) * (ndim - 1))

    def context(self):
        """Context in which model code is traced: mesh + logical rules active."""
        return _MeshAndRules(self.mesh, self.rules)

    def jit(self, fn: Callable, **jit_options: Any) -> MeshJitted:
        """`jax.jit(fn, **jit_options)`, traced and lowered under `context()`."""
        return MeshJitted(jax.jit(fn, **jit_options), partitioner=self)

    def replicated(self) -> NamedSharding:
        """Every device holds all of it: outputs every process reads whole."""
        return NamedSharding(self.mesh, PartitionSpec())


class MeshJitted:
    """A jitted function whose calls and lowerings run under its partitioner's
    context, so the model is traced with the mesh, logical rules and attention
    kernels of the devices it runs on (or is compiled for). The one way the
    project jits anything that traces a model."""

    def __init__(self, jitted: Callable, *, partitioner: Partitioner):
        self._jitted = jitted
        self._partitioner = partitioner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._partitioner.context():
            return self._jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        with self._partitioner.context():
            return self._jitted.lower(*args, **kwargs)


@dataclasses.dataclass
class _MeshAndRules:
    """The mesh, the logical rules and the target platform of attention kernels."""
    mesh: Mesh
    rules: LogicalRules

    def __enter__(self):
        self._mesh_ctx = jax.set_mesh(self.mesh)
        self._rules_ctx = nn.logical_axis_rules(self.rules)
        # Kernels are chosen for the mesh's devices (a TPU slice compiled from a CPU).
        self._platform_ctx = attention.compiling_for(self.mesh.devices.flat[0].platform)
        self._mesh_ctx.__enter__()
        self._rules_ctx.__enter__()
        self._platform_ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._platform_ctx.__exit__(*exc)
        self._rules_ctx.__exit__(*exc)
        self._mesh_ctx.__exit__(*exc)


@dataclasses.dataclass(frozen=True)
class BatchBlock:
    """Which rows of every global batch this process's devices hold.

    The global batch is cut into `count` equal blocks of rows; this process holds
    block `index`. Usually one block per process, but when the model axis spans
    processes (e.g. tensor_parallelism=8 over 2 hosts of 4 devices) several
    processes hold the same rows, and each must feed them, not rows of its own.
    `leads` is False for all but the first process of a block (it alone saves the
    block's data positions).
    """
    index: int
    count: int
    leads: bool


def batch_block(partitioner: Partitioner) -> BatchBlock:
    """This process's BatchBlock, read off the batch sharding's device -> rows map;
    ConfigError if the mesh gives some process rows that are not one such block."""
    rows = partitioner.mesh.devices.size      # any size the batch axes divide
    by_device = partitioner.batch_sharding(1).devices_indices_map((rows,))
    spans: dict[int, set[int]] = {}
    for device, (index,) in by_device.items():
        spans.setdefault(device.process_index, set()).update(range(rows)[index])
    blocks = sorted({(min(r), max(r) + 1) for r in spans.values()})
    size = blocks[0][1] - blocks[0][0]
    if any(len(r) != max(r) + 1 - min(r) for r in spans.values()) or \
            blocks != [(i * size, (i + 1) * size) for i in range(len(blocks))]:
        raise errors.ConfigError(
            f"the mesh {dict(partitioner.mesh.shape)} gives processes batch rows that are "
            "not whole equal blocks, so no process can feed its devices from one data shard",
            fix="order the mesh so each process's devices hold one contiguous block of "
            "the batch (keep the model axis within a host, or make it span all hosts)")
    mine = spans[jax.process_index()]
    index = blocks.index((min(mine), max(mine) + 1))
    first = min(p for p, r in spans.items() if r == mine)
    return BatchBlock(index=index, count=len(blocks), leads=first == jax.process_index())


def global_batch(batch: Mapping[str, Any], partitioner: Partitioner, *,
                 rows: Literal["block", "all"] = "block") -> dict[str, jax.Array]:
    """This host's batch rows -> global arrays split over the mesh's batch axes.

    rows='block': each process passes the rows of its BatchBlock (training, and
    evaluation, which reads its block); the global batch is the blocks in order
    (processes that share a block pass the same rows). rows='all': every process
    passes the whole global batch (decoding a few prompts). jax.Arrays pass through.
    """
    count = batch_block(partitioner).count if rows == "block" else 1
    out = {}
    for name, value in batch.items():
        if isinstance(value, jax.Array):
            out[name] = value
            continue
        value = np.asarray(value)
        sharding = partitioner.batch_sharding(value.ndim)
        if rows == "all":
            out[name] = jax.make_array_from_callback(
                value.shape, sharding, lambda index, value=value: value[index])
        else:
            global_shape = (value.shape[0] * count,) + value.shape[1:]
            out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out
