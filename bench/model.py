"""Muse model speed vs a plain-PyTorch SDPA reference transformer of the same width/depth/heads.

Times (1) a training step (forward + backward + AdamW) and (2) a 12-step guided generation
(cond + uncond batched), for our model and for `Reference`, a textbook pre-norm
transformer written here with nn.Linear + F.scaled_dot_product_attention (self-attn,
cross-attn to the text, GELU MLP). Both run in the same process, interleaved, best of
several repeats; our generation also without its memory K/V cache (recomputed every step),
same run. Also the peak memory of guided super-res sampling at batch 8 (tensors alive
at once, any device), and the super-res model (64x64 = 4096 tokens) with its multi-axis
self-attention vs full self-attention, same weights: training samples/s ratio (goal >= 1.4)
and FLOPs ratio. The last line is the step-time ratio (goal <= 1.05).

    python bench/model.py            # small preset on CPU
    python bench/model.py --tiny     # seconds (smoke test)
    python bench/model.py --gpu      # base preset (~632M) in bf16 on CUDA at batch 8, with MFU
    python bench/model.py --superres-attention   # only the multi-axis vs full attention lines
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from muse.config import ModelConfig
from muse.gpus import mfu_text, peak_flops
from muse.masking import mask_tokens, masked_loss
from muse.models import build_model
from muse.models.layers import SelfAttention
from muse.sample import generate


class RefBlock(nn.Module):
    def __init__(self, d, h, ratio):
        super().__init__()
        self.h = h
        self.n1, self.n2, self.n3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.o1 = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.q, self.kv, self.o2 = nn.Linear(d, d, bias=False), nn.Linear(d, 2 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc1, self.fc2 = nn.Linear(d, int(d * ratio)), nn.Linear(int(d * ratio), d)

    def heads(self, t):
        B, N, C = t.shape
        return t.view(B, N, self.h, C // self.h).transpose(1, 2)

    def merge(self, t):
        B, H, N, D = t.shape
        return t.transpose(1, 2).reshape(B, N, H * D)

    def forward(self, x, mem, mask):
        q, k, v = self.qkv(self.n1(x)).chunk(3, dim=-1)
        x = x + self.o1(self.merge(F.scaled_dot_product_attention(self.heads(q), self.heads(k), self.heads(v))))
        k, v = self.kv(mem).chunk(2, dim=-1)
        a = F.scaled_dot_product_attention(self.heads(self.q(self.n2(x))), self.heads(k), self.heads(v),
                                           attn_mask=mask[:, None, None, :])
        x = x + self.o2(self.merge(a))
        return x + self.fc2(F.gelu(self.fc1(self.n3(x))))


class Reference(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.emb = nn.Embedding(c.codebook_size + 1, c.hidden_size)
        self.pos = nn.Parameter(torch.zeros(c.grid_size ** 2, c.hidden_size))
        self.text = nn.Linear(c.text_dim, c.hidden_size)
        self.blocks = nn.ModuleList(RefBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm, self.head = nn.LayerNorm(c.hidden_size), nn.Linear(c.hidden_size, c.codebook_size)

    def forward(self, ids, hidden, mask, low_res_ids=None):
        x, mem = self.emb(ids) + self.pos, self.text(hidden)
        for b in self.blocks:
            x = b(x, mem, mask)
        return self.head(self.norm(x))


def timeit(fn, warmup, repeats, sync):
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def vq_decoder(device, real: bool):
    """The VQGAN f16 decoder: real size (open-muse config, random init) on GPU, tiny on CPU."""
    from diffusers import VQModel

    from muse.encode.image import VQGAN_F16_CONFIG, VQTokenizer

    if real:
        vq = VQModel(**VQGAN_F16_CONFIG)
    else:
        vq = VQModel(block_out_channels=(8,) * 5, layers_per_block=1, latent_channels=4, vq_embed_dim=4,
                     num_vq_embeddings=8192, norm_num_groups=4, mid_block_add_attention=False,
                     down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5)
    return VQTokenizer(vq, device, factor=16)


def latency(model, vq, hidden, mask, batch, steps, dtype, device):
    """Prompt embedding -> guided decoding -> pixels, for `batch` images (the VQ runs in fp32)."""
    def run():
        with torch.inference_mode():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                ids = generate(model, hidden[:1].expand(batch, -1, -1), mask[:1].expand(batch, -1), hidden[:1, :1],
                               mask[:1, :1], steps=steps, guidance_scale=4.0,
                               generator=torch.Generator(device).manual_seed(0))
            vq.decode(ids.view(batch, 16, 16))
    return run


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created while active (weights made before it are not counted).
    Works on any device, CPU included; scratch memory inside one kernel is not seen."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                self.seen.add(key)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, n)  # fires when the storage is released
        return out

    def _free(self, key, n):
        self.seen.discard(key)
        self.live -= n


def superres_sampling_peak(device, batch: int, codebook: int) -> float:
    """GiB of tensors alive at once while a narrow super-res model samples 64x64 tokens with
    guidance (2 steps: the first, all masked, is the largest). The model's logits
    (2B, 4096, codebook) fp32 are part of it; the sampler adds two (masked x codebook) tensors."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="superres", preset="tiny", codebook_size=codebook, text_dim=8))
    model = model.to(device).eval()
    hidden, mask = torch.randn(batch, 8, 8, device=device), torch.ones(batch, 8, dtype=torch.bool, device=device)
    low = torch.randint(0, codebook, (batch, 256), device=device)
    with LiveBytes() as mem:
        generate(model, hidden, mask, hidden[:1, :1], mask[:1, :1], steps=2, guidance_scale=4.0,
                 generator=torch.Generator(device).manual_seed(0), low_res_ids=low)
    return mem.peak / 2 ** 30


