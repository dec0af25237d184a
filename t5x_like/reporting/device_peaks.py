"""Dense bf16 peak FLOP/s per device, by the name JAX gives the device (MFU's denominator).

Vendor figures for dense (not 2:4 sparse) bf16 matmuls, per JAX device: one GPU, or
one TPU chip (v4 and v5p chips are one "megacore" device). What a large matmul
really reaches is lower (about 790-800 TFLOP/s on an H100 or H200 SXM;
benchmarks/RESULTS.md), so 50% MFU against these peaks is ~62% of the practical
ceiling. Unknown devices (CPUs, new chips) have no peak: the run then shows TFLOP/s
without MFU, unless `train.peak_flops_per_device` names one.
"""

from __future__ import annotations

from t5x_like.parallel import topologies

# Substrings of `jax.Device.device_kind` (lower case), most specific first.
GPU_PEAK_BF16_FLOPS = (
    ('h100 pcie', 756e12),
    ('h100 nvl', 835e12),
    ('h100', 989e12),   # SXM: "NVIDIA H100 80GB HBM3"
    ('h200', 989e12),   # also GH200
    ('b200', 2250e12),
    ('a100', 312e12),
)

# JAX's TPU device kinds ("TPU v4", "TPU v5 lite", "TPU v5", "TPU v5p", "TPU v6 lite")
# to the chip generations of topologies.CHIPS, most specific first.
_TPU_GENERATIONS = (('v6 lite', 'v6e'), ('v6e', 'v6e'), ('v5 lite', 'v5e'),
                    ('v5e', 'v5e'), ('v5p', 'v5p'), ('v5', 'v5p'), ('v4', 'v4'))


def peak_bf16_flops(device_kind: str) -> float | None:
    """The dense bf16 peak of one device of this kind, or None if unknown."""
    kind = device_kind.lower()
    if kind.startswith('tpu'):
        for fragment, generation in _TPU_GENERATIONS:
            if fragment in kind:
                return topologies.CHIPS[generation].peak_bf16_flops
        return None
    for fragment, peak in GPU_PEAK_BF16_FLOPS:
        if fragment in kind:
            return peak
    return None
