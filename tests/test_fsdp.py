"""FSDP per block: which modules become units, one dtype per flat parameter, calls outside the steps, exact resume.

The 2-process tests run FSDP on CPU with gloo (`tests/fsdp_cpu.py` says what is mapped for Lightning).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lightning_modules.flow_edit import FlowEdit
from omnilab.fsdp import BlockPolicy, block_classes, check_uniform_dtypes, unit_parameters
from tests.configs import BASE, REPO, init_args

TINY_QWEN = init_args(REPO / "experiments" / "uniref" / "tiny.yaml", "model")


def tiny_model(**overrides) -> FlowEdit:
    model = FlowEdit(**{**TINY_QWEN, **overrides})
    model.configure_model()
    return model


def names(root: torch.nn.Module, modules: list[torch.nn.Module]) -> list[str]:
    index = {id(m): n for n, m in root.named_modules()}
    return [index[id(m)] for m in modules]


def test_each_block_and_each_frozen_part_is_a_unit():
    model = tiny_model()
    units = names(model, BlockPolicy(["qwen_image", "qwen2_5_vl"]).units(model))
    assert units == [
        "backbone.model.transformer_blocks.0",
        "backbone.model.transformer_blocks.1",
        "text_encoder.model.model.visual.blocks.0",
        "text_encoder.model.model.language_model.layers.0",
        "codec",  # the frozen VAE
        "text_encoder",  # the frozen VLM: its embeddings, norms and merger in its own unit
    ]
    # activation checkpointing: the trainable blocks only
    assert (
        names(model, BlockPolicy(["qwen_image", "qwen2_5_vl"], trainable_only=True).units(model)) == units[:2]
    )
    with pytest.raises(ValueError, match="block family 'qwen3'"):
        BlockPolicy(["qwen3"])


def test_the_release_dtypes_mixed_in_one_unit_are_refused_and_per_block_units_are_uniform():
    """As the paper configs load them: the DiT and VAE in fp32 (diffusers), the VLM in bf16 (transformers)."""
    model = tiny_model()
    model.text_encoder.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"FSDP unit '<root>' would flatten parameters of 2 dtypes"):
        check_uniform_dtypes(model, [])  # the whole model as one unit: the "uniform dtype" failure
    units = BlockPolicy(["qwen_image", "qwen2_5_vl"]).units(model)
    check_uniform_dtypes(model, units)
    owned = unit_parameters(model, units)
    assert {p.dtype for p in owned["text_encoder"].values()} == {torch.bfloat16}
    assert {p.dtype for p in owned[""].values()} == {torch.float32}  # the DiT's embedders and output layers
    # a mix inside one block is named with the block
    model.backbone.model.transformer_blocks[1].attn.to_q.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"'backbone.model.transformer_blocks.1' would flatten .*to_q"):
        check_uniform_dtypes(model, units)


def test_a_frozen_vlm_inside_a_trainable_encoder_is_a_unit_of_its_own():
    """MetaQuery's connector stage: the bf16 VLM frozen beside fp32 queries and connector in one query encoder."""
    from lightning_modules.metaquery import MetaQuery

    args = init_args(REPO / "experiments" / "unipic2" / "metaquery_tiny.yaml", "model")
    model = MetaQuery(**{**args, "trainable": ["queries", "connector", "dit"]})
    model.configure_model()
    model.text_encoder.vlm.to(torch.bfloat16)  # as the paper config loads it
    units = BlockPolicy(["sd3", "qwen2_5_vl"]).units(model)
    assert names(model, units)[-2:] == ["codec", "text_encoder.vlm"]  # not the partly trainable text_encoder
    check_uniform_dtypes(model, units)  # the VLM's embeddings and LM head stay out of the fp32 root
    owned = unit_parameters(model, units)
    assert {p.dtype for p in owned["text_encoder.vlm"].values()} == {torch.bfloat16}
    assert "text_encoder.queries" in owned[""] and not any("vlm" in n for n in owned[""])
    # nothing inside a block becomes a unit (frozen pieces there, e.g. LoRA base layers, stay in their block)
    assert not any(n.startswith("backbone.model.transformer_blocks.0.") for n in names(model, units))
    # activation checkpointing through torch's own entry point (which calls the policy, not `_run_policy`):
    # the trainable DiT blocks only, not the frozen VLM's layers that the queries' gradient passes through
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    policy = BlockPolicy(["sd3", "qwen2_5_vl"], trainable_only=True)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper, auto_wrap_policy=policy)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, CheckpointWrapper)]
    assert wrapped == ["backbone.model.transformer_blocks.0", "backbone.model.transformer_blocks.1"]
    # the Qwen3-VL family names the library's own classes
    assert {c.__name__ for c in block_classes(["qwen3_vl"])} == {
        "Qwen3VLTextDecoderLayer",
        "Qwen3VLVisionBlock",
    }


# --- 2 processes ---------------------------------------------------------------------------------------

LORA = {"r": 4, "lora_alpha": 8, "init_lora_weights": "gaussian", "target_modules": ["to_q", "to_k", "to_v"]}


