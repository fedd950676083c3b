"""What a GPU run needs and the CPU can show (issue 25): no host syncs or graph breaks in the
forward pass, no full-size fp32 copy of the logits in the loss, activation checkpointing that
changes memory and nothing else, tests pinned to the CPU."""

import pytest
import torch

from muse.config import ModelConfig
from muse.masking import masked_loss
from muse.models.layers import key_padding_to_sdpa
from tests.test_models import batch as models_batch
from tests.test_models import tiny

torch.set_num_threads(1)


def batch(model, seed=0):
    """test_models' batch (variable caption lengths) with an empty caption in row 1: it must still
    see one key, not NaN."""
    ids, hidden, mask, low = models_batch(model, seed=seed)
    mask[1, :] = False
    return ids, hidden, mask, low


def saved_tensor_sizes(fn) -> list[int]:
    """numel of every tensor autograd saves for the backward pass while `fn` runs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


def test_key_padding_mask_has_no_data_dependent_branch():
    """fullgraph compile refuses a Python `if` on a tensor value (a host sync on a GPU)."""
    mask = torch.tensor([[True, True, False], [False, False, False]])
    compiled = torch.compile(key_padding_to_sdpa, fullgraph=True, backend="eager")
    out = compiled(mask)
    assert out.shape == (2, 1, 1, 3)
    assert out[0, 0, 0].tolist() == [True, True, False]
    assert out[1, 0, 0].tolist() == [True, False, False]  # the empty row sees its first key
    assert torch.equal(out, key_padding_to_sdpa(mask))


@pytest.mark.parametrize("kind", ["base", "superres"])
def test_empty_caption_rows_stay_finite(kind):
    m = tiny(kind)
    ids, hidden, mask, low = batch(m)
    assert torch.isfinite(m(ids, hidden, mask, low)).all()


def test_loss_upcasts_only_the_masked_rows():
    g = torch.Generator().manual_seed(1)
    B, N, V = 4, 64, 50
    logits = torch.randn(B, N, V, generator=g).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (B, N), generator=g)
    mask = torch.rand(B, N, generator=g) < 0.25
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0])
    loss, sizes = saved_tensor_sizes(lambda: masked_loss(logits, targets, mask, 0.1, weights))
    assert loss.dtype == torch.float32
    assert max(sizes) <= int(mask.sum()) * V < B * N * V  # nothing of the whole (B, N, V) is kept
    # the same number as the dense formula in fp32
    dense = torch.nn.functional.cross_entropy(logits.detach().float().transpose(1, 2), targets,
                                              reduction="none", label_smoothing=0.1)
    expected = (dense * mask * weights[:, None]).sum() / mask.sum()
    assert torch.allclose(loss.detach(), expected, rtol=1e-5)
    loss.backward()
    assert logits.grad[~mask].abs().sum() == 0 and logits.grad[mask].abs().sum() > 0


@pytest.mark.parametrize("kind", ["base", "superres"])
def test_activation_checkpointing_changes_memory_not_numbers(kind):
    m = tiny(kind).train()
    ids, hidden, mask, low = batch(m)

    def step():
        m.zero_grad()
        out = m(ids, hidden, mask, low)
        return out

    out_plain, plain = saved_tensor_sizes(step)
    out_plain.square().mean().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.activation_checkpointing = True
    out_ckpt, ckpt = saved_tensor_sizes(step)
    out_ckpt.square().mean().backward()
    assert torch.equal(out_plain, out_ckpt)
    for g_plain, p in zip(grads, m.parameters()):
        assert torch.allclose(g_plain, p.grad, atol=1e-7), "checkpointing changed a gradient"
    assert sum(ckpt) < 0.6 * sum(plain), (sum(ckpt), sum(plain))


def test_test_configs_pin_the_cpu(tmp_path):
    """On a 1-GPU machine `train.device: auto` made the 2-process tests call set_device(cuda:1)."""
    from muse.config import load_config
    from tests.train_helpers import tiny_config

    assert load_config(tiny_config(tmp_path, str(tmp_path / "root"))).train.device == "cpu"


@pytest.mark.parametrize("kind", ["base", "superres"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_meta_device_memory_equals_a_real_measurement(kind, checkpointing):
    """The meta device's count of saved activations is what a real (CPU) forward saves (to
    0.1%: the CPU's fused kernel keeps the bool key mask as floats, 3 bytes more per key)."""
    from muse.memory import activation_bytes_per_sample

    cfg = ModelConfig(kind=kind, preset="tiny", codebook_size=64, text_dim=16)
    meta = activation_bytes_per_sample(cfg, 8, torch.float32, checkpointing)
    real = activation_bytes_per_sample(cfg, 8, torch.float32, checkpointing, device="cpu")
    assert real > 0 and abs(meta - real) <= 1e-3 * real
    if checkpointing:
        assert meta < activation_bytes_per_sample(cfg, 8, torch.float32, False)


