"""Where training numbers go: TensorBoard event files and a readable progress line.

Event files are written with `tensorboardX`'s public `SummaryWriter` API. Why that
writer: it is maintained, writes ordinary event files that TensorBoard (and
`EventAccumulator`) read, and needs only numpy, protobuf and packaging. The
alternatives each bring more: the `tensorboard` package's writer is a private
module and drags in the TensorBoard server (werkzeug, grpcio, markdown, ...);
`tf.summary` needs TensorFlow, which the core must not; CLU's writers need
TensorFlow too.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping

from tensorboardX import SummaryWriter

log = logging.getLogger(__name__)


class TensorBoardWriter:
    """Scalar summaries into `<logdir>/events.out.tfevents.*`."""

    def __init__(self, *, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self._writer = SummaryWriter(logdir=logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        wall_time = time.time()
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), global_step=int(step),
                                    walltime=wall_time)
        self._writer.flush()     # log points are rare; a killed run keeps its curve

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


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
    """Throughput and ETA between log points, measured on the host's wall clock.

    The first interval includes compilation, so it is reported but the ETA uses
    the most recent interval, which reflects the steady state.
    """

    def __init__(self, *, total_steps: int, start_step: int):
        self.total_steps = total_steps
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._tokens = 0

    def add_tokens(self, count: int) -> None:
        self._tokens += int(count)

    def tick(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        elapsed = max(now - self._last_time, 1e-9)
        rates = {"step_time_s": elapsed / steps,
                 "tokens_per_sec": self._tokens / elapsed,
                 "eta_s": (self.total_steps - step) * elapsed / steps}
        self._last_step, self._last_time, self._tokens = step, now, 0
        return rates

    def line(self, step: int, metrics: Mapping[str, float], rates: Mapping[str, float]) -> str:
        width = len(str(self.total_steps))
        return (f"step {step:>{width}}/{self.total_steps} | loss {metrics['loss']:.4f} | "
                f"acc {metrics['accuracy']:.3f} | lr {metrics['learning_rate']:.2e} | "
                f"{rates['tokens_per_sec']:,.0f} tok/s | {rates['step_time_s']:.3f} s/step | "
                f"ETA {format_duration(rates['eta_s'])}")
