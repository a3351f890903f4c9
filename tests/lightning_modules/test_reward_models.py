"""The reward models' losses and verdict rules against hand-worked values; the modules on tiny VLMs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lightning_modules.reward_models import (
    Verdict,
    VerdictError,
    bt_loss,
    bt_margin_loss,
    format_verdict,
    joint_loss,
    parse_verdict,
    pool_heads,
    pq_score,
    rao_kupper_loss,
    sc_score,
    spatial_reward,
    uncertainty_bt_loss,
    verdict_reward,
)

# --- preference losses -----------------------------------------------------------------------------------


def test_bt_loss_is_log2_at_zero_and_log_one_plus_e_minus_one_at_one():
    # -log σ(0) = log 2; -log σ(1) = log(1 + e^-1) = 0.3132617
    assert bt_loss(torch.tensor([0.0])).item() == pytest.approx(math.log(2), abs=1e-6)
    assert bt_loss(torch.tensor([1.0])).item() == pytest.approx(0.3132617, abs=1e-6)
    assert bt_loss(torch.tensor([0.0, 1.0])).item() == pytest.approx((0.6931472 + 0.3132617) / 2, abs=1e-6)


def test_bt_margin_shifts_the_difference_by_the_margin():
    # Δ = m gives -log σ(0) = log 2 (EditReward's constant margin 0.57)
    assert bt_margin_loss(torch.tensor([0.57]), 0.57).item() == pytest.approx(math.log(2), abs=1e-6)
    assert bt_margin_loss(torch.tensor([1.57]), 0.57).item() == pytest.approx(0.3132617, abs=1e-6)


def test_rao_kupper_tie_and_win_at_zero_difference_theta_five():
    # θ = 5, Δ = 0: σ(-log 5) = 1/6, so P(A≻B) = 1/6 (L = log 6) and P(tie) = 24 / 36 = 2/3 (L = log 1.5);
    # P(A) + P(B) + P(tie) = 1/6 + 1/6 + 2/3 = 1
    delta = torch.zeros(2)
    assert rao_kupper_loss(delta, torch.tensor([False, False]), 5.0).item() == pytest.approx(
        math.log(6), abs=1e-6
    )
    assert rao_kupper_loss(delta, torch.tensor([True, True]), 5.0).item() == pytest.approx(
        math.log(1.5), abs=1e-6
    )
    mixed = rao_kupper_loss(delta, torch.tensor([True, False]), 5.0).item()
    assert mixed == pytest.approx((math.log(1.5) + math.log(6)) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="theta > 1"):
        rao_kupper_loss(delta, torch.tensor([True, True]), 1.0)


def test_uncertainty_bt_with_vanishing_sigma_is_plain_bt():
    tiny = torch.tensor([-30.0])
    loss = uncertainty_bt_loss(
        torch.tensor([1.0]), tiny, torch.tensor([0.0]), tiny, 100, torch.Generator().manual_seed(0)
    )
    assert loss.item() == pytest.approx(0.3132617, abs=1e-6)


def test_uncertainty_bt_matches_the_gaussian_expectation_and_a_fixed_generator_is_reproducible():
    # z ~ N(Δ = 0.5, σ_A² + σ_B² = 0.5² + 1² = 1.25): E[softplus(-z)] by 80-point Gauss-Hermite quadrature
    mu_a, mu_b = torch.tensor([0.5]), torch.tensor([0.0])
    ls_a, ls_b = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([1.0]))
    x, w = np.polynomial.hermite_e.hermegauss(80)
    z = 0.5 + math.sqrt(1.25) * x
    expected = float((w * np.logaddexp(0.0, -z)).sum() / math.sqrt(2 * math.pi))
    loss = uncertainty_bt_loss(mu_a, ls_a, mu_b, ls_b, 200_000, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(expected, abs=5e-3)
    assert expected > 0.3132617 + 0.1  # uncertainty raises the loss above BT at the mean difference
    again = uncertainty_bt_loss(mu_a, ls_a, mu_b, ls_b, 1000, torch.Generator().manual_seed(7))
    same = uncertainty_bt_loss(mu_a, ls_a, mu_b, ls_b, 1000, torch.Generator().manual_seed(7))
    assert again.item() == same.item()


def test_uncertainty_bt_gradient_reaches_both_mu_and_log_sigma():
    mu = torch.tensor([0.3], requires_grad=True)
    ls = torch.tensor([0.0], requires_grad=True)
    uncertainty_bt_loss(
        mu, ls, torch.zeros(1), torch.zeros(1), 500, torch.Generator().manual_seed(0)
    ).backward()
    assert mu.grad.item() < 0  # raising the preferred mean lowers the loss
    assert ls.grad.item() > 0  # more uncertainty, more loss (for a positive margin)


def test_joint_loss_is_pref_plus_lambda_lm():
    assert joint_loss(torch.tensor(0.7), torch.tensor(2.0), 0.1).item() == pytest.approx(0.9)
    assert joint_loss(torch.tensor(0.7), torch.tensor(2.0), 0.0).item() == pytest.approx(0.7)


def test_lm_loss_counts_only_labelled_tokens_shifted_by_one():
    from lightning_modules.components.vlm import lm_loss

    # position 0 predicts token 1 with uniform logits: -log(1/3) = 1.098612; position 1 predicts token 2 with
    # logits [0, 0, ln 2]: -log(2/4) = 0.693147; position 2 predicts nothing (the sequence ends); label 0 is -100
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2)], [5.0, -5.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 2]])
    assert lm_loss(logits, labels).item() == pytest.approx((1.098612 + 0.693147) / 2, abs=1e-5)
    assert lm_loss(logits, torch.tensor([[-100, -100, 2]])).item() == pytest.approx(0.693147, abs=1e-5)
    with pytest.raises(ValueError, match="no labelled token"):
        lm_loss(logits, torch.full((1, 3), -100))


def test_pool_heads_is_elementwise_over_heads():
    out = torch.tensor([[[1.0, -1.0], [3.0, 0.0]]])  # one sample, two heads, (μ, log σ)
    assert pool_heads(out, "mean").tolist() == [[2.0, -0.5]]
    assert pool_heads(out, "min").tolist() == [[1.0, -1.0]]
    assert pool_heads(out, "sum").tolist() == [[4.0, -1.0]]
    with pytest.raises(ValueError, match="pooling"):
        pool_heads(out, "max")


# --- SpatialReward -------------------------------------------------------------------------------------------


def test_spatial_reward_hand_worked():
    # SC = (0.6·20 + 0.4·10) / 2.5 = 6.4; PQ = (0.5·15 + 0.5·5) / 2.5 = 4
    assert sc_score(20, 10) == pytest.approx(6.4)
    assert pq_score(15, 5) == pytest.approx(4.0)
    # R = 6.4^0.8 · 4^0.2 / 10 = e^(0.8 ln 6.4) e^(0.2 ln 4) / 10 = 4.415135 · 1.319508 / 10 = 0.582581
    assert spatial_reward(6.4, 4.0) == pytest.approx(0.582581, abs=1e-5)
    assert spatial_reward(sc_score(25, 25), pq_score(25, 25)) == pytest.approx(1.0)
    assert spatial_reward(0.0, 10.0) == 0.0


SC_TEXT = json.dumps(
    {
        "edit_region": [{"id": 0, "label": "star", "bbox_2d": [100, 200, 400, 600]}],
        "reasoning": "<|bbox_0|> the star turned blue. <|global|> follows the instruction.",
        "score": [20, 10],
    }
)
PQ_TEXT = json.dumps({"reasoning": "natural", "score": [15, 5]})


def test_a_valid_verdict_parses_and_round_trips_through_format():
    sc = parse_verdict(SC_TEXT, "sc")
    assert (
        isinstance(sc, Verdict) and sc.scores == (20.0, 10.0) and sc.regions[0].bbox == (100, 200, 400, 600)
    )
    assert parse_verdict(format_verdict(sc), "sc") == sc
    assert isinstance(parse_verdict(f"```json\n{SC_TEXT}\n```", "sc"), Verdict)  # one fenced block is fine
    pq = parse_verdict(PQ_TEXT, "pq")
    assert verdict_reward(sc, pq) == pytest.approx(0.582581, abs=1e-5)


def test_format_without_boxes_drops_regions_and_citations():
    text = format_verdict(parse_verdict(SC_TEXT, "sc"), boxes=False)
    data = json.loads(text)
    assert (
        data["edit_region"] == [] and "<|bbox_" not in data["reasoning"] and "<|global|>" in data["reasoning"]
    )
    assert isinstance(parse_verdict(text, "sc"), Verdict)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("The edit looks fine, 20/25.", "not JSON"),
        (SC_TEXT + " Hope this helps!", "not JSON"),
        ('{"reasoning": "x", "score": [1, 2]}', "keys"),
        (SC_TEXT.replace("[20, 10]", "[20]"), "two numbers"),
        (SC_TEXT.replace("[20, 10]", "[30, 10]"), "outside"),
        (SC_TEXT.replace("[20, 10]", '["20", 10]'), "two numbers"),
        (SC_TEXT.replace("[20, 10]", "[NaN, 10]"), "not JSON"),
        (SC_TEXT.replace("[100, 200, 400, 600]", "[100, 200, 1400, 600]"), "outside the 0-1000 grid"),
        (SC_TEXT.replace("[100, 200, 400, 600]", "[400, 200, 100, 600]"), "inverted"),
        (SC_TEXT.replace("<|bbox_0|>", "<|bbox_3|>"), "bbox_3"),
        ("[1, 2]", "not an object"),
    ],
)
def test_malformed_verdicts_are_error_values_with_a_reason(text, reason):
    out = parse_verdict(text, "sc")
    assert isinstance(out, VerdictError) and not out
    assert reason in out.reason
    assert math.isnan(verdict_reward(out, parse_verdict(PQ_TEXT, "pq")))


# --- the modules on tiny VLMs -------------------------------------------------------------------------------

import lightning as L  # noqa: E402

from lightning_modules.components.vlm import Conversation, build_vlm  # noqa: E402
from lightning_modules.reward_models import (  # noqa: E402
    LM_LORA_TARGETS,
    JointRewardModel,
    PreferenceRewardModel,
    SpatialRewardModel,
)

TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}  # fmt: skip
PROCESSOR = {"min_pixels": 28 * 28, "max_pixels": 28 * 28}


def backbone(family: str = "qwen2_5_vl") -> dict:
    text = {**TEXT, "head_dim": 16} if family == "qwen3_vl" else TEXT
    side = 32 if family == "qwen3_vl" else 28  # one merged token per image
    return {"family": family, "config": {"text_config": text}, "tokenizer": {"vocab_size": 512},
            "image_processor": {"min_pixels": side * side, "max_pixels": side * side}}  # fmt: skip


def flat(value: float, side: int = 28) -> torch.Tensor:
    return torch.full((3, side, side), value)


def pair_batch(n: int = 4, rationale: str | None = "The edit follows the instruction.") -> dict:
    """Pairs where the chosen edit is bright and the rejected one dark (a preference the images show)."""
    g = torch.Generator().manual_seed(n)
    bright = [flat(0.5 + 0.4 * float(torch.rand(1, generator=g))) for _ in range(n)]
    dark = [flat(-0.9 + 0.4 * float(torch.rand(1, generator=g))) for _ in range(n)]
    return {
        "sources": [[flat(0.0)] for _ in range(n)],
        "instruction": ["Make it bright."] * n,
        "chosen": bright,
        "rejected": dark,
        "tie": torch.zeros(n, dtype=torch.bool),
        "chosen_rationale": [rationale] * n,
        "rejected_rationale": [None] * n,
        "chosen_verdict": [None] * n,
        "rejected_verdict": [None] * n,
    }


def discriminative(cls=PreferenceRewardModel, **kw) -> PreferenceRewardModel:
    torch.manual_seed(0)
    model = cls(backbone=kw.pop("backbone", backbone()), rubrics={"a": "{instruction}", "b": "Quality: {instruction}"},
                head_widths=(16, 8), head_dropout=0.0, mc_samples=16, lr=3e-3, special_token_lr=3e-3, **kw)  # fmt: skip
    model.configure_model()
    return model


def train(model, batch, steps: int, lr: float = 3e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for g in model.param_groups() for p in g["params"]], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet_log(monkeypatch):
    """`self.log` outside a Trainer is a no-op here (the modules log from their training steps)."""
    monkeypatch.setattr(L.LightningModule, "log", lambda *a, **k: None)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_discriminative_model_learns_a_preference_its_images_show(family):
    model = discriminative(loss="bt", backbone=backbone(family))
    batch = pair_batch(4)
    losses = train(model, batch, 12)
    assert losses[-1] < 0.5 * losses[0]
    held = pair_batch(6)  # other brightness draws
    with torch.no_grad():
        good = model.score_edits(held["sources"], held["instruction"], held["chosen"])["score"]
        bad = model.score_edits(held["sources"], held["instruction"], held["rejected"])["score"]
    assert bool((good > bad).all())


def test_the_reward_token_is_read_once_per_rubric_pass_and_its_embedding_offset_trains():
    model = discriminative(loss="uncertainty")
    batch = pair_batch(2)
    conv = model.conversation(batch["sources"][0], "x", batch["chosen"][0], model.rubrics["a"])
    ids = model.vlm.inputs([conv])["input_ids"]
    assert int((ids == model.reward_token_id).sum()) == 1
    model.training_step(batch, 0).backward()
    assert model.token_offset.grad is not None and model.token_offset.grad.abs().sum() > 0
    groups = {len(g["params"]): g["lr"] for g in model.param_groups()}
    assert groups[1] == model.special_token_lr  # the offset is its own group


def test_jrm_adds_lambda_times_the_rationale_loss_and_only_rationale_tokens_are_targets():
    batch = pair_batch(2)
    pref = discriminative(JointRewardModel, lm_weight=0.0, loss="bt").training_step(batch, 0)
    joint_model = discriminative(JointRewardModel, lm_weight=0.5, loss="bt")
    lm = joint_model.rationale_loss(batch)
    assert joint_model.training_step(batch, 0).item() == pytest.approx(
        pref.item() + 0.5 * lm.item(), rel=1e-5
    )
    # the rejected candidates have no rationale: only the 2 chosen conversations are language-modelled
    conv = Conversation(
        images=[flat(0.0), flat(0.5)], text="Explain.", answer="The edit follows the instruction."
    )
    inputs = joint_model.vlm.inputs([conv], with_answer=True)
    labels = inputs["labels"][0]
    assert (
        joint_model.vlm.tokenizer.decode(labels[labels != -100])
        == "The edit follows the instruction.<|im_end|>"
    )
    no_rationale = pair_batch(2, rationale=None)
    assert joint_model.rationale_loss(no_rationale) is None
    assert joint_model.training_step(no_rationale, 0).item() == pytest.approx(
        discriminative(JointRewardModel, lm_weight=0.0, loss="bt").training_step(no_rationale, 0).item(),
        rel=1e-5,
    )


SC = {"edit_region": [{"id": 0, "label": "box", "bbox_2d": [100, 100, 500, 500]}], "reasoning": "<|bbox_0|> ok. <|global|> good.", "score": [24, 23]}  # fmt: skip
PQ = {"reasoning": "natural.", "score": [22, 21]}


def spatial(**kw) -> SpatialRewardModel:
    torch.manual_seed(0)
    model = SpatialRewardModel(backbone=kw.pop("backbone", backbone()), sc_prompt="Judge: {instruction}", pq_prompt="Quality?", max_new_tokens=8, **kw)  # fmt: skip
    model.configure_model()
    return model


def test_spatialreward_sft_fits_its_verdicts():
    model = spatial()
    batch = pair_batch(2)
    batch["chosen_verdict"] = [{"sc": SC, "pq": PQ}] * 2
    losses = train(model, batch, 8, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0]
    batch["chosen_verdict"] = [None] * 2
    with pytest.raises(ValueError, match="has none"):
        model.training_step(batch, 0)


def test_spatialreward_scores_parsed_verdicts_and_counts_unparsable_answers(monkeypatch):
    model = spatial()
    answers = iter([[json.dumps(SC), "The edit is fine!", json.dumps(PQ), json.dumps(PQ)]])
    monkeypatch.setattr(model.vlm, "generate", lambda convs, n: next(answers))
    out = model.score_edits([[flat(0.0)]] * 2, ["a", "b"], [flat(0.5), flat(0.2)])
    # SC = (0.6·24 + 0.4·23) / 2.5 = 9.44; PQ = (22 + 21) / 2 / 2.5 = 8.6; R = 9.44^0.8 · 8.6^0.2 / 10
    assert out["score"][0].item() == pytest.approx(9.44**0.8 * 8.6**0.2 / 10, rel=1e-6)
    assert math.isnan(out["score"][1].item()) and math.isnan(out["sc"][1].item())
    assert model.parse_failures == 1 and model.verdicts_seen == 4


def test_trainable_weights_are_fp32_over_a_bf16_release(tmp_path):
    """A bf16 release loads in bf16 (transformers v5 keeps the file dtype): full fine-tuning must load it in fp32
    (else AdamW's lr-sized steps round away), LoRA adapters over the frozen bf16 base are fp32 themselves."""
    release = build_vlm(**backbone("qwen3_vl"))
    release.model.to(torch.bfloat16)
    release.save_pretrained(tmp_path)
    spec = {"family": "qwen3_vl", "pretrained": str(tmp_path)}
    with pytest.raises(ValueError, match=r"stored in torch.bfloat16.*dtype: float32"):
        discriminative(backbone=spec).configure_optimizers()
    full = discriminative(backbone={**spec, "load": {"dtype": "float32"}})
    full.configure_optimizers()
    assert {p.dtype for p in full.parameters() if p.requires_grad} == {torch.float32}
    lora = spatial(backbone=spec, lora={"r": 4, "lora_alpha": 8, "target_modules": LM_LORA_TARGETS})
    lora.configure_optimizers()
    trainable = {n: p.dtype for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable) and set(trainable.values()) == {torch.float32}
    assert lora.vlm.dtype == torch.bfloat16  # the frozen base stays as released


def test_the_paper_lora_targets_only_the_language_model_linear_layers():
    from peft import LoraConfig, inject_adapter_in_model

    vlm = build_vlm(**backbone("qwen3_vl"))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=LM_LORA_TARGETS), vlm.model)
    names = [n for n, _ in vlm.model.named_parameters() if "lora_A" in n]
    assert names and all("language_model" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


@pytest.mark.slow
def test_omnilab_test_on_a_benchmark_config_prints_and_logs_the_table(tmp_path, capsys, monkeypatch):
    """`omnilab test` with a bench fragment: converted MER-Bench items, a checkpoint, the table printed and logged."""
    import mlflow
    import pyarrow as pa
    import pyarrow.parquet as pq

    from omnilab.cli import main
    from tests.datamodules.test_convert_preference import struct

    monkeypatch.undo()  # the real `self.log` (the autouse fixture silences it for the unit tests above)
    rows = [
        {"pair_id": f"p{i}", "instruction": "add a hat", "original_image": struct(0), "edited_images": [struct(30 + i), struct(90), struct(150)]}
        for i in range(3)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "3pair.parquet")
    main(
        [
            "data",
            "convert",
            "mer_bench",
            "--input",
            str(tmp_path / "3pair.parquet"),
            "--out",
            str(tmp_path / "mer"),
        ]
    )
    model = discriminative()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    ckpt = torch.load(tmp_path / "model.ckpt", weights_only=True)
    # `omnilab fit` saves the class path with the hyperparameters; `omnilab test --ckpt_path` reads it
    ckpt["hyper_parameters"]["_class_path"] = "lightning_modules.reward_models.PreferenceRewardModel"
    torch.save(ckpt, tmp_path / "model.ckpt")
    repo = __import__("pathlib").Path(__file__).resolve().parents[2] / "experiments"
    bb = json.dumps(backbone())
    main(
        ["test", "--config", str(repo / "_base" / "default.yaml"), "--config", str(repo / "editreward" / "tiny.yaml"),
         "--config", str(repo / "_base" / "bench_mer_bench.yaml"), f"--data.init_args.data_dir={tmp_path / 'mer'}",
         f"--model.init_args.backbone={bb}", "--model.init_args.rubrics={a: '{instruction}', b: 'Quality: {instruction}'}",
         "--model.init_args.head_widths=[16, 8]", "--trainer.enable_progress_bar=false",
         "--ckpt_path", str(tmp_path / "model.ckpt")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "### mer_bench" in out and "| 3 |" in out and "exact_match" in out
    mlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["editreward"], output_format="list")
    assert "test/mer_bench/exact_match" in run.data.metrics
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "tables")]
    assert artifacts == ["tables/test_benchmark.md"]