def test_batch_plan_keeps_the_global_batch_and_fits():
    from muse.memory import GiB, activation_bytes_per_sample, plan_batch

    cfg = ModelConfig(kind="superres", preset="small")
    per = activation_bytes_per_sample(cfg)
    plan = plan_batch(cfg, 512, 24 * GiB, ema=True)
    assert plan.per_sample_bytes == per
    assert plan.micro_batch * plan.grad_accum == 512
    used = plan.state_bytes + plan.micro_batch * per
    assert used <= plan.budget_bytes < used + 2 * plan.micro_batch * per  # the next divisor would not fit
    assert "grad_accum" in plan.explain()
    ckpt = plan_batch(cfg, 512, 24 * GiB, ema=True, checkpointing=True)
    assert ckpt.micro_batch > plan.micro_batch
    with pytest.raises(ValueError, match="activation_checkpointing"):
        plan_batch(ModelConfig(kind="superres", preset="base"), 512, 16 * GiB, ema=True)


def test_mfu_peaks_match_gpu_names_exactly():
    from muse.gpus import mfu_text, peak_flops

    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L40") == 181e12  # not an L4
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA GeForce RTX 4090") is None and peak_flops("") is None
    assert mfu_text(None) == "MFU unknown" and mfu_text(0.4123) == "MFU 41.2%"


def test_cpu_trains_in_fp32():
    from muse.gpus import amp_dtype

    assert amp_dtype(torch.device("cpu"), mixed_precision=True) is None


@pytest.mark.slow  # ~40 s: every row of the GPU check at tiny sizes
def test_gpu_check_runs_at_tiny_sizes_on_cpu():
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", "bench/gpu_check.sh", "--tiny"], cwd=repo, capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split("  ")[0]: line for line in out.stdout.splitlines() if not line.startswith("#")}
    for what in ("encode T5 + VQGAN f16", "VQ encode", "train base eager", "train base compiled",
                 "train superres eager", "generate 12 steps 256px b1", "generate 12 steps 256px b8"):
        line = next((v for k, v in rows.items() if k.startswith(what)), None)
        assert line is not None, (what, out.stdout)
        rate = float(line[44:60].split()[0])
        assert rate > 0, line
    assert "ids agree with fp32" in out.stdout


def _config(tmp_path, **train):
    import yaml

    from muse.config import load_config
    from tests.train_helpers import tiny_config

    path = tiny_config(tmp_path, str(tmp_path / "root"))
    data = yaml.safe_load(path.read_text())
    data["train"].pop("grad_accum")
    data["train"].update(train)
    path.write_text(yaml.safe_dump(data))
    return path, load_config(path)


def test_batch_auto_needs_a_global_batch_and_names_the_keys(tmp_path):
    from muse.config import ConfigError

    with pytest.raises(ConfigError, match="train.batch_size: auto needs train.global_batch"):
        _config(tmp_path, batch_size="auto")
    with pytest.raises(ConfigError, match="train.global_batch or train.grad_accum, not both"):
        _config(tmp_path, global_batch=64, grad_accum=4)


