"""RNG state in checkpoints (issue 25, crash 3): the masking generator's state depends on its
device, so a checkpoint written on CPU and resumed on CUDA (or back) re-seeds it instead of
crashing in `Generator.set_state` ("RNG state is wrong size")."""

import torch

from muse.checkpoint import rng_state, set_rng_state


def _draws(gen):
    return torch.randint(0, 1 << 30, (8,), generator=gen, device=gen.device).tolist()


def test_rng_state_round_trips_on_the_same_device():
    gen = torch.Generator().manual_seed(5)
    state = rng_state(gen)
    assert state["mask_device"] == "cpu"
    want = _draws(gen)
    other = torch.Generator().manual_seed(99)
    assert set_rng_state(state, other) is None
    assert _draws(other) == want


def test_a_generator_saved_on_another_device_is_reseeded_deterministically():
    """A CUDA generator's state (16 bytes: seed and offset) restored into a CPU generator, as a
    checkpoint moved between machines does; on main this raised in gen.set_state."""
    cuda_state = {**rng_state(torch.Generator()), "mask": torch.arange(16, dtype=torch.uint8),
                  "mask_device": "cuda"}
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    note = set_rng_state(cuda_state, a)
    assert "saved on cuda" in note and "re-seeded" in note
    set_rng_state(cuda_state, b)
    assert _draws(a) == _draws(b)  # the same seed from the same saved state, on every resume
    other = {**cuda_state, "mask": torch.arange(16, 32, dtype=torch.uint8)}
    set_rng_state(other, b)
    assert _draws(a) != _draws(b)
