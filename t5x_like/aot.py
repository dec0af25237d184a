"""Ahead-of-time fit check: compile the real train step for a TPU slice on a CPU box.

With `libtpu` installed, `t5x_like.topologies.compile_only_devices` describes the
chips of any slice (v4, v5e, v5p, v6e; one or several slices) without owning
them. The mesh is built over those devices exactly as on the pod, the train state
and batch are given as `jax.ShapeDtypeStruct`s carrying their shardings, and XLA's
TPU compiler compiles the same jitted step `train()` runs. From the executable we
read the per-device memory (parameters, optimizer state, batch, temporaries) and
the FLOPs per step, and compare with the chip's HBM. No data stack is needed: the
batch shapes come from the task feature lengths and the feature converter kind
(`t5x_like.data.converters`, the description training uses too).

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

import copy
import dataclasses
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from t5x_like import partitioning, topologies, trainer
from t5x_like.data import converters
from t5x_like.optimizers import Optimizer

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
    flops_per_device: float = 0.0  # per step, from the compiled cost analysis
    peak_flops_per_device: float = 0.0
    compile_seconds: float = 0.0
    fits: bool = False
    error: str | None = None       # the compiler's message when it refused

    @property
    def step_seconds_at_peak(self) -> float:
        """The step time at 100% of the chip's peak FLOP/s: a floor, not a forecast."""
        if not self.peak_flops_per_device:
            return float("nan")
        return self.flops_per_device / self.peak_flops_per_device

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
            f"FLOPs per step: {self.flops_per_device:.3e} per device, "
            f"{self.flops_per_device * self._devices:.3e} in all; at peak FLOP/s a step "
            f"takes >= {1e3 * self.step_seconds_at_peak:.1f} ms",
            verdict])

    @property
    def _devices(self) -> int:
        match = re.search(r"(\d+) devices", self.target)
        return int(match.group(1)) if match else 1

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

def check_fit(*, model: trainer.Model, optimizer: Optimizer,
              partitioner: partitioning.Partitioner, feature_lengths: Mapping[str, int],
              batch_size: int, num_microbatches: int = 1, hbm_bytes: int,
              peak_flops_per_device: float = 0.0, target: str = "") -> FitReport:
    """Compiles the train step for `partitioner`'s devices and reports the fit."""
    if batch_size % partitioner.data_shards:
        raise ValueError(f"batch_size={batch_size} must divide evenly over the "
                         f"{partitioner.data_shards} data shards of {partitioner}.")
    layout = trainer.state_layout(model=model, optimizer=optimizer, partitioner=partitioner,
                                  feature_lengths=feature_lengths)
    state = layout.abstract_with_shardings()
    batch = abstract_batch(feature_lengths, batch_size=batch_size, partitioner=partitioner)
    report = FitReport(
        target=target or f"{len(partitioner.mesh.devices.flat)} devices",
        mesh=", ".join(f"{k}={v}" for k, v in partitioner.mesh.shape.items()),
        batch_size=batch_size, batch_per_data_shard=batch_size // partitioner.data_shards,
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(layout.abstract.params)),
        hbm_bytes=hbm_bytes, peak_flops_per_device=peak_flops_per_device,
        params_bytes=per_device_bytes(state.params),
        opt_state_bytes=per_device_bytes(state.opt_state) + per_device_bytes(state.step),
        batch_bytes=per_device_bytes(batch))

    jitted = trainer.jit_train_step(  # exactly the step train() runs
        trainer.make_train_step(model=model, optimizer=optimizer,
                                num_microbatches=num_microbatches),
        partitioner=partitioner, layout=layout, batch_feature_names=tuple(batch))
    start = time.perf_counter()
    try:
        compiled = jitted.lower(state, batch).compile()
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


# --------------------------------------------------------------------------- from gin

@dataclasses.dataclass(kw_only=True)
class Run:
    """What a gin config says about one training run, without building its data."""
    model: trainer.Model
    optimizer: Optimizer
    partitioner: partitioning.Partitioner
    feature_lengths: dict[str, int]
    batch_size: int
    num_microbatches: int


def run_from_gin(*, devices: Sequence[Any], num_slices: int = 1,
                 task_feature_lengths: Mapping[str, int] | None = None,
                 feature_converter: str | None = None,
                 batch_size: int | None = None) -> Run:
    """Reads the parsed gin config's model, optimizer, partitioner, lengths and batch.

    The partitioner is rebuilt over `devices` (the TPU slice's) with the gin
    config's parallelism and rules. Feature lengths come from the
    `SeqioDataSource` bindings (TASK_FEATURE_LENGTHS, feature_converter, pack) unless
    given; any other data source is built and asked for `model_feature_lengths()`.
    """
    import gin
    from t5x_like import optimizers
    from t5x_like import train as train_lib

    bindings = gin.get_bindings(train_lib.train, resolve_references=False)
    evaluate = copy.deepcopy   # evaluating a gin reference = deep-copying it
    try:
        model = evaluate(bindings["model"]) if "model" in bindings \
            else evaluate(gin.query_parameter("%MODEL"))
    except ValueError as e:
        raise ValueError("The gin config defines no model: include a "
                         "configs/models/*.gin file.") from e
    optimizer = evaluate(bindings["optimizer"]) if "optimizer" in bindings \
        else optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule())
    partitioner = _partitioner_from_gin(devices, num_slices)
    if batch_size is None:
        if "batch_size" not in bindings:
            raise ValueError("No batch size: set BATCH_SIZE in gin or pass --batch_size.")
        batch_size = int(evaluate(bindings["batch_size"]))
    num_microbatches = int(evaluate(bindings.get("num_microbatches", 1)))
    lengths = _feature_lengths_from_gin(bindings, task_feature_lengths, feature_converter)
    return Run(model=model, optimizer=optimizer, partitioner=partitioner,
               feature_lengths=lengths, batch_size=batch_size,
               num_microbatches=num_microbatches)


