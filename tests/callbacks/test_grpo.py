"""The GRPO rollout callback: on-policy first update, dropped groups, skips and stops, windows, MSGRPO wiring,
a reward that rises, the held-out divergence stop, and an exact resume mid-rollout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.grpo import (
    ROLLOUT_KEY,
    GRPORollouts,
    GRPOSkipError,
    Rollout,
    build_reward,
    reward_level,
)
from lightning_modules.components.grpo import gather_groups, group_advantages, msgrpo_reward
from omnilab.allowlist import RefusedImport
from rewards.base import Reward
from rewards.remote import RemoteReward
from tests.lightning_modules.test_flow_edit import QUIET
from tests.lightning_modules.test_flow_grpo import (
    one_thread,
    prompt_batch,
    prompt_loader,
    tiny_grpo,
    tokenizer_cache,
)

REPO = Path(__file__).resolve().parents[2]
__all__ = ["one_thread", "tokenizer_cache"]  # module-scoped fixtures: one thread, a private tokenizer cache


def redness(images, prompts, references, meta):
    """ "Make the image red": mean of R - (G + B) / 2 over the image, in [-1, 1] units."""
    return {"score": torch.stack([(im[0] - 0.5 * (im[1] + im[2])).mean() for im in images])}


class Recorder(L.Callback):
    """Per training step: the rollout slice the module trained on and the logged GRPO statistics."""

    def __init__(self) -> None:
        self.slices: list[Rollout | None] = []
        self.stats: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.slices.append(batch.get(ROLLOUT_KEY))
        metrics = trainer.callback_metrics
        self.stats.append({k: float(v) for k, v in metrics.items() if k.startswith("grpo/")})


def fit(callback: GRPORollouts, max_steps: int, model=None, val: bool = False, loader=None, **trainer_kw):
    """Fit a tiny FlowGRPO on the prompt batch (or `loader`) for max_steps with `callback` (and a Recorder)."""
    model = model or tiny_grpo()
    recorder = Recorder()
    args = {**QUIET, "max_steps": max_steps, "limit_val_batches": 0, **trainer_kw}
    trainer = L.Trainer(callbacks=[recorder, callback], **args)
    trainer.fit(model, loader or prompt_loader(), prompt_loader(length=1) if val else None)
    return trainer, model, recorder


def grpo(reward=None, **kw) -> GRPORollouts:
    args = dict(
        group_size=4, steps=3, eval_steps=3, train_steps="all", steps_per_rollout=1, std_scope="group"
    )
    return GRPORollouts(reward=reward or {"red": redness}, **{**args, **kw})


def test_the_first_update_is_on_policy_ratio_exactly_one_and_the_second_is_not():
    _, _, rec = fit(grpo(steps_per_rollout=2), max_steps=2)
    first, second = rec.stats
    assert first["grpo/ratio_min"] == 1.0 and first["grpo/ratio_max"] == 1.0
    assert second["grpo/ratio_min"] < 1.0 or second["grpo/ratio_max"] > 1.0  # same rollout, updated weights
    assert len(rec.slices[0]) == len(rec.slices[1]) == 4  # 2 prompts x G=4 split over 2 steps


def test_groups_with_equal_rewards_are_dropped_and_counted():
    def flat_for_the_first_prompt(images, prompts, references, meta):
        score = redness(images, prompts, references, meta)["score"]
        return {"score": torch.where(torch.tensor([p == "a red image" for p in prompts]), 0.25, score)}

    callback = grpo({"r": flat_for_the_first_prompt})
    _, _, rec = fit(callback, max_steps=1)
    assert callback.dropped_groups == 1 and callback.singleton_groups == 0
    assert rec.slices[0].prompts == ["a red square"] * 4  # only the informative group is trained
    assert callback.history[0]["grpo/kept_fraction"] == 0.5


def test_groups_of_one_are_dropped_and_counted_and_the_step_skipped():
    callback = grpo(group_size=1)
    model = tiny_grpo()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer, _, rec = fit(callback, max_steps=2, model=model)
    assert callback.singleton_groups == 4 and callback.empty == 2 and callback.skipped == 0
    assert rec.slices == [None, None] and trainer.global_step == 2
    after = dict(model.named_parameters())
    assert all(
        torch.equal(v, after[n]) for n, v in before.items()
    )  # no update, not even AdamW's weight decay


def test_a_nan_reward_is_a_counted_skip_and_training_goes_on():
    calls = []

    def nan_once(images, prompts, references, meta):
        calls.append(1)
        score = redness(images, prompts, references, meta)["score"]
        return {"score": score * float("nan") if len(calls) == 1 else score}

    callback = grpo({"r": nan_once})
    _, _, rec = fit(callback, max_steps=3)
    assert callback.skipped == 1 and callback.consecutive == 0
    assert rec.slices[0] is None and rec.slices[1] is not None and rec.slices[2] is not None


def test_a_wrong_shape_reward_is_a_counted_skip():
    callback = grpo({"r": lambda images, prompts, refs, meta: {"score": torch.zeros(len(images) + 1)}})
    fit(callback, max_steps=2)
    assert callback.skipped == 2


def test_a_down_reward_server_skips_and_k_in_a_row_stop_the_run_with_a_clear_message():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    # a server that went down after the start (one down at the start stops the fit: test_reward_serving.py)
    remote = RemoteReward(
        f"http://127.0.0.1:{port}/", timeout=0.5, retries=0, name="judge", check_at_start=False
    )
    callback = grpo({"judge": remote}, max_consecutive_skips=2)
    with pytest.raises(GRPOSkipError, match=r"2 GRPO rollout batches in a row were skipped.*cannot connect"):
        fit(callback, max_steps=5)
    assert callback.skipped == 2


def test_windowed_training_stores_only_the_window_steps():
    callback = grpo(steps=6, train_steps="window", window_size=2, window=(0, 3))
    _, _, rec = fit(callback, max_steps=1)
    trained = rec.slices[0]
    assert trained.log_probs.shape == (8, 2) and all(lat.shape[0] == 2 for lat in trained.latents)
    assert torch.all(trained.sigmas[:, 0] > trained.sigmas[:, 1])  # two consecutive steps ...
    assert torch.equal(trained.next_sigmas[:, 0], trained.sigmas[:, 1])
    assert bool((trained.sigmas[:, 0] >= trained.sigmas.new_tensor(0.5)).all())  # ... in the high-noise half


def test_msgrpo_rule_is_wired_into_the_advantages():
    g = torch.Generator().manual_seed(0)
    table = {
        "instr": torch.rand(8, generator=g),
        "ref0": torch.rand(8, generator=g),
        "ref1": torch.rand(8, generator=g),
    }
    table["ref1"][4:] = float("nan")  # the second prompt has one reference

    class Fixed(Reward):
        nan_ok = True

        def __init__(self, keys):
            self.keys = keys

        def __call__(self, images, prompts, references, meta):
            return {k: table[k].clone() for k in self.keys}

    reward = {"instruction": Fixed(["instr"]), "consistency": Fixed(["ref0", "ref1"])}
    weights = {"instruction": 1.0, "consistency": 0.5, "min": 0.25}
    callback = grpo(
        reward,
        weights=weights,
        rule="msgrpo",
        use_min=True,
        advantage_clip=None,
        steps_per_rollout=1,
        std_scope=None,
    )
    _, _, rec = fit(callback, max_steps=1)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    refs = torch.stack([table["ref0"], table["ref1"]], 1)
    expected = msgrpo_reward(
        {"instruction/instr": table["instr"]}, refs, groups, {"consistency": 0.5, "min": 0.25}, True
    )
    expected = group_advantages(expected, groups, "none", clip=None)
    assert torch.allclose(rec.slices[0].advantages, expected, atol=1e-6)


def test_a_std_scope_with_a_self_normalising_rule_is_refused():
    for rule in ("msgrpo", "normalize_then_sum"):
        with pytest.raises(
            ValueError, match=f"std_scope='group' applies to rule 'sum_then_normalize' only: rule '{rule}'"
        ):
            grpo(rule=rule)  # grpo() sets std_scope="group"
    callback = grpo()
    with pytest.raises(ValueError, match="leave std_scope unset"):  # a PDTR stage switching to such a rule
        callback.set_stage(None, {"rewards": {"red": redness}, "rule": "normalize_then_sum"})
    assert grpo(rule="msgrpo", std_scope=None).std_scope is None


def test_gathered_groups_are_numbered_in_rank_order_and_each_rank_keeps_its_slice(monkeypatch):
    # gather_groups with a stand-in all_gather_object (the two-process run is the slow test below):
    # rank 1 of 2, rank 0 holding 2 prompts, rank 1 one prompt, G = 3.
    table = gather_table()
    parts = [
        ({k: v[:6] for k, v in table.items()}, 2),
        ({"a/score": table["a/score"][6:]}, 1),
    ]  # no "b" on rank 1
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), parts))
    scores, groups, mine = gather_groups({"a/score": table["a/score"][6:]}, 1, 3)
    assert groups.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and mine == slice(6, 9)
    assert torch.equal(scores["a/score"], table["a/score"])
    assert torch.equal(scores["b/score"][:6], table["b/score"][:6]) and scores["b/score"][6:].isnan().all()


@pytest.mark.slow
def test_advantages_of_a_rollout_gathered_on_two_gloo_processes_equal_one_process(tmp_path):
    # Flow-GRPO gathers rewards and prompt ids over all processes, then normalises ("batch": one std over
    # every reward). Two processes with 2 and 1 prompts of G = 3 must get the advantages one process gets
    # for the 3 prompts, each its own slice.
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    table = gather_table()
    (tmp_path / "table.json").write_text(json.dumps({k: v.tolist() for k, v in table.items()}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, check=True, timeout=300
    )
    reward = build_reward({"a": redness, "b": redness}, weights={"a": 1.0, "b": 0.5})
    groups = torch.arange(3).repeat_interleave(3)
    single = reward.advantages(table, groups, "batch", 5.0)
    ranks = [torch.tensor(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in (0, 1)]
    assert torch.equal(torch.cat(ranks), single)
    assert not torch.allclose(
        ranks[1],
        reward.advantages({k: v[6:] for k, v in table.items()}, groups[6:] - 2, "batch", 5.0),
    )


def gather_table() -> dict[str, torch.Tensor]:
    """Scores of 3 prompts x G = 3 (for the gather test): rank 0 holds the first 6, rank 1 the last 3."""
    g = torch.Generator().manual_seed(3)
    return {
        "a/score": torch.rand(9, generator=g).double().float(),
        "b/score": (torch.rand(9, generator=g) * 4),
    }


GATHER_SCRIPT = """
import json, os, sys, torch
import torch.distributed as dist
import torch.multiprocessing as mp