def _rollout_worker(rank: int, port: int, out: str) -> None:
    """Rollouts of an unsharded model and of the same model sharded per block, called from outside its forward."""
    import torch.distributed as dist
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies.strategy import _ForwardRedirection
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lightning_modules.flow_grpo import FlowGRPO
    from omnilab.fsdp import run_in_root

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same weights on both ranks
    model = FlowGRPO(**{**TINY_QWEN, "lora": LORA, "sampler": {"steps": 3, "guidance": 2.0}})
    model.configure_model()
    g = torch.Generator().manual_seed(rank)
    refs = [[torch.rand(3, 32, 32, generator=g) * 2 - 1], []]
    prompts = ["make image 1 red", "a blue star"]

    def rollout(call):
        gens = [torch.Generator().manual_seed(10 * rank + k) for k in range(2)]
        return call("sample_with_logprob", refs, prompts, (32, 32), 3, 1.0, [0, 1], gens, 2.0)

    want = rollout(lambda method, *args: getattr(model, method)(*args))
    sharded = FullyShardedDataParallel(
        model, auto_wrap_policy=BlockPolicy(["qwen_image", "qwen2_5_vl"]), device_id=torch.device("cpu"),
        use_orig_params=True,
    )  # fmt: skip
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(
            model=sharded, _forward_redirection=_ForwardRedirection(), precision_plugin=Precision()
        )
    )
    got = rollout(lambda method, *args: run_in_root(trainer, model, method, *args))
    try:
        rollout(lambda method, *args: getattr(model, method)(*args))
        direct = "ran"
    except RuntimeError as err:  # the root unit's weights are shards outside its forward
        direct = str(err)[:200]
    result = {
        "images": max(float((a - b).abs().max()) for a, b in zip(want.images, got.images)),
        "log_probs": float((want.log_probs - got.log_probs).abs().max()),
        "direct": direct,
    }
    Path(f"{out}.{rank}.yaml").write_text(yaml.safe_dump(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_rollouts_from_a_callback_under_fsdp_equal_the_unsharded_ones(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rollout_worker, args=(29541, str(tmp_path / "out")), nprocs=2, join=True)
    for rank in (0, 1):
        result = yaml.safe_load((tmp_path / f"out.{rank}.yaml").read_text())
        assert result["images"] < 1e-5 and result["log_probs"] < 1e-5, result
        assert result["direct"] != "ran"  # without run_in_root the sharded root cannot run the sampler


FSDP_OVERRIDE = {
    "trainer": {
        "accelerator": "cpu",
        "devices": 2,
        "strategy": {
            "class_path": "tests.fsdp_cpu.CPUFSDPStrategy",
            "init_args": {
                "sharding_strategy": "FULL_SHARD",
                "state_dict_type": "sharded",
                "auto_wrap_policy": {"class_path": "omnilab.fsdp.BlockPolicy", "init_args": {"blocks": ["qwen_image", "qwen2_5_vl"]}},
                "activation_checkpointing_policy": {
                    "class_path": "omnilab.fsdp.BlockPolicy",
                    "init_args": {"blocks": ["qwen_image"], "trainable_only": True},
                },
            },
        },
        "precision": "bf16-mixed",
        "limit_val_batches": 0,
        "enable_progress_bar": False,
        "log_every_n_steps": 1,
    },
    "checkpoint": {"monitor": None, "every_n_train_steps": 2},
    "test_after_fit": False,
}  # fmt: skip


def _fit(root: Path, data: Path, max_steps: int, ckpt: Path | None = None) -> list[float]:
    """`omnilab fit` of uniref/tiny (EMA, budget schedule) under FSDP per block on 2 processes; rank 0's losses."""
    csv_dir = root / ("csv-resumed" if ckpt is not None else "csv")
    config = {**FSDP_OVERRIDE, "data": {"init_args": {"data_dir": str(data), "num_workers": 0}}}
    config["model"] = {"init_args": {"vae_fit_steps": 0}}  # the VAE fit runs in one process only
    config["trainer"] = {
        **FSDP_OVERRIDE["trainer"],
        "max_steps": max_steps,
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(csv_dir)},
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "over.yaml").write_text(yaml.safe_dump(config))
    cmd = [
        sys.executable, "-m", "omnilab", "fit", "--config", str(BASE),
        "--config", str(REPO / "experiments" / "uniref" / "tiny.yaml"), "--config", str(root / "over.yaml"),
    ]  # fmt: skip
    if ckpt is not None:
        cmd += ["--ckpt_path", str(ckpt)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMNILAB_ALLOW_IMPORTS": "tests", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    (metrics,) = csv_dir.rglob("metrics.csv")
    with metrics.open() as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_with_the_same_next_losses(tmp_path):
    from datamodules.synth import synthesize

    data = synthesize("multiref", tmp_path / "data", samples={"train": 24, "val": 4, "test": 4}).parent
    straight = _fit(tmp_path / "straight", data, 4)
    _fit(tmp_path / "first", data, 2)
    ckpt = tmp_path / "first" / "runs" / "uniref" / "tiny" / "latest" / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # sharded: one file per process
    resumed = _fit(tmp_path / "first", data, 4, ckpt)
    assert len(straight) == 4
    assert resumed[-2:] == straight[2:], (straight, resumed)  # steps 3 and 4, bit for bit
