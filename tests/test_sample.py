"""Parallel decoding: overfit a tiny model, decode its tokens back; seeds; one batched guided forward."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from muse.config import ModelConfig
from muse.masking import mask_tokens, masked_loss
from muse.models import MuseConfig, MuseTransformer, build_model
from muse.sample import generate, make_grid

torch.set_num_threads(1)


def tiny(codebook=16):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind="base", preset="tiny", codebook_size=codebook, text_dim=8))


def test_overfit_one_batch_then_decode_reproduces_it():
    model = tiny()
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 16, (2, 256), generator=g)
    hidden = torch.randn(2, 3, 8, generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        inp, m = mask_tokens(targets, model.config.mask_token_id, g)
        loss = masked_loss(model(inp, hidden, mask), targets, m, label_smoothing=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.1 * sum(losses[:5]) / 5
    model.eval()
    ids = generate(model, hidden, mask, steps=12, guidance_scale=1.0, temperature=1.0,
                   generator=torch.Generator().manual_seed(1))
    assert (ids == targets).float().mean() > 0.98
    assert (ids != model.config.mask_token_id).all()


def test_decoding_is_deterministic_under_a_seed():
    model = tiny().eval()
    hidden, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    unc, unc_mask = torch.randn(1, 1, 8), torch.ones(1, 1, dtype=torch.bool)
    run = lambda seed: generate(model, hidden, mask, unc, unc_mask, steps=6, guidance_scale=3.0,
                                generator=torch.Generator().manual_seed(seed))
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 256) and (a < 16).all()


def test_guidance_is_one_batched_forward_per_step():
    model = tiny().eval()
    calls = []
    model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    hidden, mask = torch.randn(3, 4, 8), torch.ones(3, 4, dtype=torch.bool)
    unc, unc_mask = torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool)
    generate(model, hidden, mask, unc, unc_mask, steps=5, guidance_scale=4.0,
             generator=torch.Generator().manual_seed(0))
    assert calls == [6] * 5  # cond + uncond stacked: batch 2B, one call per step


def test_linear_guidance_rises_from_one_to_the_scale(monkeypatch):
    """Each step's guided mix gets its own scale: 1 at the first step (the layout unguided), the full
    scale at the last; the constant schedule keeps the scale, and the two decode differently."""
    import muse.sample as sample

    model = tiny().eval()
    hidden, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    unc, unc_mask = torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool)
    seen, mix = [], sample._guided_logits
    monkeypatch.setattr(sample, "_guided_logits", lambda m, ids, cond, cache, scale, masked:
                        seen.append(scale) or mix(m, ids, cond, cache, scale, masked))
    run = lambda schedule: generate(model, hidden, mask, unc, unc_mask, steps=5, guidance_scale=4.0,
                                    generator=torch.Generator().manual_seed(0), guidance_schedule=schedule)
    linear = run("linear")
    assert seen == [1.0, 1.75, 2.5, 3.25, 4.0]
    seen.clear()
    constant = run("constant")
    assert seen == [4.0] * 5 and not torch.equal(linear, constant)
    assert sample.guidance_at(0, 1, 4.0, "linear") == 4.0        # one step: the full scale
    with pytest.raises(ValueError, match="guidance_schedule"):
        sample.guidance_at(0, 5, 4.0, "cosine")


def test_schedule_unmasks_progressively():
    """After step s of S, about N cos(pi/2 s/S) tokens are still masked."""
    import math

    model = tiny().eval()
    seen = []
    model.register_forward_hook(lambda mod, args, out: seen.append((args[0] == 16).sum(1)[0].item()))
    generate(model, torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool), steps=8, guidance_scale=1.0,
             generator=torch.Generator().manual_seed(0))
    expected = [256] + [math.floor(256 * math.cos(math.pi / 2 * s / 8)) for s in range(1, 8)]
    assert seen == expected


def test_grid():
    imgs = torch.randint(0, 255, (5, 4, 4, 3), dtype=torch.uint8).numpy()
    grid = make_grid(imgs)
    assert grid.shape == (8, 12, 3) and (grid[:4, :4] == imgs[0]).all()


def test_grid_with_captions_draws_them_under_each_cell():
    imgs = np.full((3, 64, 64, 3), 90, dtype=np.uint8)
    long = "a very long prompt " * 20 + "with_a_single_word_that_is_far_wider_than_one_cell"
    grid = make_grid(imgs, captions=["a cat", long, ""])  # 2 x 2 cells, each image + its strip
    strip = grid.shape[0] // 2 - 64
    assert grid.shape[1] == 128 and 0 < strip < 64  # same columns; the long prompt is cut, not grown
    assert (grid[:64, :64] == imgs[0]).all() and (grid[:64, 64:] == imgs[1]).all()
    assert (grid[64 + strip:128 + strip, :64] == imgs[2]).all()
    below = grid[64:64 + strip]
    assert (below[:, :64] < 50).any() and (below[:, 64:] < 50).any()  # dark text on white
    assert (below > 200).mean() > 0.5


def uniform_model(grid=8, codebook=16):
    """A real tiny transformer whose head is zeroed: equally confident in every token everywhere."""
    model = MuseTransformer(MuseConfig(hidden_size=16, depth=1, num_heads=2, codebook_size=codebook, text_dim=8,
                                       grid_size=grid)).eval()
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    return model


def test_temperature_zero_with_ties_follows_the_schedule_by_rank():
    """All confidences tie: a threshold re-masked every tied token (nothing decided until the last
    step); selection by rank decides 64 - floor(64 cos(pi/2 s/8)) tokens after step s, and which
    tied tokens go first is drawn from the generator."""
    model = uniform_model()
    inputs = []
    model.register_forward_hook(lambda mod, args, out: inputs.append(args[0].clone()))

    def run(seed):
        inputs.clear()
        ids = generate(model, torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool), steps=8,
                       guidance_scale=1.0, temperature=0.0, generator=torch.Generator().manual_seed(seed))
        return [x != 16 for x in inputs[1:]] + [ids != 16]                # decided after each step

    decided = run(0)
    assert [d.sum(1).tolist() for d in decided] == [[n, n] for n in [2, 5, 11, 19, 29, 40, 52, 64]]
    assert all((later >= earlier).all() for earlier, later in zip(decided, decided[1:]))  # never undone
    again, other = run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(decided, again))        # seeded
    assert not torch.equal(decided[0], other[0])                          # ties broken at random


class RandomDraws(TorchDispatchMode):
    """Records the size of every random tensor drawn while active."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        if any(r in name for r in ("rand", "uniform", "exponential", "normal", "multinomial", "bernoulli")):
            self.sizes.append((name, out.numel()))
        return out