def score(images, prompts, references, meta):
    return {"score": torch.zeros(len(images))}  # never called: the scores are the table's

def run(rank, out, table):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from lightning_modules.components.grpo import gather_groups
    from rewards.base import CombinedReward
    mine = slice(0, 6) if rank == 0 else slice(6, 9)
    local = {k: torch.tensor(v[mine]) for k, v in table.items()}
    scores, groups, own = gather_groups(local, 2 if rank == 0 else 1, 3)
    reward = CombinedReward({"a": score, "b": score}, {"a": 1.0, "b": 0.5}, name="reward")
    advantages = reward.advantages(scores, groups, "batch", 5.0)[own]
    open(f"{out}/rank{rank}.json", "w").write(json.dumps(advantages.tolist()))
    dist.destroy_process_group()

if __name__ == "__main__":
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); os.environ["PORT"] = str(s.getsockname()[1])
    table = json.loads(open(sys.argv[1] + "/table.json").read())
    mp.spawn(run, args=(sys.argv[1], table), nprocs=2)
"""


def test_mean_training_reward_rises_on_a_learnable_reward():
    # Flow-GRPO's default "fraction" 0.99: the last step (SD3 grid: sigma 0.009 -> 0, an SDE std near 0, so a
    # log-prob that swings with every update and ratios that clip) is not trained
    callback = grpo(group_size=8, train_steps="fraction")
    fit(callback, max_steps=36, model=tiny_grpo(lr=3e-2, beta=0.0))
    rewards = [h["reward/total"] for h in callback.history]
    early, late = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert late > early + 0.01, rewards


def test_heldout_evaluation_logs_both_rewards_and_stops_on_divergence():
    count = {"n": 0}

    def rising(images, prompts, references, meta):  # redness + the number of evaluations so far: rises
        return {"score": redness(images, prompts, references, meta)["score"] + count["n"]}

    def falling(images, prompts, references, meta):  # the held-out reward falls at every evaluation
        count["n"] += 1
        return {"score": torch.full((len(images),), -float(count["n"]))}

    callback = grpo({"red": rising}, eval_reward={"held": falling}, stop_on_divergence=2)
    trainer, _, _ = fit(
        callback, 20, val=True, limit_val_batches=1, val_check_interval=2, check_val_every_n_epoch=None
    )
    assert callback.diverged and trainer.global_step == 6  # evaluations at steps 2, 4, 6
    assert [h for _, h in callback.evaluations] == [-1.0, -2.0, -3.0]
    assert {"eval/train_reward", "eval/heldout_reward"} <= set(trainer.callback_metrics)


def test_resume_mid_rollout_continues_the_rollout_and_its_rng_stream_exactly(tmp_path):
    def run(max_steps, root, ckpt=None):
        model = tiny_grpo()
        callback = grpo(steps_per_rollout=2)
        recorder = Recorder()
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1, save_top_k=0)
        args = {**QUIET, "enable_checkpointing": True, "max_steps": max_steps, "limit_val_batches": 0}
        trainer = L.Trainer(callbacks=[recorder, callback, checkpoint], default_root_dir=root, **args)
        trainer.fit(model, prompt_loader(), ckpt_path=ckpt)
        return model, recorder, callback

    full, full_rec, _ = run(5, tmp_path / "full")
    run(3, tmp_path / "a")  # stops after the first slice of the second rollout
    resumed, rec, callback = run(5, tmp_path / "b", ckpt=str(tmp_path / "a" / "last.ckpt"))
    assert len(rec.slices) == 2  # steps 3 and 4
    for mine, theirs in zip(rec.slices, full_rec.slices[3:]):
        assert torch.equal(mine.log_probs, theirs.log_probs) and torch.equal(
            mine.advantages, theirs.advantages
        )
        assert all(torch.equal(a, b) for a, b in zip(mine.next_latents, theirs.next_latents))
    assert callback.rollouts == 3  # rollouts at steps 0, 2 (restored mid-way) and 4
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_state_dict_round_trip_keeps_counters_and_the_unused_rollout():
    callback = grpo(steps_per_rollout=2)
    fit(callback, max_steps=1)
    state = callback.state_dict()
    assert state["buffer"] is not None and state["buffer"]["pos"] == 1
    torch.save(state, "state.pt")
    other = grpo(steps_per_rollout=2)
    other.load_state_dict(torch.load("state.pt", weights_only=True))
    assert other.state_dict()["rollouts"] == 1 and other._pos == 1
    assert torch.equal(other._buffer.log_probs, callback._buffer.log_probs)


def test_rewards_from_a_config_are_allowlisted_and_combined():
    reward = build_reward({"colour": {"class_path": "rewards.scene.ColourCheck", "init_args": {"tau": 30.0}}})
    assert reward.rewards["colour"].tau == 30.0 and reward.weights == {"colour": 1.0}
    with pytest.raises(RefusedImport):
        build_reward({"x": {"class_path": "os.system"}})
    scores = {"a/score": torch.tensor([1.0, float("nan")]), "b/score": torch.tensor([0.0, 0.5])}
    combined = build_reward({"a": redness, "b": redness}, weights={"a": 3.0, "b": 1.0})
    assert reward_level(combined, scores).tolist() == pytest.approx(
        [0.75, 0.5]
    )  # weighted mean of applicable


def test_a_module_without_the_protocol_is_a_clear_error():
    class Plain(L.LightningModule):
        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return None

    trainer = L.Trainer(callbacks=[grpo()], **{**QUIET, "max_steps": 1})
    with pytest.raises(TypeError, match="SupportsGRPO"):
        trainer.fit(Plain(), prompt_loader())


def nan_on_rank_one_at_the_second_rollout(images, prompts, references, meta):
    """Redness, but NaN on rank 1 at its second call (for the DDP test)."""
    calls = nan_on_rank_one_at_the_second_rollout.calls = (
        getattr(nan_on_rank_one_at_the_second_rollout, "calls", 0) + 1
    )
    score = redness(images, prompts, references, meta)["score"]
    return {"score": score * float("nan") if os.environ.get("LOCAL_RANK") == "1" and calls == 2 else score}


DDP_SCRIPT = """
import json, sys, torch, lightning as L
from callbacks.grpo import GRPORollouts
from tests.callbacks.test_grpo import nan_on_rank_one_at_the_second_rollout as reward
from tests.lightning_modules.test_flow_edit import QUIET
from tests.lightning_modules.test_flow_grpo import prompt_loader, tiny_grpo
if __name__ == "__main__":
    callback = GRPORollouts(reward={"r": reward}, group_size=2, steps=2, train_steps="all", steps_per_rollout=1)
    trainer = L.Trainer(**{**QUIET, "devices": 2, "strategy": "ddp", "max_steps": 4, "limit_val_batches": 0},
                        callbacks=[callback])
    model = tiny_grpo()
    trainer.fit(model, prompt_loader())
    lora = sum(float(p.double().sum()) for n, p in model.named_parameters() if "lora_" in n)
    out = {"skipped": callback.skipped, "step": trainer.global_step, "lora": lora}
    open(sys.argv[1] + f"/rank{trainer.global_rank}.json", "w").write(json.dumps(out))