def test_resolve_batch_keeps_the_global_batch(tmp_path):
    from muse.config import ConfigError, PipelineConfig
    from muse.memory import activation_bytes_per_sample, resolve_batch

    _, cfg = _config(tmp_path, batch_size="auto", global_batch=96)
    cpu, why = resolve_batch(cfg, 2, None)  # 48 per rank: the largest divisor up to 16
    assert (cpu.train.batch_size, cpu.train.grad_accum, cpu.train.global_batch) == (16, 3, None)
    assert "global batch 96 = 2 rank(s) x batch 16 x accum 3" in why
    assert PipelineConfig.model_validate(cpu.model_dump()).train.batch_size == 16  # a valid config
    per = activation_bytes_per_sample(cfg.model, cfg.encode.text_max_length, checkpointing=False)
    gpu, why = resolve_batch(cfg, 1, 10 * per)  # a GPU's free bytes: state is tiny, ~8 samples fit
    assert gpu.train.batch_size * gpu.train.grad_accum == 96 and gpu.train.batch_size <= 8
    assert "batch plan" in why
    with pytest.raises(ConfigError, match="batch_size auto: not one sample fits"):
        resolve_batch(cfg, 1, per // 2)
    _, fixed = _config(tmp_path, batch_size=5, global_batch=96)
    with pytest.raises(ConfigError, match="not a multiple of train.batch_size=5"):
        resolve_batch(fixed, 1, None)
    assert resolve_batch(cfg.model_copy(update={"train": cpu.train}), 1, None) == (
        cfg.model_copy(update={"train": cpu.train}), None)  # already resolved: unchanged


@pytest.mark.slow  # one torchrun job (~30 s)
def test_trainer_resolves_auto_batch_and_checkpoints_activations(tmp_path):
    from tests.train_helpers import make_data, run_train

    path, _ = _config(tmp_path, batch_size="auto", global_batch=8, activation_checkpointing=True, max_steps=2)
    make_data(path)
    out = run_train(path, nproc=2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "global batch 8 = 2 rank(s) x batch 4 x accum 1" in log
    assert "x batch 4 x accum 1 = global batch 8" in log


def test_the_superres_model_gets_its_own_default_batch(tmp_path):
    """Super-res training ran out of memory at the base model's micro-batch of 16 (issue 25)."""
    import yaml

    from muse.config import DEFAULT_BATCH, load_config

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"source": {"paths": ["u.jsonl"]}, "download": {"image_size": 512},
                                    "encode": {"superres": True}}))
    base = load_config(path).train
    sr = load_config(path, ["model.kind=superres"]).train
    assert (base.batch_size, base.grad_accum) == DEFAULT_BATCH["base"] == (16, 32)
    assert (sr.batch_size, sr.grad_accum) == DEFAULT_BATCH["superres"]
    assert sr.batch_size < base.batch_size and sr.batch_size * sr.grad_accum == 512
    mine = load_config(path, ["model.kind=superres", "train.batch_size=2"]).train
    assert (mine.batch_size, mine.grad_accum) == (2, 128)  # a set value is kept
    repo = load_config("pipeline.yaml", ["model.kind=superres", "encode.superres=true", "download.image_size=512"])
    assert repo.train.batch_size == DEFAULT_BATCH["superres"][0]  # the shipped pipeline.yaml leaves it to the model


def test_a_rank_that_gives_up_waiting_says_for_what(tmp_path):
    """Two gloo ranks; rank 0 never reaches the barrier: rank 1's error names what it waited for."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = tmp_path / "wait.py"
    script.write_text(textwrap.dedent("""
        import time
        from muse.distributed import setup_distributed
        d = setup_distributed("cpu", timeout_s=3)
        if d.rank == 0:
            time.sleep(8)
        else:
            try:
                d.barrier("rank 0 to write the step-7 checkpoint")
            except RuntimeError as e:
                print("ERROR:", str(e).splitlines()[0], flush=True)
    """))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                          str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert "rank 1: gave up waiting for rank 0 to write the step-7 checkpoint" in out.stdout + out.stderr, (
        out.stdout[-2000:] + out.stderr[-2000:])
    assert "train.dist_timeout_s" in out.stdout + out.stderr


@pytest.mark.slow  # two torchrun jobs (~40 s); bf16's hook needs NCCL, so gloo runs fp16
@pytest.mark.parametrize("dtype", ["fp16"])
def test_compressed_gradients_train_close_to_full_precision(tmp_path, dtype):
    """train.grad_compression: the gradients cross the wire in half the bytes; the ranks stay
    identical and the loss follows the uncompressed run's closely, not exactly."""
    from muse.storage import Storage
    from tests.train_helpers import make_data, read_trace, run_train, tiny_config

    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=4, checkpoint_every=4)
    make_data(config)
    losses = {}
    for mode in ("none", dtype):
        trace = tmp_path / f"trace-{mode}"
        out = run_train(config, "--set", f"train.run_name={mode}", "--set", f"train.grad_compression={mode}",
                        nproc=2, env={"MUSE_TRACE": str(trace)})
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        r0, r1 = read_trace(trace, 0), read_trace(trace, 1)
        assert [r0[s]["hash"] for s in sorted(r0)] == [r1[s]["hash"] for s in sorted(r1)]  # ranks agree
        losses[mode] = [r0[s]["loss"] for s in sorted(r0)]
        assert Storage(str(tmp_path / "root")).exists(f"checkpoints/{mode}/LATEST")
    assert losses["none"][0] == losses[dtype][0]  # the first loss is computed before any all-reduce
    assert losses["none"] != losses[dtype]
    assert max(abs(a - b) for a, b in zip(losses["none"], losses[dtype])) < 0.05


@pytest.mark.slow  # one torchrun job
def test_bf16_gradient_compression_on_cpu_is_refused_naming_the_key(tmp_path):
    from tests.train_helpers import make_data, run_train, tiny_config

    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=1, grad_compression="bf16")
    make_data(config)
    out = run_train(config, nproc=2)
    assert out.returncode != 0 and "train.grad_compression: bf16 needs NCCL" in out.stdout + out.stderr
