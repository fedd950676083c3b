"""EMA of the weights (issue 13, finding 4): the average the trainer keeps, saved beside the
checkpoint as model_ema.safetensors, read back on resume, used by `muse sample` / `muse eval`."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from muse import checkpoint, train
from muse.config import load_config
from muse.distributed import Dist
from muse.models import load_pretrained
from muse.sample import load_checkpoint_model
from muse.storage import Storage
from tests.train_helpers import make_data, tiny_config

DECAY = 0.75


def _batch(gen: torch.Generator) -> dict:
    return {"encoder_hidden_states": torch.randn(4, 12, 16, generator=gen),
            "encoder_attention_mask": torch.ones(4, 12, dtype=torch.bool),
            "vq16": torch.randint(0, 64, (4, 256), generator=gen)}


def _full(job, st):
    """The TrainState as train.save fills it in (one rank, no loader position needed here)."""
    return dataclasses.replace(st, optimizer=job.optimizer.state_dict(), scheduler=job.scheduler.state_dict(),
                               scaler=job.scaler.state_dict(), ema=job.ema, loader=[{}])


@pytest.fixture()
def trained(tmp_path):
    """Three in-process optimizer steps with train.ema on, the weights after each, one checkpoint."""
    config = tiny_config(tmp_path, str(tmp_path / "root"), ema=True, ema_decay=DECAY, grad_accum=1,
                         max_steps=3, lr=0.05, warmup_steps=0)
    cfg, manifest = load_config(config), make_data(config, shards=1, rows=8)
    job = train.build(cfg, manifest, Dist())
    st, gen = checkpoint.TrainState(), torch.Generator().manual_seed(1)
    weights = [[p.detach().clone() for p in job.raw_model.parameters()]]
    for _ in range(3):
        loss = train.forward_backward(job, _batch(gen), sync=True, poison=False)
        train.optimizer_step(job, st, loss)
        st.step += 1
        weights.append([p.detach().clone() for p in job.raw_model.parameters()])
    storage = Storage.from_config(cfg)
    rel = checkpoint.save(storage, "t", job.raw_model, _full(job, st), cfg.to_yaml(), keep=2)
    return cfg, manifest, job, weights, storage, rel


def test_ema_is_the_hand_computed_average_and_is_saved_beside_the_model(trained):
    _, _, job, weights, storage, rel = trained
    # by hand: e_0 = w_0, e_k = d e_{k-1} + (1 - d) w_k
    ref = weights[0]
    for w in weights[1:]:
        ref = [DECAY * e + (1 - DECAY) * p for e, p in zip(ref, w)]
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], weights[-1]))  # the weights moved
    for got, want, raw in zip(job.ema, ref, weights[-1]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert any(not torch.allclose(e, p) for e, p in zip(ref, weights[-1]))     # not the raw weights
    # model_ema.safetensors: the model's keys, the averages as values; trainer.pt has no copy
    saved = load_file(storage.path(f"{rel}/{checkpoint.EMA_FILE}"))
    names = [n for n, _ in job.raw_model.named_parameters()]
    assert set(saved) == set(job.raw_model.state_dict())
    assert all(torch.equal(saved[n], e) for n, e in zip(names, job.ema))
    assert torch.load(storage.path(f"{rel}/trainer.pt"), weights_only=True)["ema"] is None


def test_resume_restores_the_ema_exactly(trained):
    cfg, manifest, job, _, storage, rel = trained
    fresh = train.build(cfg, manifest, Dist())
    assert not all(torch.equal(a, b) for a, b in zip(fresh.ema, job.ema))
    st, where = train.resume(fresh, storage, "latest")
    assert where == rel and st.step == 3
    assert all(torch.equal(a, b) for a, b in zip(fresh.ema, job.ema))
    # a checkpoint of the resumed job writes the same file again
    rel2 = checkpoint.save(storage, "t2", fresh.raw_model, _full(fresh, st), cfg.to_yaml(), keep=2)
    a = load_file(storage.path(f"{rel}/{checkpoint.EMA_FILE}"))
    b = load_file(storage.path(f"{rel2}/{checkpoint.EMA_FILE}"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _logits(model):
    gen = torch.Generator().manual_seed(0)
    b = _batch(gen)
    with torch.no_grad():
        return model.eval()(b["vq16"], b["encoder_hidden_states"], b["encoder_attention_mask"])


def test_sample_and_eval_load_the_ema_weights_by_default(trained, tmp_path):
    cfg, _, job, _, storage, rel = trained
    assert cfg.sample.use_ema and cfg.eval.use_ema   # the default
    # the EMA file loaded directly: config.json + model_ema.safetensors
    direct = load_pretrained(checkpoint.download_model(storage, rel, tmp_path / "direct"))
    direct.load_state_dict(load_file(storage.path(f"{rel}/{checkpoint.EMA_FILE}")))
    raw = _logits(load_checkpoint_model(storage, None, "t", use_ema=False))
    want = _logits(direct)
    assert not torch.allclose(raw, want)
    assert torch.equal(_logits(job.raw_model), raw)
    for ref in (None, storage.url(rel), storage.path(rel)):   # latest, URL under the root, local folder
        assert torch.equal(_logits(load_checkpoint_model(storage, ref, "t", use_ema=True)), want), ref
    # a checkpoint without EMA (train.ema off): the raw weights, whatever use_ema says
    job.ema = None
    plain = checkpoint.save(storage, "plain", job.raw_model, checkpoint.TrainState(step=1), cfg.to_yaml(), 1)
    assert not checkpoint.has_ema(storage, plain)
    assert torch.equal(_logits(load_checkpoint_model(storage, storage.url(plain), "t", use_ema=True)), raw)
