"""Training memory arithmetic: what one sample's activations and the optimizer state cost.

The activations are measured, not guessed: the model is built on PyTorch's meta device (no
memory, no compute), one forward runs at batch 1 and at batch 2, and every tensor autograd
saves for the backward pass is counted; the difference is one sample's share. The same count
on the CPU gives the same bytes (tests/test_gpu_safety.py). `plan_batch` turns that and a
GPU's free memory into a micro-batch and `grad_accum` that keep the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GiB = 1024 ** 3


def _saved_bytes(model, batch: int, text_len: int, device: str, dtype: torch.dtype) -> int:
    """Bytes autograd keeps for backward in one training forward at `batch`, plus the logits
    and the loss's fp32 rows (an upper bound: every row, as if all were masked)."""
    c = model.config
    ids = torch.zeros(batch, c.grid_size ** 2, dtype=torch.long, device=device)
    hidden = torch.zeros(batch, text_len, c.text_dim, dtype=dtype, device=device)
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
    low = torch.zeros(batch, 256, dtype=torch.long, device=device) if c.kind == "superres" else None
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids, hidden, mask, low)
    rows = logits.shape[0] * logits.shape[1] * logits.shape[2]
    return total + logits.numel() * logits.element_size() + 2 * 4 * rows


def activation_bytes_per_sample(model_cfg, text_len: int = 77, dtype: torch.dtype = torch.bfloat16,
                                checkpointing: bool = False, device: str = "meta") -> int:
    """One sample's saved activations in training (bytes), the model in `dtype` (bf16 stands
    for mixed precision's matmul outputs), measured on `device` ("meta": nothing allocated)."""
    from muse.models import build_model

    with torch.device(device):
        model = build_model(model_cfg).to(dtype)
    model.train()
    model.activation_checkpointing = checkpointing
    one = _saved_bytes(model, 1, text_len, device, dtype)
    two = _saved_bytes(model, 2, text_len, device, dtype)
    return two - one


def state_bytes(num_params: int, ema: bool, world: int) -> int:
    """fp32 weights + grads + AdamW's two moments (+ an EMA copy, + DDP's gradient buckets)."""
    words = 4 + (1 if ema else 0) + (1 if world > 1 else 0)
    return 4 * words * num_params


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    grad_accum: int
    per_sample_bytes: int
    state_bytes: int
    budget_bytes: int

    def explain(self) -> str:
        used = self.state_bytes + self.micro_batch * self.per_sample_bytes
        return (f"batch plan: micro-batch {self.micro_batch} x grad_accum {self.grad_accum}: "
                f"{self.state_bytes / GiB:.2f} GiB weights+grads+optimizer + {self.micro_batch} x "
                f"{self.per_sample_bytes / GiB:.3f} GiB activations = {used / GiB:.2f} GiB "
                f"of a {self.budget_bytes / GiB:.2f} GiB budget")


def plan_batch(model_cfg, global_batch: int, free_bytes: int, *, ema: bool = False, world: int = 1,
               checkpointing: bool = False, text_len: int = 77, headroom: float = 0.85) -> BatchPlan:
    """The largest micro-batch dividing `global_batch` (per rank) whose activations and the
    training state fit `headroom` of `free_bytes`; the rest of the global batch is accumulation.
    Raises ValueError with the arithmetic when not even one sample fits."""
    from muse.models import build_model

    with torch.device("meta"):
        num_params = sum(p.numel() for p in build_model(model_cfg).parameters())
    per_sample = activation_bytes_per_sample(model_cfg, text_len, checkpointing=checkpointing)
    state = state_bytes(num_params, ema, world)
    budget = int(free_bytes * headroom)
    fits = (budget - state) // per_sample if budget > state else 0
    micro = max((d for d in range(1, global_batch + 1) if global_batch % d == 0 and d <= fits), default=0)
    plan = BatchPlan(micro, global_batch // micro if micro else 0, per_sample, state, budget)
    if not micro:
        hint = "" if checkpointing else "; set train.activation_checkpointing: true"
        raise ValueError(f"not one sample fits: {state / GiB:.2f} GiB of training state + "
                         f"{per_sample / GiB:.3f} GiB per sample > {budget / GiB:.2f} GiB "
                         f"({headroom:.0%} of {free_bytes / GiB:.2f} GiB free){hint}")
    return plan


def free_memory(device: torch.device) -> int | None:
    """Bytes free on a CUDA device now (None on the CPU: no budget to plan against)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def resolve_batch(cfg, world: int, free_bytes: int | None):
    """`train.global_batch` (and `batch_size: auto`) -> a config with integer `batch_size` and
    `grad_accum` whose product x `world` is the global batch, and a line saying why (None when
    the config already spelled both out). `free_bytes`: the least free memory of any rank."""
    from muse.config import ConfigError

    t = cfg.train
    if t.global_batch is None:
        return cfg, None
    per_rank, rem = divmod(t.global_batch, world)
    if rem:
        raise ConfigError(f"train.global_batch={t.global_batch} is not a multiple of the {world} ranks")
    if t.batch_size != "auto":
        micro, why = t.batch_size, f"train.batch_size {t.batch_size}"
    elif free_bytes is None:  # CPU: memory is not the limit; the recipe's micro-batch of 16 or less
        micro = max(d for d in range(1, min(16, per_rank) + 1) if per_rank % d == 0)
        why = "batch_size auto on CPU: the largest divisor of the per-rank batch up to 16"
    else:
        try:
            plan = plan_batch(cfg.model, per_rank, free_bytes, ema=t.ema, world=world,
                              checkpointing=t.activation_checkpointing, text_len=cfg.encode.text_max_length)
        except ValueError as e:
            raise ConfigError(f"train.batch_size auto: {e}") from None
        micro, why = plan.micro_batch, plan.explain()
    if per_rank % micro:
        raise ConfigError(f"train.global_batch={t.global_batch} over {world} rank(s) is {per_rank} per rank, "
                          f"not a multiple of train.batch_size={micro}")
    train = t.model_copy(update={"batch_size": micro, "grad_accum": per_rank // micro, "global_batch": None})
    return cfg.model_copy(update={"train": train}), (f"global batch {t.global_batch} = {world} rank(s) x "
                                                     f"batch {micro} x accum {per_rank // micro} ({why})")
