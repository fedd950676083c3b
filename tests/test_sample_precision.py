"""`sample.precision` / `eval.precision`: bf16 autocast for the models' forward on GPUs, fp32 logits for
sampling; on the CPU the default stays fp32 (the same pictures as before)."""

import pytest
import torch

from muse.config import ModelConfig
from muse.models import build_model
from muse.sample import decode_dtype, generate

torch.set_num_threads(1)


def tiny():
    torch.manual_seed(0)
    return build_model(ModelConfig(kind="base", preset="tiny", codebook_size=16, text_dim=8)).eval()


def test_auto_is_fp32_on_the_cpu_and_explicit_values_win():
    cpu = torch.device("cpu")
    assert decode_dtype("auto", cpu) is None and decode_dtype("fp32", cpu) is None
    assert decode_dtype("bf16", cpu) is torch.bfloat16
    if torch.cuda.is_available():
        want = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
        assert decode_dtype("auto", torch.device("cuda")) is want


def _run(model, dtype, seen=None):
    g = torch.Generator().manual_seed(0)
    hidden, mask = torch.randn(2, 4, 8, generator=g), torch.ones(2, 4, dtype=torch.bool)
    unc, unc_mask = torch.randn(1, 1, 8, generator=g), torch.ones(1, 1, dtype=torch.bool)
    if seen is not None:
        model.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return generate(model, hidden, mask, unc, unc_mask, steps=6, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(1), dtype=dtype)


def test_no_dtype_is_the_fp32_path_bit_for_bit():
    model = tiny()
    seen = []
    a = _run(model, None, seen)
    assert set(seen) == {torch.float32}
    assert torch.equal(a, _run(tiny(), None))


def test_bf16_runs_the_forward_in_bf16_and_samples_valid_ids():
    model = tiny()
    seen = []
    ids = _run(model, torch.bfloat16, seen)
    assert set(seen) == {torch.bfloat16}   # the model's logits under autocast
    assert ids.shape == (2, 256) and (ids < 16).all() and (ids >= 0).all()
    assert torch.equal(ids, _run(tiny(), torch.bfloat16))  # still seeded


@pytest.mark.parametrize("value", ["fp16", "tf32", "BF16"])
def test_precision_values_are_checked(tmp_path, value):
    import yaml

    from muse.config import ConfigError, load_config

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path)}, "source": {"paths": ["x.parquet"]}}))
    assert load_config(path).sample.precision == "auto" and load_config(path).eval.precision == "auto"
    with pytest.raises(ConfigError, match="precision"):
        load_config(path, [f"sample.precision={value}"])
