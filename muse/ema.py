"""Exponential moving average of the weights (`train.ema`, `train.ema_decay`).

The trainer keeps one fp32 copy per parameter, in `named_parameters()` order, and after
every optimizer step that was taken moves it towards the weights:

    ema <- decay * ema + (1 - decay) * weights

A checkpoint stores it as `model_ema.safetensors` beside `model.safetensors`: the model's
whole state dict with the parameters replaced by their averages, so the model's own
`config.json` + that file is a loadable model (`muse sample` and `muse eval` use it by
default, `sample.use_ema` / `eval.use_ema` choose). It is also what a resume reads back.
"""

from __future__ import annotations

import torch


def init(model: torch.nn.Module) -> list[torch.Tensor]:
    """The average starts at the initial weights."""
    return [p.detach().clone() for p in model.parameters()]


@torch.no_grad()
def update(ema: list[torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    """One EMA step in place (lerp: ema += (1 - decay) * (p - ema))."""
    torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - decay)


def state_dict(model: torch.nn.Module, ema: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict with every parameter replaced by its average (buffers as they are)."""
    names = [n for n, _ in model.named_parameters()]
    if len(names) != len(ema):
        raise ValueError(f"EMA has {len(ema)} tensors, the model {len(names)} parameters")
    out = dict(model.state_dict())
    out.update(zip(names, ema))
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def from_state_dict(model: torch.nn.Module, saved: dict, device) -> list[torch.Tensor]:
    """The trainer's list back from a saved state dict (model_ema.safetensors); a parameter it
    lacks is an error naming it."""
    missing = [n for n, _ in model.named_parameters() if n not in saved]
    if missing:
        raise KeyError(f"model_ema.safetensors lacks parameters {missing[:5]}")
    return [saved[n].to(device) for n, _ in model.named_parameters()]
