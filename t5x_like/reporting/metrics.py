"""Where training numbers go: TensorBoard event files and a readable progress line,
both showing metrics averaged over the log interval (`IntervalMeans`).

Event files are written through reporting/event_files.py (tensorboardX, synchronous:
a point is on disk when `write_scalars` returns; that module says why).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from t5x_like import storage
from t5x_like.reporting import event_files

log = logging.getLogger(__name__)


class TensorBoardWriter:
    """Scalar summaries into `<logdir>/events.out.tfevents.*`, durable when
    `write_scalars` returns; `logdir` may be a local folder or a URL (storage.py).

    On an object store each flush rewrites the event file whole (no append there),
    so a file is closed after EVENTS_PER_REMOTE_FILE events and the next one begun:
    the bytes written per log point stay bounded however long the run. TensorBoard
    reads the files of a folder in name order, as one stream.
    """

    def __init__(self, *, logdir: str):
        self._prefix = storage.join(logdir, "events")
        self._remote = storage.is_url(logdir)
        if self._remote:     # opened through storage.py, as every other file of a run
            event_files.open_urls_with(storage.scheme(logdir), storage.AppendableFile)
        else:
            os.makedirs(logdir, exist_ok=True)
        self._files = 0
        self._open()

    def _open(self) -> None:
        suffix = f".{self._files}" if self._remote else ""
        self._events = event_files.EventFile(self._prefix, filename_suffix=suffix)
        self._files += 1
        self._written = 0

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._events.write_scalars(step, scalars, wall_time=time.time())
        self._events.flush()     # log points are rare; a killed run keeps its curve
        self._written += len(scalars)
        if self._remote and self._written >= EVENTS_PER_REMOTE_FILE:
            self._events.close()
            self._open()

    def flush(self) -> None:
        self._events.flush()

    def close(self) -> None:
        self._events.close()


# About 1.5 MB of scalar events: the most one flush rewrites on an object store.
EVENTS_PER_REMOTE_FILE = 20_000


# How IntervalMeans averages each train-step metric (see its docstring).
TOKEN_WEIGHTED = ("loss", "cross_entropy", "z_loss", "accuracy")
LAST_VALUE = ("learning_rate",)
COUNTED = ("nonfinite",)
_STEPS, _TOKENS = "interval/finite_steps", "interval/target_tokens"


@jax.jit
def _accumulate(sums: Mapping, step_metrics: Mapping) -> dict:
    finite = step_metrics["nonfinite"] == 0
    tokens = step_metrics["target_tokens"]
    out = {_STEPS: sums[_STEPS] + finite.astype(jnp.float32),
           _TOKENS: sums[_TOKENS] + jnp.where(finite, tokens, 0.0)}
    for name, value in step_metrics.items():
        if name in COUNTED:
            out[name] = sums[name] + value
        elif name in LAST_VALUE:
            out[name] = value
        else:
            weighted = value * tokens if name in TOKEN_WEIGHTED else value
            out[name] = sums[name] + jnp.where(finite, weighted, 0.0)
    return out


class IntervalMeans:
    """Train-step metrics averaged over the steps since the last log point.

    How each metric is averaged:
      loss, cross_entropy, z_loss, accuracy: weighted by each step's `target_tokens`
        (its loss divisor: the real target tokens under the default 'tokens'
        normalization), i.e. the value one step over all of the interval's batches
        would report. CLU's Average and Accuracy metrics weigh T5X's accuracy and
        loss_per_nonpadding_target_token the same way.
      learning_rate: the last step's.
      nonfinite: how many steps had their update dropped (NaN/Inf); those steps are
        left out of every mean (an interval of only such steps averages to NaN).
      anything else (grad_norm, param_norm, target_tokens): the mean over steps.
    The sums stay on device, float32, one small jitted add per step, so the host
    never waits for a step; a log point takes a `snapshot()` (its copy to the host
    starts at once) and reads it after the next step is dispatched.

    Checkpoints carry an unfinished interval's sums (`sums()`, restored through
    `IntervalMeans(sums=...)`), so a run resumed mid-interval logs at the end of
    that interval exactly what an uninterrupted run logs.
    """

    def __init__(self, *, sums: Mapping[str, float] | None = None):
        self._sums: dict = dict(sums or {})
        self._pending = bool(sums)

    def add(self, step_metrics: Mapping[str, jax.Array]) -> None:
        start = {name: self._sums.get(name, 0.0)
                 for name in (*step_metrics, _STEPS, _TOKENS)}
        self._sums = _accumulate(start, dict(step_metrics))
        self._pending = True

    def snapshot(self) -> IntervalSnapshot:
        """The sums so far, left on device; their copy to the host has begun."""
        return IntervalSnapshot(self._sums if self._pending else {})

    def sums(self) -> dict[str, float]:
        """The interval's sums as host floats ({} right after a reset), for a checkpoint."""
        return self.snapshot().sums()

    def means(self) -> dict[str, float]:
        """The interval's averages (waits for the last step added)."""
        return self.snapshot().means()

    def reset(self) -> None:
        self._sums, self._pending = {}, False


