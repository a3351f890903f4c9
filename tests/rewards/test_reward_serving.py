"""Reward models as rewards, served for real on localhost by `omnilab serve reward`; unreachable servers stop a
GRPO fit at its start; every reward the RL paper configs name is servable by the command."""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from rewards.base import RewardError
from rewards.remote import RemoteReward, RewardServerError, check_reward_servers
from rewards.reward_model import ImageSimilarity, RewardModelReward
from rewards.serving import remote_specs, serve_target

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 180
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}  # fmt: skip
BACKBONE = {"family": "qwen2_5_vl", "config": {"text_config": TEXT}, "tokenizer": {"vocab_size": 512},
            "image_processor": {"min_pixels": 784, "max_pixels": 784}}  # fmt: skip
JRM = "lightning_modules.reward_models.JointRewardModel"


@pytest.fixture(scope="module")
def jrm_checkpoint(tmp_path_factory):
    """A tiny JRM saved as `omnilab fit` saves it (a Lightning checkpoint with its hyperparameters)."""
    from lightning_modules.reward_models import JointRewardModel

    torch.manual_seed(0)
    model = JointRewardModel(
        backbone=BACKBONE, rubrics={"a": "{instruction}"}, head_widths=(16, 8), lm_weight=0.1
    )
    model.configure_model()
    with torch.no_grad():
        for p in model.heads.parameters():
            p.normal_(0, 0.5)  # spread the scores (a fresh head maps everything near 0)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(model)
    path = tmp_path_factory.mktemp("ckpt") / "jrm.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def batch(n: int = 3):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 28, 28, generator=g) * 2 - 1 for _ in range(n)]
    refs = [[torch.rand(3, 28, 28, generator=g) * 2 - 1] for _ in range(n)]
    return images, [f"make it {c}" for c in ("red", "blue", "green")[:n]], refs, [{}] * n


def test_a_checkpointed_reward_model_scores_like_the_module(jrm_checkpoint):
    reward = RewardModelReward(class_path=JRM, checkpoint=jrm_checkpoint, device="cpu", batch_size=2)
    images, prompts, refs, meta = batch()
    scores = reward(images, prompts, refs, meta)["score"]
    module = reward.model
    with torch.no_grad():
        direct = module.score_edits(refs, prompts, images)["score"]
    assert torch.allclose(scores, direct, atol=1e-5) and scores.std() > 0
    assert reward.stats() == {"scored": 3, "unparsed": 0}


def test_a_generative_judge_counts_unparsable_answers_and_fails_past_the_limit(monkeypatch):
    reward = RewardModelReward(
        class_path="lightning_modules.reward_models.SpatialRewardModel",
        init_args={"backbone": BACKBONE, "sc_prompt": "{instruction}", "max_new_tokens": 4},
        device="cpu",
        max_failure_fraction=0.5,
    )
    sc = json.dumps({"edit_region": [], "reasoning": "<|global|> ok", "score": [25, 25]})
    pq = json.dumps({"reasoning": "ok", "score": [25, 25]})
    answers = iter([[sc, sc, "nope", pq, pq, pq], ["{", "nope", sc, pq, pq, pq]])
    monkeypatch.setattr(reward.model.vlm, "generate", lambda convs, n: next(answers))
    images, prompts, refs, meta = batch()
    out = reward(images, prompts, refs, meta)["score"]
    assert out[:2].tolist() == [1.0, 1.0] and torch.isnan(out[2])  # one NaN of three: counted, not zero
    assert reward.stats() == {"scored": 3, "unparsed": 1}
    with pytest.raises(RewardError, match=r"2 of 3 images got no score.*items \[0, 1\]"):
        reward(images, prompts, refs, meta)


def test_image_similarity_scores_each_reference_and_nan_beyond():
    sim = ImageSimilarity(config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "mlp_ratio": 2, "patch_size": 8, "image_size": 32}, kind="dino", size=32, device="cpu")  # fmt: skip
    a, b = torch.rand(3, 20, 20) * 2 - 1, torch.rand(3, 24, 24) * 2 - 1
    out = sim([a, a], ["x", "y"], [[a, b], [b]], [{}, {}])
    assert out["ref0"][0].item() == pytest.approx(1.0, abs=1e-5)  # an image is its own best match
    assert out["ref1"][0].item() < 1.0 and torch.isnan(out["ref1"][1])


