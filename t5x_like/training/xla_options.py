"""XLA compiler options for the train step, per platform, each chosen by measurement.

Options go to `jax.jit(..., compiler_options=...)` of the step alone (never through
the process-wide XLA_FLAGS), so they apply wherever the step is compiled: `train()`,
the AOT fit check, the benchmarks, a user's own loop.

CPU: the memory-optimised scheduler instead of the default concurrency-optimised
one. It orders the same ops to free buffers early, so it changes no arithmetic (the
losses stay bitwise equal; tests/test_xla_options.py) and on two cores it costs no
speed while it cuts the step's temporaries by about a third (benchmarks/RESULTS.md,
"The training step on CPU").

GPU and TPU: none yet (their schedulers are latency-hiding ones with their own
memory limits; GPU flags wait for a measurement on a GPU).
"""

from __future__ import annotations

from typing import Any

CPU_TRAIN_STEP_OPTIONS = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}


def train_step_options(platform: str) -> dict[str, Any]:
    """Compiler options for a train step whose devices are on `platform`."""
    return dict(CPU_TRAIN_STEP_OPTIONS) if platform == 'cpu' else {}