def test_sampling_draws_no_vocabulary_sized_noise():
    """Finding 7: the noise is per masked position, never (batch, tokens, vocab)."""
    model = tiny(codebook=64).eval()
    hidden, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    unc, unc_mask = torch.randn(1, 1, 8), torch.ones(1, 1, dtype=torch.bool)
    with RandomDraws() as draws:
        ids = generate(model, hidden, mask, unc, unc_mask, steps=4, guidance_scale=2.0,
                       generator=torch.Generator().manual_seed(0))
    assert (ids < 64).all() and draws.sizes
    assert max(n for _, n in draws.sizes) <= 2 * 256, draws.sizes      # B x N at most


def test_row_sampler_follows_the_distribution_and_reports_exact_log_probs():
    from muse.sample import _sample_rows

    p = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    logits = p.log().expand(40000, 5).contiguous()
    ids, logp = _sample_rows(logits.clone(), torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=5).float() / len(ids)
    assert torch.allclose(freq, p, atol=0.01) and freq[1] == 0           # never a zero-probability token
    assert torch.allclose(logp, p.log()[ids], atol=1e-6)


def test_memory_keys_and_values_are_computed_once_per_call_and_change_nothing():
    """Issue 13: the memory (text, plus the super-res low-res encoder) never changes while
    decoding; its cross-attention K/V are computed once per `generate` call, not once per step
    (on main: every step), with bit-identical logits and samples."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="superres", preset="tiny", codebook_size=16, text_dim=8,
                                    depth=1, low_res_depth=1)).eval()
    g = torch.Generator().manual_seed(0)
    hidden, mask = torch.randn(2, 4, 8, generator=g), torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2:] = False
    low = torch.randint(0, 16, (2, 256), generator=g)
    ids = torch.randint(0, 17, (2, 4096), generator=g)
    with torch.no_grad():
        cache = model.memory_cache(hidden, mask, low)
        assert torch.equal(model(ids, memory_cache=cache), model(ids, hidden, mask, low))
    unc, unc_mask = torch.randn(1, 3, 8, generator=g), torch.ones(1, 3, dtype=torch.bool)
    memory_calls = []
    memory = model.memory
    model.memory = lambda *a: memory_calls.append(a[0].shape[0]) or memory(*a)  # counts, then the real one
    run = lambda cached: generate(model, hidden, mask, unc, unc_mask, steps=3, guidance_scale=3.0,
                                  generator=torch.Generator().manual_seed(1), low_res_ids=low, cache_memory=cached)
    cached = run(True)
    assert memory_calls == [4]                       # once, for cond + uncond stacked
    memory_calls.clear()
    assert torch.equal(run(False), cached) and memory_calls == [4, 4, 4]