def generation_flops(cached, per_step) -> float:
    """FLOPs of one generation with the memory K/V cache / without it, as torch counts them (the
    math attention kernel, whose matmuls the counter sees): the gain without timing noise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for run in (cached, per_step):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            run()
        counts.append(counter.get_total_flops())
    return counts[0] / counts[1]


def meta_training_flops(mc: ModelConfig, full: bool, batch: int) -> float:
    """Forward + backward FLOPs of one super-res training batch, counted on the meta device:
    no memory, so the base preset's full-attention twin (a 4096 x 4096 score matrix per head and
    layer) is counted on any machine. The fused attention kernel that the meta device runs
    (`muse.models.layers.attention`) is counted with torch's own SDPA formulas."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    fused = {aten._scaled_dot_product_flash_attention_for_cpu:
             lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v),
             aten._scaled_dot_product_flash_attention_for_cpu_backward:
             lambda g, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(g, q, k, v)}
    with torch.device("meta"):
        torch.manual_seed(0)
        model = build_model(mc)
        model = full_attention_twin(model) if full else model
        c = model.config
        ids = torch.zeros(batch, c.grid_size ** 2, dtype=torch.long)
        low = torch.zeros(batch, c.low_res_grid_size ** 2, dtype=torch.long)
        hidden, mask = torch.zeros(batch, 77, c.text_dim), torch.ones(batch, 77, dtype=torch.bool)
        with FlopCounterMode(display=False, custom_mapping=fused) as counter:
            model(ids, hidden, mask, low_res_ids=low).float().sum().backward()
    return counter.get_total_flops()


def full_attention_twin(model: nn.Module) -> nn.Module:
    """The same super-res model with full self-attention in every block. Multi-axis and full
    attention have the same qkv/proj weights, so the twin computes with the same parameters and
    only the attention pattern differs (each query sees 4096 keys instead of 2 x 64)."""
    twin = copy.deepcopy(model)
    c = model.config
    for block in twin.blocks:
        full = SelfAttention(c.hidden_size, c.num_heads, c.dropout).to(next(block.parameters()).device)
        full.load_state_dict(block.attn.state_dict())
        block.attn = full
    return twin