def start(args: list[str], cwd: Path):
    """`python -m omnilab serve reward ...` on a free port: (process, url)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "omnilab", "serve", "reward", *args, "--port", "0"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout=STARTUP_S):
        proc.kill()
        pytest.fail(f"the reward server did not start within {STARTUP_S} s")
    line = proc.stdout.readline()
    if not line.startswith("serving"):
        proc.kill()
        pytest.fail(f"the reward server failed: {line}{proc.stderr.read()}")
    return proc, line.split(" on ")[1].strip()


@pytest.mark.slow
def test_omnilab_serve_reward_serves_a_trained_model_like_in_process(jrm_checkpoint, tmp_path):
    config = tmp_path / "reward.yaml"
    spec = {"class_path": "rewards.reward_model.RewardModelReward",
            "init_args": {"class_path": JRM, "checkpoint": jrm_checkpoint, "device": "cpu", "name": "jrm"}}  # fmt: skip
    config.write_text(yaml.safe_dump({"reward": spec}))
    proc, url = start(["--config", str(config)], tmp_path)
    try:
        remote = RemoteReward(url, timeout=60, name="jrm")
        assert remote.check()["name"] == "jrm"
        images, prompts, refs, meta = batch()
        served = remote(images, prompts, refs, meta)["score"]
        local = RewardModelReward(class_path=JRM, checkpoint=jrm_checkpoint, device="cpu")(
            images, prompts, refs, meta
        )
        # the images travel as 8-bit PNG; the in-process reward sees the same rounding
        rounded = [torch.round((x + 1) * 127.5) / 127.5 - 1 for x in images]
        refs_r = [[torch.round((r + 1) * 127.5) / 127.5 - 1 for r in rs] for rs in refs]
        local_r = RewardModelReward(class_path=JRM, checkpoint=jrm_checkpoint, device="cpu")(
            rounded, prompts, refs_r, meta
        )
        assert torch.allclose(served, local_r["score"], atol=1e-4)
        assert not torch.allclose(served, local["score"] + 1.0)  # (a live model, not a constant)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_reward_server_stops_a_grpo_fit_at_start_naming_the_url():
    from tests.callbacks.test_grpo import fit, grpo

    url = f"http://127.0.0.1:{closed_port()}/"
    callback = grpo({"judge": RemoteReward(url, timeout=1.0, retries=0, name="judge")})
    with pytest.raises(RewardServerError, match=rf"no reward server answers at {url}.*omnilab serve reward"):
        fit(callback, max_steps=3)
    assert callback.rollouts == 0  # stopped before the first rollout


def test_dual_task_stages_check_every_stage_server_at_start():
    from callbacks.dual_task import DualTaskSchedule
    from tests.callbacks.test_grpo import QUIET, grpo, prompt_loader, tiny_grpo

    url = f"http://127.0.0.1:{closed_port()}/"
    later = {"rewards": {"edit": {"class_path": "rewards.remote.RemoteReward", "init_args": {"url": url, "name": "edit", "timeout": 1.0, "retries": 0}}}}  # fmt: skip
    schedule = DualTaskSchedule([{"name": "a", "steps": 2}, {"name": "b", "reward": later}])
    trainer = L.Trainer(callbacks=[grpo(), schedule], **{**QUIET, "max_steps": 3, "limit_val_batches": 0})
    with pytest.raises(RewardServerError, match=rf"'edit'.*{url}"):
        trainer.fit(tiny_grpo(), prompt_loader())


def test_check_reward_servers_skips_servers_marked_to_start_later():
    url = f"http://127.0.0.1:{closed_port()}/"
    later = RemoteReward(url, timeout=1.0, retries=0, check_at_start=False)
    assert check_reward_servers(later, {"x": {"class_path": "rewards.scene.ColourCheck"}}) == 0


# --- the RL paper configs' rewards -------------------------------------------------------------------------

RL_CONFIGS = ["uniref/msgrpo.yaml", "unipic2/pdtr.yaml"]


@pytest.mark.parametrize("config", RL_CONFIGS)
def test_every_remote_reward_of_the_rl_configs_names_what_serves_it(config):
    path = REPO / "experiments" / config
    specs = remote_specs(path)
    assert specs
    for name, args in specs.items():
        spec, _, port = serve_target(path, name)
        assert port == int(args["url"].rsplit(":", 1)[1].strip("/")), name
        assert spec["class_path"].startswith("rewards."), name


def tiny_weights(tmp_path: Path) -> dict[str, str]:
    """Tiny stand-ins saved in the hub layout: a Qwen3-VL judge, DINOv2, Mask2Former, CLIP; a JRM checkpoint."""
    from transformers import Dinov2Config, Dinov2Model

    from lightning_modules.components.vlm import build_vlm
    from lightning_modules.reward_models import JointRewardModel

    vlm = build_vlm(
        "qwen3_vl", config={"text_config": {**TEXT, "head_dim": 16}}, tokenizer={"vocab_size": 512}
    )
    judge = tmp_path / "judge"
    vlm.model.save_pretrained(judge)
    vlm.tokenizer.save_pretrained(judge)
    vlm.image_processor.save_pretrained(judge)
    dino = tmp_path / "dino"
    Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            patch_size=8,
            image_size=32,
        )
    ).save_pretrained(dino)
    from tests.rewards.test_geneval import tiny_geneval

    geneval = tiny_geneval()
    detector, clip = tmp_path / "mask2former", tmp_path / "clip"
    geneval.detector.save_pretrained(detector)
    geneval.processor.save_pretrained(detector)
    geneval.clip.save_pretrained(clip)
    geneval.clip_tokenizer.save_pretrained(clip)
    model = JointRewardModel(backbone=BACKBONE, rubrics={"a": "{instruction}"}, head_widths=(16, 8))
    model.configure_model()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(model)
    ckpt = tmp_path / "jrm.ckpt"
    trainer.save_checkpoint(ckpt)
    return {
        "judge": str(judge),
        "dino": str(dino),
        "jrm": str(ckpt),
        "detector": str(detector),
        "clip": str(clip),
    }


def _swap_weights(spec: dict, weights: dict[str, str]) -> dict:
    """The serve spec with its weight paths replaced by the tiny stand-ins (by what each path loads)."""
    text = json.dumps(spec)
    spec = json.loads(text)
    args = spec["init_args"]
    if "checkpoint" in args:
        args["checkpoint"] = weights["jrm"]
    if "pretrained" in args:
        args["pretrained"], args["size"] = weights["dino"], 32
    if "detector" in args:
        args["detector"], args["colour_model"] = weights["detector"], weights["clip"]
    backbone = (args.get("init_args") or {}).get("backbone")
    if backbone and "pretrained" in backbone:
        backbone["pretrained"] = weights["judge"]
        backbone.pop("load", None)
        args["init_args"]["max_new_tokens"] = 4
    args["device"] = "cpu"
    return spec


@pytest.mark.slow
@pytest.mark.parametrize("config", RL_CONFIGS)
def test_every_reward_the_rl_configs_name_builds_from_stand_in_weights_and_scores(config, tmp_path):
    from rewards.serving import build

    weights = tiny_weights(tmp_path)
    path = REPO / "experiments" / config
    images, prompts, refs, meta = batch(2)
    for name in sorted(remote_specs(path)):
        spec, _, _ = serve_target(path, name)
        reward = build(_swap_weights(spec, weights))
        if getattr(reward, "generative", False):  # a random judge writes no JSON: answer as a trained one
            verdicts = [json.dumps({"edit_region": [], "reasoning": "<|global|> ok", "score": [20, 20]})] * 2
            verdicts += [json.dumps({"reasoning": "ok", "score": [20, 20]})] * 2
            reward.model.vlm.generate = lambda convs, n, answers=verdicts: answers
        scores = reward(images, prompts, refs, meta)
        assert scores and all(v.shape == (2,) for v in scores.values()), name


def test_serve_dry_run_prints_what_serves_an_experiment_reward_on_its_url_port(capsys):
    from omnilab.cli import main

    main(
        [
            "serve",
            "reward",
            "--config",
            str(REPO / "experiments" / "uniref" / "msgrpo.yaml"),
            "--reward",
            "consistency",
            "--dry-run",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert out["port"] == 8766 and out["host"] == "127.0.0.1"
    assert out["serve"]["class_path"] == "rewards.reward_model.ImageSimilarity"
    with pytest.raises(
        SystemExit, match=r"consistency, heldout_judge, instruction: pick one with --reward NAME"
    ):
        main(
            ["serve", "reward", "--config", str(REPO / "experiments" / "uniref" / "msgrpo.yaml"), "--dry-run"]
        )
