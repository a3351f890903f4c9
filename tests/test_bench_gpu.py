"""`omnilab bench gpu` builds its tables on any device: here at tiny width on the CPU; it refuses to run without CUDA."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu
from tests.lightning_modules.test_packed_dit import FLUX_TINY, QWEN_TINY, SD3_TINY

TINY = [
    gpu.FamilySpec("sd3", gpu.SD3Kontext, SD3_TINY, SD3_TINY["joint_attention_dim"], SD3_TINY["pooled_projection_dim"]),
    gpu.FamilySpec("qwen", gpu.QwenImageEdit, {**QWEN_TINY, "zero_cond_t": True}, QWEN_TINY["joint_attention_dim"], None),
    gpu.FamilySpec(
        "flux", gpu.FluxKontext, FLUX_TINY, FLUX_TINY["joint_attention_dim"], FLUX_TINY["pooled_projection_dim"],
        {"guidance": 3.5}, ("num_layers", "num_single_layers"),
    ),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("spec", TINY, ids=lambda s: s.name)
def test_family_row_counts_flops_and_scales_to_full_depth(spec):
    row = gpu.rows_for_family(
        spec, torch.device("cpu"), torch.float32, peak_tflops=1.0, warmup=0, steps=1, scale=16
    )
    assert row["tokens"] > 0 and row["tokens/s"] > 0 and row["step ms (full depth)"] > 0
    assert 0 < row["MFU %"] < 100  # a CPU is far below a 1 TFLOP/s "peak"
    # model FLOPs grow with depth: two blocks cost more than one, the linear extrapolation adds the difference
    inputs = lambda: gpu.sample_inputs(spec, C(spec), torch.device("cpu"), torch.float32, 16)  # noqa: E731
    ones = dict.fromkeys(spec.depth_keys, 1)
    one = gpu.model_flops(spec, ones, inputs, torch.device("cpu"), torch.float32)
    two = gpu.model_flops(spec, {k: 2 for k in spec.depth_keys}, inputs, torch.device("cpu"), torch.float32)
    assert two > one > 0


def C(spec):
    return spec.config["in_channels"] if spec.backend is gpu.SD3Kontext else spec.config["in_channels"] // 4


def test_a_model_too_large_for_the_memory_runs_at_the_depth_that_fits():
    spec = gpu.FAMILIES[1]  # Qwen-Image, 60 blocks, ~20B parameters: 80 GB of bf16 weights + gradients
    full = gpu.count_params(spec, {"num_layers": 60})
    depth = gpu.fitting_depth(spec, free_bytes=60 * 2**30)
    assert 19e9 < full < 21e9
    assert 1 <= depth["num_layers"] < 60
    assert gpu.count_params(spec, depth) * 4 <= 0.85 * 60 * 2**30
    assert gpu.fitting_depth(gpu.FAMILIES[0], free_bytes=60 * 2**30) == {"num_layers": 24}  # SD3.5-M fits


def test_attention_table_has_one_row_per_path_relative_to_the_mask_path(monkeypatch):
    from lightning_modules.components import packed_dit

    monkeypatch.setattr(packed_dit, "xformers_block_diagonal", packed_dit.sdpa_block_diagonal)
    width = {
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 12,
        "axes_dims_rope": [2, 2, 4],
    }
    paths = {"mask": {"path": "mask"}, "varlen": {"path": "mask", "backend": "xformers"}}
    rows = gpu.attention_rows(
        torch.device("cpu"), torch.float32, paths, blocks=1, warmup=0, steps=1, scale=16, width=width
    )
    assert [r["attention"] for r in rows] == ["mask", "varlen"]
    assert rows[0]["vs mask"] == 1.0 and rows[1]["vs mask"] > 0
    assert rows[0]["padding %"] > 0  # the batch is padded to SELF's fixed length


def test_the_gpu_bench_refuses_to_run_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu.main([])