def superres_attention(device, dtype, mc: ModelConfig, batch: int, repeats: int, sync) -> dict:
    """Training samples/s of the super-res model with multi-axis vs full self-attention
    (interleaved, best of `repeats`), and the ratio of their FLOPs as torch counts them."""
    torch.manual_seed(0)
    models = {"multi_axis": build_model(mc).to(device)}
    models["full"] = full_attention_twin(models["multi_axis"])
    c = models["multi_axis"].config
    g = torch.Generator(device=device).manual_seed(0)
    targets = torch.randint(0, c.codebook_size, (batch, c.grid_size ** 2), device=device, generator=g)
    low = torch.randint(0, c.codebook_size, (batch, c.low_res_grid_size ** 2), device=device, generator=g)
    hidden = torch.randn(batch, 77, c.text_dim, device=device, generator=g)
    mask = torch.ones(batch, 77, dtype=torch.bool, device=device)

    def step_of(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            inp, m = mask_tokens(targets, c.mask_token_id, g)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(inp, hidden, mask, low_res_ids=low)
            masked_loss(logits.float(), targets, m, 0.1).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    steps = {k: step_of(m) for k, m in models.items()}
    best = {k: timeit(f, 1, 1, sync) for k, f in steps.items()}
    for _ in range(repeats - 1):  # interleaved: a burst of load hits both sides
        for k, f in steps.items():
            best[k] = min(best[k], timeit(f, 0, 1, sync))
    flops = {k: meta_training_flops(mc, full=(k == "full"), batch=batch) for k in models}
    return {"samples_per_s": {k: batch / t for k, t in best.items()}, "flops": flops, "config": c}


def print_superres_attention(device, dtype, mc: ModelConfig, batch: int, repeats: int, sync) -> None:
    r = superres_attention(device, dtype, mc, batch, repeats, sync)
    sps, fl, c = r["samples_per_s"], r["flops"], r["config"]
    print(f"super-res {c.grid_size ** 2} tokens (hidden {c.hidden_size}, depth {c.depth}, {c.num_heads} heads, "
          f"batch {batch}, {c.codebook_size} codes), "
          f"train samples/s: multi-axis {sps['multi_axis']:.3f}, full {sps['full']:.3f}")
    print(f"super-res multi-axis / full attention: samples/s ratio {sps['multi_axis'] / sps['full']:.2f} "
          f"(goal >= 1.4), FLOPs ratio full / multi-axis {fl['full'] / fl['multi_axis']:.2f}")


def superres_size(args) -> tuple[ModelConfig, int]:
    """The super-res model the attention comparison runs: the base preset on GPU; on CPU, narrow
    sizes that 2 cores train at 4096 tokens in seconds (attention weighs more there than at 1536)."""
    if args.gpu:  # batch 4: two ~0.7B models + AdamW and 4 x ~4.5 GiB of activations fit 80 GB (muse.memory)
        return ModelConfig(kind="superres", preset="base"), 4
    if args.tiny:
        return ModelConfig(kind="superres", preset="tiny", depth=1, low_res_depth=1, codebook_size=1024), 1
    return ModelConfig(kind="superres", preset="small", hidden_size=256, depth=2, num_heads=8, low_res_depth=1), 1


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--superres-attention", action="store_true", help="only super-res multi-axis vs full attention")
    args = ap.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu: no CUDA device")
    device = torch.device("cuda" if args.gpu else "cpu")
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    sr_mc, sr_attn_batch = superres_size(args)
    if args.superres_attention:
        print_superres_attention(device, torch.bfloat16 if args.gpu else None, sr_mc, sr_attn_batch,
                                 2 if args.tiny else args.repeats, sync)
        return
    if args.gpu:  # two ~632M models + AdamW (~20 GB) and 8 x ~0.3 GiB of activations each: fits an L4
        preset, overrides, batch = "base", {}, 8
    elif args.tiny:
        preset, overrides, batch = "tiny", {}, 2
    else:  # "small" cut to a size 2 CPU cores time in seconds
        preset, overrides, batch = "small", {"depth": 4, "hidden_size": 256, "num_heads": 8}, 4
    batch = args.batch or batch
    dtype = torch.bfloat16 if args.gpu else None
    torch.manual_seed(0)
    mc = ModelConfig(preset=preset, **overrides)
    ours = build_model(mc).to(device)
    ref = Reference(ours.config).to(device)
    c = ours.config
    g = torch.Generator(device=device).manual_seed(0)
    targets = torch.randint(0, c.codebook_size, (batch, c.grid_size ** 2), device=device, generator=g)
    hidden = torch.randn(batch, 77, c.text_dim, device=device, generator=g)
    mask = torch.ones(batch, 77, dtype=torch.bool, device=device)
    mask[:, 40:] = False

    def train_step(model, opt):
        def step():
            inp, m = mask_tokens(targets, c.mask_token_id, g)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(inp, hidden, mask)
            loss = masked_loss(logits.float(), targets, m, 0.1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def gen(model, cache_memory=True):
        def run():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                generate(model, hidden[:1].expand(batch, -1, -1), mask[:1].expand(batch, -1), hidden[:1, :1],
                         mask[:1, :1], steps=12, guidance_scale=4.0, generator=torch.Generator(device).manual_seed(0),
                         cache_memory=cache_memory)
        return run

    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=args.gpu)
    opt_r = torch.optim.AdamW(ref.parameters(), lr=1e-4, fused=args.gpu)
    rep = 2 if args.tiny else args.repeats
    # interleaved A-B-A-B..., best of each: a burst of load on a shared machine hits both sides
    steps = {"ref": train_step(ref, opt_r), "ours": train_step(ours, opt_o)}
    best = {k: timeit(f, 1, 1, sync) for k, f in steps.items()}
    for _ in range(rep):
        for k, f in steps.items():
            best[k] = min(best[k], timeit(f, 0, 1, sync))
    t_ref, t_ours = best["ref"], best["ours"]
    ours.eval(), ref.eval()
    # ours_per_step: the memory's cross-attention K/V recomputed at every step (no cache)
    gens = {"ref": gen(ref), "ours": gen(ours), "ours_per_step": gen(ours, cache_memory=False)}
    gbest = {k: timeit(f, 1, 1, sync) for k, f in gens.items()}
    for _ in range(max(1, rep // 2)):
        for k, f in gens.items():
            gbest[k] = min(gbest[k], timeit(f, 0, 1, sync))
    g_ref, g_ours = gbest["ref"], gbest["ours"]
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"# model bench: preset={preset} params={n_params / 1e6:.1f}M batch={batch} device={device} "
          f"dtype={'bf16' if dtype else 'fp32'} threads={torch.get_num_threads()}")
    print(f"{'what':<32}{'ours':>12}{'reference':>12}{'ratio':>8}")
    print(f"{'train step (s)':<32}{t_ours:>12.4f}{t_ref:>12.4f}{t_ours / t_ref:>8.3f}")
    print(f"{'train samples/s':<32}{batch / t_ours:>12.1f}{batch / t_ref:>12.1f}")
    print(f"{'12-step guided generation (s)':<32}{g_ours:>12.4f}{g_ref:>12.4f}{g_ours / g_ref:>8.3f}")
    g_step = gbest["ours_per_step"]
    print(f"memory K/V cache, 12-step guided generation: {g_step:.4f} s recomputed per step, {g_ours:.4f} s "
          f"cached (cached / per step {g_ours / g_step:.3f}; FLOPs {generation_flops(gens['ours'], gens['ours_per_step']):.3f})")
    print(f"{'latency, 256px (tokens + VQ decode)':<36}{'batch 1':>10}{'batch 8':>10}")
    vq = vq_decoder(device, real=args.gpu)
    for steps in (12, 24):
        cells = []
        for b in (1, 8):
            cells.append(timeit(latency(ours, vq, hidden, mask, b, steps, dtype, device), 1, 1 if args.tiny else 2, sync))
        print(f"{f'  {steps} steps (s)':<36}{cells[0]:>10.3f}{cells[1]:>10.3f}")
    if args.gpu:
        peak = peak_flops(torch.cuda.get_device_name())
        print(f"{torch.cuda.get_device_name()}: " + mfu_text(ours.num_flops_per_sample() * batch / t_ours / peak
                                                            if peak else None))
    del ours, ref, opt_o, opt_r  # the super-res models below need the memory
    sr_batch, sr_codebook = (2, 64) if args.tiny else (8, 8192)
    peak = superres_sampling_peak(device, sr_batch, sr_codebook)
    print(f"super-res sampling peak memory, batch {sr_batch}, {sr_codebook} codes: {peak:.2f} GiB")
    print_superres_attention(device, dtype, sr_mc, sr_attn_batch, 2 if args.tiny else max(2, args.repeats // 2), sync)
    print(f"ratio (train step, ours / reference; goal <= 1.05): {t_ours / t_ref:.3f}")


if __name__ == "__main__":
    main()
