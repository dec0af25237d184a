"""Ahead-of-time fit check: compile the real train step for a TPU slice on a CPU box.

With `libtpu` installed, `t5x_like.parallel.topologies.compile_only_devices` describes the
chips of any slice (v4, v5e, v5p, v6e; one or several slices) without owning
them. The mesh is built over those devices exactly as on the pod, the train state
and batch are given as `jax.ShapeDtypeStruct`s carrying their shardings, and XLA's
TPU compiler compiles the same jitted step `train()` runs: both take the run from
gin through `run_config.from_gin()` and build the step through the `RunConfig`. From
the executable we read the per-device memory (parameters, optimizer state, batch,
temporaries) and the FLOPs per step, and compare with the chip's HBM. The batch
shapes are the run's data source's (which reads no data to say them), or, with
explicit task feature lengths, those of a seqio feature converter kind (then no data
source is built at all).

    python -m launch.compile --gin_file=configs/base.gin \\
        --gin_file=configs/models/t5_1_1_xl.gin --gin_file=configs/partitioning/fsdp.gin \\
        --topology=v5p-128 --gin.BATCH_SIZE=512

Memory terms (per device): `params`/`opt_state`/`batch` are the shard sizes of the
step's inputs; `temporaries` is XLA's temp buffer (activations kept for the
backward pass, gradients, gathered FSDP weights, workspaces); `peak` is what the
step needs at once: inputs + outputs not aliased to donated inputs + temporaries +
code. The XLA TPU compiler itself refuses a program that exceeds HBM
(RESOURCE_EXHAUSTED); that is reported as "does not fit" with the compiler's figure.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from t5x_like.config import gin_config
from t5x_like.parallel import partitioning
from t5x_like.training import run_config
from t5x_like.parallel import topologies
from t5x_like.data import converters

GiB = topologies.GiB


# --------------------------------------------------------------------------- batch shapes

def abstract_batch(feature_lengths: Mapping[str, int], *, batch_size: int,
                   partitioner: partitioning.Partitioner) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as int32 ShapeDtypeStructs with the batch sharding."""
    sharding = partitioner.batch_sharding(2)
    return {name: jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=sharding)
            for name, length in feature_lengths.items()}


def per_device_bytes(tree: Any) -> int:
    """Bytes the most loaded device holds of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding else leaf.shape
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


# --------------------------------------------------------------------------- the report

@dataclasses.dataclass(kw_only=True)
class FitReport:
    target: str                    # e.g. "v5p-128 (v5p:4x4x4, 64 devices, 95 GiB HBM each)"
    mesh: str
    batch_size: int                # global sequences per step
    batch_per_data_shard: int
    num_params: int
    hbm_bytes: int
    params_bytes: int = 0
    opt_state_bytes: int = 0
    batch_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    peak_bytes: int = 0
    # Per step and device: the model's analytic count (models/flop_count.py, what MFU
    # uses), and XLA's cost analysis of the compiled step, which counts a scanned
    # layer stack's body once rather than once per layer.
    model_flops_per_device: float = 0.0
    flops_per_device: float = 0.0
    peak_flops_per_device: float = 0.0
    compile_seconds: float = 0.0
    fits: bool = False
    error: str | None = None       # the compiler's message when it refused
    num_devices: int = 1           # the mesh's

    @property
    def step_seconds_at_peak(self) -> float:
        """The step time at 100% of the chip's peak FLOP/s: a floor, not a forecast."""
        if not self.peak_flops_per_device:
            return float("nan")
        return self.model_flops_per_device / self.peak_flops_per_device

    def summary(self) -> str:
        g = lambda b: f"{b / GiB:8.2f} GiB"
        head = (f"{self.target}\nmesh {self.mesh}; global batch {self.batch_size} "
                f"({self.batch_per_data_shard} per data shard); "
                f"{self.num_params / 1e6:,.1f}M parameters; compiled in "
                f"{self.compile_seconds:.1f} s")
        verdict = (f"FITS: {self.peak_bytes / GiB:.2f} of {self.hbm_bytes / GiB:.0f} GiB "
                   f"HBM per device ({100 * self.peak_bytes / self.hbm_bytes:.0f}%)"
                   if self.fits else
                   f"DOES NOT FIT in {self.hbm_bytes / GiB:.0f} GiB HBM per device")
        if self.error:
            return f"{head}\n{verdict}\ncompiler: {self.error}"
        return "\n".join([
            head,
            "per device:",
            f"  parameters         {g(self.params_bytes)}",
            f"  optimizer state    {g(self.opt_state_bytes)}",
            f"  batch              {g(self.batch_bytes)}",
            f"  temporaries        {g(self.temp_bytes)}  (activations, gradients, "
            "gathered weights)",
            f"  code               {g(self.code_bytes)}",
            f"  peak               {g(self.peak_bytes)}  of {g(self.hbm_bytes)} HBM",
            f"model FLOPs per step: {self.model_flops_per_device:.3e} per device, "
            f"{self.model_flops_per_device * self.num_devices:.3e} in all; at peak FLOP/s "
            f"a step takes >= {1e3 * self.step_seconds_at_peak:.1f} ms (XLA's count: "
            f"{self.flops_per_device:.3e} per device)",
            verdict])

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "step_seconds_at_peak": self.step_seconds_at_peak}