class IntervalSnapshot:
    """An interval's sums at one step, read when wanted: `means()` waits only for
    the steps in it, so a loop that dispatches the next step first never idles the
    device to log."""

    def __init__(self, device_sums: Mapping[str, jax.Array | float]):
        self._sums = dict(device_sums)
        for value in self._sums.values():
            if isinstance(value, jax.Array):
                value.copy_to_host_async()

    def sums(self) -> dict[str, float]:
        return {name: float(value) for name, value in jax.device_get(self._sums).items()}

    def means(self) -> dict[str, float]:
        sums = self.sums()
        steps, tokens = sums.pop(_STEPS, 0.0), sums.pop(_TOKENS, 0.0)
        out = {}
        for name, total in sums.items():
            if name in COUNTED or name in LAST_VALUE:
                out[name] = total
            else:
                count = tokens if name in TOKEN_WEIGHTED else steps
                out[name] = total / count if count else math.nan
        return out


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Throughput, model FLOP/s, MFU and ETA between log points, on the host's wall clock.

    The first interval includes compilation, so it is reported but the ETA uses
    the most recent interval, which reflects the steady state. Rates are per device
    as well as in total, so runs on different numbers of chips compare directly.
    `flops_per_step` is the model's analytic count (models/flop_count.py) for the
    global batch; MFU needs the device's peak (reporting/device_peaks.py) and is left out
    when none is known.
    """

    def __init__(self, *, total_steps: int, start_step: int, num_devices: int = 1,
                 flops_per_step: float = 0.0, peak_flops_per_device: float | None = None):
        self.total_steps = total_steps
        self.num_devices = num_devices
        self.flops_per_step = flops_per_step
        self.peak_flops_per_device = peak_flops_per_device
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._tokens = 0

    def add_tokens(self, count: int) -> None:
        self._tokens += int(count)

    def tick(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        elapsed = max(now - self._last_time, 1e-9)
        flops_per_device = self.flops_per_step * steps / elapsed / self.num_devices
        rates = {"step_time_s": elapsed / steps,
                 "tokens_per_sec": self._tokens / elapsed,
                 "tokens_per_sec_per_device": self._tokens / elapsed / self.num_devices,
                 "tflops_per_device": flops_per_device / 1e12,
                 "eta_s": (self.total_steps - step) * elapsed / steps}
        if self.peak_flops_per_device:
            rates["mfu"] = flops_per_device / self.peak_flops_per_device
        self._last_step, self._last_time, self._tokens = step, now, 0
        return rates

    def line(self, step: int, metrics: Mapping[str, float], rates: Mapping[str, float]) -> str:
        width = len(str(self.total_steps))
        mfu = f" | MFU {rates['mfu']:.1%}" if "mfu" in rates else ""
        return (f"step {step:>{width}}/{self.total_steps} | loss {metrics['loss']:.4f} | "
                f"acc {metrics['accuracy']:.3f} | lr {metrics['learning_rate']:.2e} | "
                f"{rates['tokens_per_sec']:,.0f} tok/s | "
                f"{rates['tokens_per_sec_per_device']:,.0f} tok/s/device | "
                f"{rates['tflops_per_device']:.3g} TFLOP/s/device{mfu} | "
                f"{rates['step_time_s']:.3f} s/step | ETA {format_duration(rates['eta_s'])}")