def _feature_lengths_from_gin(bindings: Mapping[str, Any],
                              task_feature_lengths: Mapping[str, int] | None,
                              feature_converter: str | None) -> dict[str, int]:
    import gin
    data_ref = bindings.get("train_data")
    data_kwargs: dict[str, Any] = {}
    is_seqio = data_ref is not None and getattr(
        getattr(data_ref, "configurable", None), "name", "").endswith("SeqioDataSource")
    if is_seqio:
        data_kwargs = gin.get_bindings(data_ref.configurable.wrapped)
    elif data_ref is not None and task_feature_lengths is None:
        return dict(copy.deepcopy(data_ref).model_feature_lengths())
    if task_feature_lengths is None:
        task_feature_lengths = data_kwargs.get("task_feature_lengths")
        if task_feature_lengths is None:
            try:
                task_feature_lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
            except ValueError:
                raise ValueError("No feature lengths: set TASK_FEATURE_LENGTHS in gin or "
                                 "pass --feature_lengths=inputs=512,targets=114.") from None
    converter = feature_converter or data_kwargs.get("feature_converter", "enc_dec")
    return converters.model_feature_lengths(task_feature_lengths, converter=converter,
                                            pack=data_kwargs.get("pack", True))


def to_json(reports: Sequence[FitReport]) -> str:
    return json.dumps([r.as_dict() for r in reports], indent=1, default=float)



# --------------------------------------------------------------------------- gin-level entry points

def _parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
               search_paths: Sequence[str]) -> None:
    from t5x_like import gin_config
    gin_config.reset()
    gin_config.parse(gin_files=gin_files, gin_bindings=gin_bindings, search_paths=search_paths)


def fit_for_gin(*, tpu: topologies.Slice, gin_files: Sequence[str],
                gin_bindings: Sequence[str] = (), search_paths: Sequence[str] = (),
                task_feature_lengths: Mapping[str, int] | None = None,
                feature_converter: str | None = None, batch_size: int | None = None,
                devices: Sequence[Any] | None = None) -> FitReport:
    """Parses gin and checks the run's fit on `tpu` (what `launch.compile` does)."""
    devices = devices or topologies.compile_only_devices(tpu)
    _parse_gin(gin_files, gin_bindings, search_paths)
    run = run_from_gin(devices=devices, num_slices=tpu.num_slices,
                       task_feature_lengths=task_feature_lengths,
                       feature_converter=feature_converter, batch_size=batch_size)
    return check_fit(model=run.model, optimizer=run.optimizer, partitioner=run.partitioner,
                     feature_lengths=run.feature_lengths, batch_size=run.batch_size,
                     num_microbatches=run.num_microbatches, hbm_bytes=tpu.chip.hbm_bytes,
                     peak_flops_per_device=tpu.chip.peak_bf16_flops, target=str(tpu))


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
        def fit(global_batch: int) -> FitReport:
            report = fit_for_gin(tpu=tpu, gin_files=gin_files,
                                 gin_bindings=[*gin_bindings, *extra],
                                 search_paths=search_paths,
                                 task_feature_lengths=task_feature_lengths,
                                 feature_converter=feature_converter,
                                 batch_size=global_batch, devices=devices)
            log(f"  [{label}] batch {global_batch} ({report.batch_per_data_shard}/shard): "
                f"{'fits' if report.fits else 'does not fit'}, peak "
                f"{report.peak_bytes / GiB:.2f} GiB, {report.compile_seconds:.0f} s")
            return report
        shards = _data_shards_for_gin(tpu, devices, gin_files, [*gin_bindings, *extra],
                                      search_paths)
        best, reports = largest_batch(fit, data_shards=shards, max_per_shard=max_per_shard)
        winner = next((r for r in reports if r.fits and r.batch_per_data_shard == best), None)
        results[label] = (best, winner)
    return results


def _data_shards_for_gin(tpu, devices, gin_files, gin_bindings, search_paths) -> int:
    _parse_gin(gin_files, gin_bindings, search_paths)
    return _partitioner_from_gin(devices, tpu.num_slices).data_shards


def _partitioner_from_gin(devices: Sequence[Any], num_slices: int
                          ) -> partitioning.Partitioner:
    """The configured Partitioner (parallelism, rules), over the slice's devices."""
    import gin
    try:
        kwargs = gin.get_bindings(partitioning.Partitioner)
    except ValueError:          # no partitioning gin file: the defaults
        kwargs = {}
    kwargs = {k: v for k, v in kwargs.items() if k not in ("devices", "num_slices")}
    return partitioning.Partitioner(devices=devices, num_slices=num_slices, **kwargs)
