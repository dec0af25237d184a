"""Cloud TPU slice shapes: accelerator types ("v5p-128") to chips, hosts and HBM.

One table serves two users: the AOT fit check (`t5x_like/training/aot.py`), which builds
compile-only devices for a slice on a CPU machine, and the TPU VM launcher
(`launch/tpu_vm.py`), which needs to know how many workers a slice has.

Naming (public Cloud TPU conventions): v4 and v5p types count TensorCores, two per
chip, with both cores of a chip fused into one JAX device ("megacore"), so
`v5p-128` is 64 chips and 64 devices; v5e (`v5litepod-N`, also written `v5e-N`)
and v6e (`v6e-N`) types count chips, one core each. A topology name such as
`v5e:4x4` or `v4:2x2x4` (generation:chip grid) is accepted too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence

GiB = 1024**3


@dataclasses.dataclass(frozen=True, kw_only=True)
class Chip:
    generation: str          # 'v4', 'v5e', 'v5p', 'v6e'
    hbm_bytes: int           # per JAX device (per chip)
    peak_bf16_flops: float   # per chip, dense
    cores_per_chip: int      # TensorCores counted by the accelerator-type suffix
    chips_per_host: int      # chips attached to one TPU VM worker (full hosts)
    dims: int                # 3D torus (v4, v5p) or 2D (v5e, v6e)
    chip_config_name: str | None = None


CHIPS = {
    "v4": Chip(generation="v4", hbm_bytes=32 * GiB, peak_bf16_flops=275e12,
               cores_per_chip=2, chips_per_host=4, dims=3, chip_config_name="megacore"),
    "v5p": Chip(generation="v5p", hbm_bytes=95 * GiB, peak_bf16_flops=459e12,
                cores_per_chip=2, chips_per_host=4, dims=3, chip_config_name="megacore"),
    "v5e": Chip(generation="v5e", hbm_bytes=16 * GiB, peak_bf16_flops=197e12,
                cores_per_chip=1, chips_per_host=4, dims=2),
    "v6e": Chip(generation="v6e", hbm_bytes=32 * GiB, peak_bf16_flops=918e12,
                cores_per_chip=1, chips_per_host=4, dims=2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e",
            "v4": "v4", "v5p": "v5p", "v5e": "v5e", "v6e": "v6e"}

# Chip grids of the standard slice shapes, by chip count.
_GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16)}
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Slice:
    """One TPU slice (a pod slice of one accelerator type), times `num_slices`."""
    chip: Chip
    grid: tuple[int, ...]            # chips along each torus axis
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.grid)

    @property
    def num_devices(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def hosts_per_slice(self) -> int:
        """TPU VM workers per slice (`--worker=all` reaches this many)."""
        return max(1, self.chips_per_slice // self._chips_per_host_bounds_count)

    @property
    def _chips_per_host_bounds_count(self) -> int:
        return math.prod(self.chips_per_host_bounds)

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        if self.chips_per_slice < self.chip.chips_per_host:     # v5e-1: a 1-chip host
            return (*self.grid, 1)[:3] if self.chip.dims == 2 else tuple(self.grid)
        if self.chip.dims == 2 and self.chips_per_slice == 8:   # v5e-8 / v6e-8: one 8-chip host
            return (2, 4, 1)
        return (2, 2, 1)

    @property
    def topology_name(self) -> str:
        """The name `jax.experimental.topologies.get_topology_desc` takes."""
        return f"{self.chip.generation}:{'x'.join(map(str, self.grid))}"

    @property
    def accelerator_type(self) -> str:
        prefix = {"v5e": "v5litepod"}.get(self.chip.generation, self.chip.generation)
        return f"{prefix}-{self.chips_per_slice * self.chip.cores_per_chip}"

    def __str__(self) -> str:
        multi = f"{self.num_slices}x " if self.num_slices > 1 else ""
        return (f"{multi}{self.accelerator_type} ({self.topology_name}, "
                f"{self.num_devices} devices, {self.chip.hbm_bytes / GiB:.0f} GiB HBM each)")


def parse(name: str, *, num_slices: int = 1) -> Slice:
    """'v5p-128', 'v4-32', 'v5litepod-16', 'v6e-64', 'v5e:4x4', '2xv5p-128' -> Slice."""
    text = name.strip().lower()
    multi = re.fullmatch(r"(\d+)x(v.*)", text)
    if multi:
        if num_slices != 1:
            raise ValueError(f"{name!r} already names a slice count; drop num_slices.")
        num_slices, text = int(multi.group(1)), multi.group(2)
    topo = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
    accel = re.fullmatch(r"([a-z0-9]+?)-(\d+)", text)
    if topo:
        chip = _chip(topo.group(1), name)
        grid = tuple(int(d) for d in topo.group(2).split("x"))
        if len(grid) != chip.dims:
            raise ValueError(f"{name!r}: {chip.generation} topologies have {chip.dims} "
                             f"dimensions, e.g. {_example(chip)}.")
    elif accel:
        chip = _chip(accel.group(1), name)
        count = int(accel.group(2))
        if count % chip.cores_per_chip:
            raise ValueError(f"{name!r}: {chip.generation} types count TensorCores "
                             f"({chip.cores_per_chip} per chip); use an even number.")
        chips = count // chip.cores_per_chip
        grids = _GRIDS_3D if chip.dims == 3 else _GRIDS_2D
        if chips not in grids:
            sizes = ", ".join(f"{chip.generation}-{c * chip.cores_per_chip}" for c in grids)
            raise ValueError(f"{name!r} is not a standard slice; choose one of {sizes} "
                             f"or give a topology such as {_example(chip)}.")
        grid = grids[chips]
    else:
        raise ValueError(f"Cannot read TPU type {name!r}; use an accelerator type like "
                         "'v5p-128', 'v4-32', 'v5litepod-16', 'v6e-16' or a topology like "
                         "'v5e:4x4' (prefix '2x' for two slices).")
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}.")
    return Slice(chip=chip, grid=grid, num_slices=num_slices)


def _chip(prefix: str, name: str) -> Chip:
    if prefix not in _ALIASES:
        raise ValueError(f"Unknown TPU generation in {name!r}; known: "
                         f"{sorted(set(_ALIASES))}.")
    return CHIPS[_ALIASES[prefix]]


def _example(chip: Chip) -> str:
    return f"{chip.generation}:2x2x4" if chip.dims == 3 else f"{chip.generation}:4x4"


def compile_only_devices(tpu: Slice) -> Sequence:
    """Devices of `tpu` that XLA can compile for on a machine without TPUs.

    Needs `libtpu` (`pip install -e ".[tpu]"`); works with JAX_PLATFORMS=cpu. With
    several slices each device carries `slice_index`, as on a real multi-slice job.
    """
    # Compile-only use never owns the chips, so do not take libtpu's one-process
    # lock (/tmp/libtpu_lockfile): AOT checks may run side by side (tests, benchmarks).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - very old JAX
        raise RuntimeError("This JAX has no jax.experimental.topologies.") from e
    kwargs = {"chips_per_host_bounds": tpu.chips_per_host_bounds,
              "num_slices": tpu.num_slices}
    if tpu.chip.chip_config_name:
        kwargs["chip_config_name"] = tpu.chip.chip_config_name
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=tpu.topology_name,
                                            **kwargs)
    except Exception as e:  # noqa: BLE001 - libtpu missing or the shape is rejected
        raise RuntimeError(
            f"Could not describe {tpu}: {e}\nThe AOT check needs libtpu: "
            "pip install -e \".[tpu]\" (it runs on a CPU machine; keep "
            "JAX_PLATFORMS=cpu set).") from e
    devices = list(desc.devices)
    if len(devices) != tpu.num_devices:
        raise RuntimeError(f"Expected {tpu.num_devices} devices for {tpu}, libtpu "
                           f"described {len(devices)}.")
    return devices
