"""XLA compiler options for the train step, per platform, each chosen by measurement.

Options go to `jax.jit(..., compiler_options=...)` of the step alone (never through
the process-wide XLA_FLAGS), so they apply wherever the step is compiled: `train()`,
the AOT fit check, the benchmarks, a user's own loop.

CPU: XLA's default CPU scheduler is concurrency-optimised: it orders the HLO so
that independent ops can run at the same time, which keeps many activations and
their gradients alive at once. The memory-optimised scheduler orders the same ops
to free buffers early. Scheduling changes no arithmetic (the losses stay bitwise
equal; tests/test_xla_options.py), and on the issue-15 run (T5.1.1-small, 512/114,
batch 8, 2 cores) it cut XLA's temporaries from 3.69 to 2.41 GiB and peak RSS from
about 6.0 to 4.7 GiB, with the step no slower (faster in every run: on two cores
there is little concurrency to win; benchmarks/RESULTS.md, "The training step on
CPU").

GPU and TPU: none yet (their schedulers are latency-hiding ones with their own
memory limits; GPU flags wait for a measurement on a GPU).
"""

from __future__ import annotations

from typing import Any

CPU_TRAIN_STEP_OPTIONS = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}


def train_step_options(platform: str) -> dict[str, Any]:
    """Compiler options for a train step whose devices are on `platform`."""
    return dict(CPU_TRAIN_STEP_OPTIONS) if platform == 'cpu' else {}