"""


@pytest.mark.slow
def test_under_ddp_a_reward_failing_on_one_rank_is_skipped_on_both(tmp_path):
    script = tmp_path / "ddp_grpo.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OMNILAB_ALLOW_IMPORTS": "tests"}
    subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, check=True, timeout=600
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["skipped"] for r in ranks] == [1, 1] and [r["step"] for r in ranks] == [4, 4]
    assert ranks[0]["lora"] == ranks[1]["lora"]  # the ranks stayed in sync


def test_group_grids_print_each_samples_reward_and_advantage_every_n_steps(tmp_path, monkeypatch):
    from PIL import Image

    import callbacks.images as images

    drawn, scored = [], []
    real = images.label_grid

    def recording_label_grid(*args, **kw):
        drawn.append(kw)
        return real(*args, **kw)

    def recorded_redness(images_, prompts, references, meta):
        out = redness(images_, prompts, references, meta)
        scored.append(out["score"].clone())
        return out

    monkeypatch.setattr(images, "label_grid", recording_label_grid)
    batch = prompt_batch(refs=[[torch.zeros(3, 16, 16)], []])  # group 1 edits a reference, group 2 has none
    callback = grpo({"red": recorded_redness}, grid_every_n_steps=2, grid_cell=32)
    from tests.callbacks.test_images import RecordingMLFlow

    logger = RecordingMLFlow()
    _, _, rec = fit(
        callback, max_steps=3, default_root_dir=tmp_path, loader=prompt_loader(batch), logger=logger
    )
    assert [f for _, f, _ in logger.images] == [
        "samples/grpo_step_000000.png",
        "samples/grpo_step_000002.png",
    ]
    # rollouts at steps 0, 1, 2: grids at the first rollout from each multiple of 2
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["grpo_step_000000.png", "grpo_step_000002.png"]  # fmt: skip
    assert len(drawn) == 2 and callback.next_grid == 4
    first = drawn[0]
    assert first["names"] == ["reference 1", "sample 1", "sample 2", "sample 3", "sample 4"]
    # what the module trained on at step 0 (steps_per_rollout=1: the whole rollout, both groups kept)
    trained = rec.slices[0]
    assert len(trained) == 8 and trained.prompts == ["a red image"] * 4 + ["a red square"] * 4
    for k, row in enumerate(first["labels"]):
        assert row[0] == ""  # the reference column has no numbers
        for j, label in enumerate(row[1:]):
            reward_line, advantage_line = label.split("\n")
            assert float(reward_line.removeprefix("r ")) == pytest.approx(
                float(scored[0][4 * k + j]), abs=1e-4
            )
            assert float(advantage_line.removeprefix("A ")) == pytest.approx(float(trained.advantages[4 * k + j]), abs=1e-4)  # fmt: skip
    # the advantages printed are the group-normalised rewards (std_scope "group"), worked here by hand
    for k in range(2):
        r = scored[0][4 * k : 4 * k + 4].double()
        expected = (r - r.mean()) / (r.std(unbiased=False) + 1e-4)  # the population std
        printed = [float(label.split("\n")[1][2:]) for label in first["labels"][k][1:]]
        assert printed == pytest.approx(expected.tolist(), abs=2e-3)
    # 5 columns (1 reference + G = 4 samples) of 32 px with 4 px gaps; 2 rows with label and caption bands
    image = Image.open(tmp_path / "samples" / "grpo_step_000000.png")
    assert image.width == 5 * 32 + 6 * 4 and image.height > 16 + 2 * 32
    gray = np.asarray(image.convert("L")).astype(int)
    assert (gray[16 + 32 : 16 + 32 + 24, 40:72] < 128).sum() > 10  # numbers under sample 1 of row 1