_OOM_FIGURE = re.compile(
    r"(?:Used|required for [^(]*\()\s*([\d.]+)\s*([KMGT])", re.IGNORECASE)


def _bytes_from_oom(message: str) -> int:
    match = _OOM_FIGURE.search(message)
    if not match:
        return 0
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def _is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


# --------------------------------------------------------------------------- compile

def check_fit(run: run_config.RunConfig, *, devices: Sequence[Any], num_slices: int = 1,
              hbm_bytes: int, peak_flops_per_device: float = 0.0, target: str = "",
              feature_lengths: Mapping[str, int] | None = None) -> FitReport:
    """Compiles `run`'s train step over `devices` (e.g. a TPU slice's) and reports the fit.

    `feature_lengths` (the batch's) default to those of the run's data source.
    """
    partitioner = run.partitioner(devices=devices, num_slices=num_slices)
    feature_lengths = dict(feature_lengths or run.feature_lengths())
    layout = run.state_layout(partitioner, feature_lengths)
    state = layout.abstract_with_shardings()
    # An adapter run's step also reads its frozen base.
    frozen = () if layout.frozen is None else (layout.frozen.abstract_with_shardings(),)
    batch = abstract_batch(feature_lengths, batch_size=run.batch_size,
                           partitioner=partitioner)
    num_devices = partitioner.mesh.devices.size
    report = FitReport(
        target=target or f"{num_devices} devices", num_devices=num_devices,
        mesh=", ".join(f"{k}={v}" for k, v in partitioner.mesh.shape.items()),
        batch_size=run.batch_size,
        batch_per_data_shard=run.batch_size // partitioner.data_shards,
        num_params=sum(math.prod(x.shape)
                       for x in jax.tree.leaves(layout.model_params.abstract)),
        hbm_bytes=hbm_bytes, peak_flops_per_device=peak_flops_per_device,
        model_flops_per_device=run.model.training_flops_per_step(
            feature_lengths=feature_lengths, batch_size=run.batch_size) / num_devices,
        params_bytes=per_device_bytes(state.params) + per_device_bytes(frozen),
        opt_state_bytes=per_device_bytes(state.opt_state) + per_device_bytes(state.step),
        batch_bytes=per_device_bytes(batch))

    jitted = run.jitted_train_step(partitioner, layout, feature_lengths)
    start = time.perf_counter()
    try:
        compiled = jitted.lower(state, batch, *frozen).compile()
    except Exception as e:  # noqa: BLE001 - only the compiler's OOM is a verdict
        if not _is_out_of_memory(e):
            raise
        report.compile_seconds = time.perf_counter() - start
        report.error = " ".join(str(e).split())[:400]
        report.peak_bytes = _bytes_from_oom(str(e))
        return report
    report.compile_seconds = time.perf_counter() - start

    memory = compiled.memory_analysis()
    report.temp_bytes = int(memory.temp_size_in_bytes)
    report.code_bytes = int(memory.generated_code_size_in_bytes)
    report.peak_bytes = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                            - memory.alias_size_in_bytes + memory.temp_size_in_bytes
                            + memory.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report.flops_per_device = float((cost or {}).get("flops", 0.0))
    report.fits = report.peak_bytes <= hbm_bytes
    return report


def largest_batch(fit: Callable[[int], FitReport], *, data_shards: int,
                  max_per_shard: int = 4096) -> tuple[int, list[FitReport]]:
    """The largest batch per data shard that fits (0 if none), by doubling then bisection.

    `fit(global_batch_size)` compiles one candidate; every report is returned.
    """
    reports: list[FitReport] = []

    def fits(per_shard: int) -> bool:
        reports.append(fit(per_shard * data_shards))
        return reports[-1].fits

    if not fits(1):
        return 0, reports
    good, bad = 1, None
    while bad is None and good < max_per_shard:
        candidate = min(2 * good, max_per_shard)
        if fits(candidate):
            good = candidate
        else:
            bad = candidate
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, reports


