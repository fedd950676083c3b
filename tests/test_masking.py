"""The training objective: cosine masking, loss on masked positions only, guidance dropout."""

import math

import torch

from muse.masking import drop_condition, mask_ratio, mask_tokens, masked_loss


def test_mask_ids_exactly_where_masked():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (64, 256), generator=g)
    inp, mask = mask_tokens(ids, 100, g)
    assert torch.equal(inp == 100, mask)
    assert torch.equal(inp[~mask], ids[~mask])
    assert mask.sum(1).min() >= 1  # at least one target per example


def test_mask_fraction_follows_the_cosine_schedule():
    """P(fraction <= x) = P(cos(pi/2 u) <= x) = 1 - (2/pi) arccos(x): compare the empirical CDF."""
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(20000, 256, dtype=torch.long)
    _, mask = mask_tokens(ids, 1, g)
    frac = mask.float().mean(1)
    for x in (0.1, 0.3, 0.5, 0.7, 0.9):
        expected = 1 - 2 / math.pi * math.acos(x)
        assert abs((frac <= x).float().mean().item() - expected) < 0.02, x
    # a fixed-50% masker (a peer's bug) would fail this:
    assert frac.std() > 0.2
    assert torch.allclose(mask_ratio(torch.tensor([0.0, 1.0])), torch.tensor([1.0, 0.0]), atol=1e-6)


def test_loss_only_on_masked_positions():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 16, 10, generator=g)
    targets = torch.randint(0, 10, (4, 16), generator=g)
    mask = torch.rand(4, 16, generator=g) < 0.5
    loss = masked_loss(logits, targets, mask, 0.1)
    t2 = targets.clone()
    t2[~mask] = (t2[~mask] + 3) % 10          # change every unmasked target
    assert torch.equal(loss, masked_loss(logits, t2, mask, 0.1))
    t3 = targets.clone()
    t3[mask] = (t3[mask] + 3) % 10            # change the masked ones
    assert not torch.equal(loss, masked_loss(logits, t3, mask, 0.1))


def test_label_smoothing_and_weights():
    logits = torch.tensor([[[10.0, 0.0]]])
    t = torch.tensor([[0]])
    m = torch.tensor([[True]])
    assert masked_loss(logits, t, m, 0.0) < masked_loss(logits, t, m, 0.1)
    w = torch.tensor([0.5])
    assert torch.allclose(masked_loss(logits, t, m, 0.1, w), 0.5 * masked_loss(logits, t, m, 0.1))


def test_drop_condition_keeps_text_with_probability_1_minus_p():
    g = torch.Generator().manual_seed(3)
    B, L, D = 20000, 3, 4
    hidden = torch.ones(B, L, D)
    mask = torch.ones(B, L, dtype=torch.bool)
    empty = torch.full((5, D), -1.0)          # longer than the batch: padding both ways
    empty_mask = torch.tensor([True, False, False, False, False])
    h, m, kept = drop_condition(hidden, mask, empty, empty_mask, 0.1, g)
    assert h.shape == (B, 5, D) and m.shape == (B, 5)
    assert abs(kept.float().mean().item() - 0.9) < 0.01   # open-muse/aMUSEd keep it only 10%
    assert (h[kept, :3] == 1).all() and (h[~kept, 0] == -1).all()
    assert torch.equal(m[~kept], empty_mask.expand(int((~kept).sum()), -1))
    assert not m[kept, 3:].any()
