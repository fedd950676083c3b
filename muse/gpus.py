"""What we know of a GPU by its name: dense peak FLOP/s for MFU and the precision to train in.

Names are matched exactly as `torch.cuda.get_device_name()` reports them (after stripping an
"NVIDIA " prefix), never by substring: "L40S" and "L40" are not an "L4", an "H100 PCIe" or
"H100 NVL" is not an SXM H100. A GPU not in the table gets no MFU ("MFU unknown"), never a
wrong one. Figures: NVIDIA's datasheets, dense (no 2:4 sparsity) bf16 tensor-core FLOP/s,
fp16 for the cards without bf16.
"""

from __future__ import annotations

import torch

PEAK_FLOPS = {
    "H100 80GB HBM3": 989e12,        # SXM5
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,                  # SXM
    "H200 NVL": 835e12,
    "A100-SXM4-80GB": 312e12,
    "A100-SXM4-40GB": 312e12,
    "A100-PCIE-40GB": 312e12,
    "A100 80GB PCIe": 312e12,
    "L4": 121e12,
    "L40S": 362e12,
    "L40": 181e12,
    "A10": 125e12,
    "A10G": 70e12,
    "Tesla T4": 65e12,               # fp16 (no bf16)
    "Tesla V100-SXM2-16GB": 125e12,  # fp16 (no bf16)
    "Tesla V100-SXM2-32GB": 125e12,
}


# fp32 without tensor cores (NVIDIA's datasheets): what the encoders run at, since encode keeps
# the VQ in exact fp32 with TF32 off (`muse plan`'s FLOP-derived encode rate)
PEAK_FP32_FLOPS = {
    "H100 80GB HBM3": 67e12,
    "H100 PCIe": 51e12,
    "H200": 67e12,
    "A100-SXM4-80GB": 19.5e12,
    "A100-SXM4-40GB": 19.5e12,
    "A100-PCIE-40GB": 19.5e12,
    "A100 80GB PCIe": 19.5e12,
    "L4": 30.3e12,
    "L40S": 91.6e12,
    "A10": 31.2e12,
    "Tesla T4": 8.1e12,
    "Tesla V100-SXM2-16GB": 15.7e12,
    "Tesla V100-SXM2-32GB": 15.7e12,
}


def _lookup(table: dict, device_name: str) -> float | None:
    name = device_name.strip()
    return table.get(name) or table.get(name.removeprefix("NVIDIA ").strip())


def peak_flops(device_name: str) -> float | None:
    """Dense peak FLOP/s of the GPU named `device_name`, or None when it is not known."""
    return _lookup(PEAK_FLOPS, device_name)


def peak_flops_fp32(device_name: str) -> float | None:
    """Peak fp32 FLOP/s (no tensor cores) of the GPU named `device_name`, or None when not known."""
    return _lookup(PEAK_FP32_FLOPS, device_name)


def mfu_text(mfu: float | None) -> str:
    return "MFU unknown" if mfu is None else f"MFU {100 * mfu:.1f}%"


def amp_dtype(device: torch.device, mixed_precision: bool) -> torch.dtype | None:
    """bf16 autocast on GPUs with native bf16 (Ampere and later); fp16 (with a GradScaler) on
    T4/V100, where bf16 is only emulated and slower than fp32; None (fp32) on the CPU or
    when mixed precision is off."""
    if not mixed_precision or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