def to_json(reports: Sequence[FitReport]) -> str:
    return json.dumps([r.as_dict() for r in reports], indent=1, default=float)


# --------------------------------------------------------------------------- from gin

def run_from_gin(*, gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
                 search_paths: Sequence[str] = (),
                 task_feature_lengths: Mapping[str, int] | None = None,
                 feature_converter: str | None = None, batch_size: int | None = None
                 ) -> tuple[run_config.RunConfig, dict[str, int] | None]:
    """Parses gin; returns the run `launch.train` would run, and any explicit lengths.

    With `task_feature_lengths` the batch is that of seqio's `feature_converter`
    kind (default 'enc_dec', packed), and no data source is built (none is needed to
    compile); otherwise the run's own data source says its batch.
    """
    gin_config.reset()
    gin_config.parse(gin_files=gin_files, gin_bindings=gin_bindings,
                     search_paths=search_paths)
    overrides: dict[str, Any] = {} if batch_size is None else {"batch_size": batch_size}
    if task_feature_lengths is None:
        if feature_converter is not None:
            raise ValueError("--feature_converter needs --feature_lengths; without them "
                             "the run's data source decides both.")
        return run_config.from_gin(**overrides), None
    lengths = converters.model_feature_lengths(task_feature_lengths,
                                               converter=feature_converter or "enc_dec")
    return run_config.from_gin(train_data=None, **overrides), lengths


def fit_for_gin(*, tpu: topologies.Slice, gin_files: Sequence[str],
                gin_bindings: Sequence[str] = (), search_paths: Sequence[str] = (),
                task_feature_lengths: Mapping[str, int] | None = None,
                feature_converter: str | None = None, batch_size: int | None = None,
                devices: Sequence[Any] | None = None) -> FitReport:
    """Parses gin and checks the run's fit on `tpu` (what `launch.compile` does)."""
    run, lengths = run_from_gin(gin_files=gin_files, gin_bindings=gin_bindings,
                                search_paths=search_paths,
                                task_feature_lengths=task_feature_lengths,
                                feature_converter=feature_converter, batch_size=batch_size)
    return _fit_on(tpu, run, lengths, devices or topologies.compile_only_devices(tpu))


def _fit_on(tpu: topologies.Slice, run: run_config.RunConfig,
            feature_lengths: Mapping[str, int] | None, devices: Sequence[Any]) -> FitReport:
    return check_fit(run, devices=devices, num_slices=tpu.num_slices,
                     hbm_bytes=tpu.chip.hbm_bytes,
                     peak_flops_per_device=tpu.chip.peak_bf16_flops, target=str(tpu),
                     feature_lengths=feature_lengths)


def search_for_gin(*, tpu: topologies.Slice, gin_files: Sequence[str],
                   gin_bindings: Sequence[str] = (), search_paths: Sequence[str] = (),
                   variants: Mapping[str, Sequence[str]] | None = None,
                   task_feature_lengths: Mapping[str, int] | None = None,
                   feature_converter: str | None = None, max_per_shard: int = 4096,
                   log: Callable[[str], None] = print) -> dict[str, tuple[int, FitReport | None]]:
    """For each variant (label -> extra gin bindings, e.g. a remat policy), the
    largest batch per data shard that fits, with the report of that batch."""
    devices = topologies.compile_only_devices(tpu)
    results: dict[str, tuple[int, FitReport | None]] = {}
    for label, extra in (variants or {"as configured": ()}).items():
        run, lengths = run_from_gin(gin_files=gin_files, gin_bindings=[*gin_bindings, *extra],
                                    search_paths=search_paths,
                                    task_feature_lengths=task_feature_lengths,
                                    feature_converter=feature_converter)

        def fit(global_batch: int, run=run, lengths=lengths, label=label) -> FitReport:
            report = _fit_on(tpu, dataclasses.replace(run, batch_size=global_batch),
                             lengths, devices)
            log(f"  [{label}] batch {global_batch} ({report.batch_per_data_shard}/shard): "
                f"{'fits' if report.fits else 'does not fit'}, peak "
                f"{report.peak_bytes / GiB:.2f} GiB, {report.compile_seconds:.0f} s")
            return report

        shards = run.partitioner(devices=devices, num_slices=tpu.num_slices).data_shards
        best, reports = largest_batch(fit, data_shards=shards, max_per_shard=max_per_shard)
        winner = next((r for r in reports if r.fits and r.batch_per_data_shard == best), None)
        results[label] = (best, winner)
    return results
