"""CCMP: losses worked by hand, the condition token, the cycle gradient, the staged recipe, evaluation."""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel

from callbacks.ttt import SupportsTestTimeTraining
from datamodules.correspondence import gt_crop_box
from lightning_modules.ccmp import (
    CCMP,
    cycle_loss,
    dice_loss,
    lr_at,
    masked_average_pool,
    segmentation_loss,
)
from lightning_modules.components.backbones import build_backbone

S = 64  # image side: a 4x4 patch grid at patch 16
CONVNEXT = {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 64, 128]}
VIT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "patch_size": 16,
    "num_register_tokens": 4,
}
TINY = {"source_encoder": {"config": CONVNEXT}, "target_encoder": {"config": VIT}, "image_size": S}
LN2 = math.log(2.0)


def tiny_ccmp(**overrides) -> CCMP:
    torch.manual_seed(0)
    model = CCMP(**{**TINY, **overrides})
    model.configure_model()
    return model


def box_mask(top: int, left: int, size: int = 32) -> torch.Tensor:
    mask = torch.zeros(1, S, S)
    mask[:, top : top + size, left : left + size] = 1.0
    return mask


def pair(i: int, setting: str = "ego-exo") -> dict:
    """One sample of the batch contract (datamodules/correspondence.py), random images."""
    g = torch.Generator().manual_seed(i)
    return {
        "src": torch.randn(3, S, S, generator=g),
        "src_mask": box_mask(8, 8),
        "tgt": torch.randn(3, S, S, generator=g),
        "tgt_mask": box_mask(24, 16),
        "visible": torch.tensor(1.0),
        "setting": setting,
        "take": "take0",
        "object": "cup",
        "src_cam": "aria01",
        "tgt_cam": "cam01",
        "frame": torch.tensor(30 * i),
        "__key__": f"k{i}",
    }


def batch_of(n: int, setting: str = "ego-exo") -> dict:
    return next(iter(DataLoader([pair(i, setting) for i in range(n)], batch_size=n)))


# --- losses ---------------------------------------------------------------------------------------------


def test_dice_loss_matches_hand_computation():
    logits = torch.zeros(3, 1, 2, 2)  # p = 0.5 everywhere: Σp = 2
    target = torch.stack(
        [
            torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]),  # Σpg = 0.5, Σg = 1: 1 - (1 + 1)/(2 + 1 + 1) = 1/2
            torch.ones(1, 2, 2),  # Σpg = 2, Σg = 4: 1 - (4 + 1)/(2 + 4 + 1) = 2/7
            torch.full((1, 2, 2), 0.5),  # soft: Σpg = 1, Σg = 2: 1 - (2 + 1)/(2 + 2 + 1) = 2/5
        ]
    )
    assert dice_loss(logits, target).item() == pytest.approx((1 / 2 + 2 / 7 + 2 / 5) / 3)


def test_segmentation_loss_combines_bce_dice_and_visibility_with_their_weights():
    logits = torch.zeros(1, 1, 2, 2)  # BCE(logit 0, g) = ln 2 for any g
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # dice 1/2 (above)
    visible = torch.ones(1)
    cls = torch.tensor([math.log(3.0)])  # sigmoid = 3/4: BCE = -ln(3/4)
    expected = LN2 + 5 * 0.5 + 1 * -math.log(0.75)
    assert segmentation_loss(logits, cls, target, visible).item() == pytest.approx(expected)
    expected = LN2 + 2 * 0.5 + 3 * -math.log(0.75)
    got = segmentation_loss(logits, cls, target, visible, dice_weight=2.0, cls_weight=3.0)
    assert got.item() == pytest.approx(expected)


def test_cycle_loss_is_plain_bce_against_the_source_mask():
    reverse = torch.tensor([[[[math.log(3.0), 0.0]]]])  # p = 3/4 and 1/2
    source = torch.tensor([[[[1.0, 0.5]]]])
    expected = (-math.log(0.75) + LN2) / 2  # BCE(p=3/4, 1), BCE(p=1/2, 0.5) = ln 2
    assert cycle_loss(reverse, source).item() == pytest.approx(expected)


def test_masked_average_pool_on_a_2x2_map():
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])  # [1, 2, 2, 2]
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    expected = torch.tensor([[(1 + 4) / 2, (10 + 40) / 2]])
    torch.testing.assert_close(masked_average_pool(features, mask), expected, rtol=1e-5, atol=0)
    soft = torch.tensor([[[[0.5, 0.0], [0.0, 0.0]]]])  # 0.5·F / 0.5 = F at the top-left
    torch.testing.assert_close(
        masked_average_pool(features, soft), torch.tensor([[1.0, 10.0]]), rtol=1e-5, atol=0
    )


# --- backbones and architecture -------------------------------------------------------------------------


def test_build_backbone_wants_exactly_one_of_pretrained_and_config():
    with pytest.raises(ValueError, match="exactly one of `pretrained`"):
        build_backbone(DINOv3ConvNextModel)
    with pytest.raises(ValueError, match="exactly one of `pretrained`"):
        build_backbone(DINOv3ConvNextModel, pretrained="x", config=CONVNEXT)
    assert build_backbone(DINOv3ConvNextModel, config=CONVNEXT).config.hidden_sizes == [16, 32, 64, 128]


def test_convnext_hidden_state_3_is_the_stride_16_stage_the_source_encoder_keeps():
    convnext = DINOv3ConvNextModel(DINOv3ConvNextConfig(**CONVNEXT)).eval()
    x = torch.randn(1, 3, S, S)
    hidden = convnext(x, output_hidden_states=True).hidden_states
    assert [h.shape[-1] for h in hidden] == [S, S // 4, S // 8, S // 16, S // 32]  # input, then the stages
    stride16 = torch.nn.Sequential(*convnext.model.stages[:3])  # what CCMP.configure_model keeps
    torch.testing.assert_close(stride16(x), hidden[3])
    model = tiny_ccmp()
    assert model.source_encoder(x).shape == (1, CONVNEXT["hidden_sizes"][2], S // 16, S // 16)


def test_init_is_cheap_and_configure_model_is_idempotent():
    model = CCMP(**TINY)
    assert model.target_encoder is None and not list(model.parameters())
    model.configure_model()
    encoder = model.target_encoder
    model.configure_model()
    assert model.target_encoder is encoder


def test_output_shapes():
    model = tiny_ccmp().eval()
    batch = batch_of(2)
    last, aux = model(batch["src"], batch["src_mask"], batch["tgt"])
    for out in (last, aux):
        assert out.mask.shape == (2, 1, S, S)
        assert out.cls.shape == (2,)
    assert not torch.equal(last.mask, aux.mask)  # two different blocks


def test_condition_token_is_a_position_free_prefix_token():
    model = tiny_ccmp().eval()
    vit, batch, seen = model.target_encoder, batch_of(1), {}

    def capture(module, args, kwargs):
        seen["hidden"], seen["position"] = args[0].detach().clone(), kwargs["position_embeddings"]

    handle = vit.model.layer[0].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        last, _ = model(batch["src"], batch["src_mask"], batch["tgt"])
        cdt = model.condition_token(batch["src"], batch["src_mask"])
    handle.remove()
    patches, prefix = (S // 16) ** 2, 1 + VIT["num_register_tokens"]
    # [CLS, 4 registers, CDT, 16 patches]; RoPE covers the 16 patches only, so the layers' prefix
    # (tokens - patches) is 6 tokens, the CDT among them
    assert seen["hidden"].shape == (1, prefix + 1 + patches, VIT["hidden_size"])
    assert seen["position"][0].shape[-2] == patches
    torch.testing.assert_close(seen["hidden"][:, prefix], cdt)

    def run_layers(hidden):
        with torch.no_grad():
            for layer in vit.model.layer:
                hidden = layer(hidden, position_embeddings=seen["position"])
        return vit.norm(hidden)

    out = run_layers(seen["hidden"])
    torch.testing.assert_close(model.heads(out, (S, S)).mask, last.mask)
    # position-free: CCMP's order [CLS, CDT, registers, patches] only permutes the outputs
    order = [0, prefix, *range(1, prefix), *range(prefix + 1, prefix + 1 + patches)]
    permuted = run_layers(seen["hidden"][:, order])
    torch.testing.assert_close(permuted, out[:, order], rtol=1e-4, atol=1e-5)


def test_train_mode_forward_is_deterministic_without_rope_augmentation():
    model = tiny_ccmp().train()  # transformers' default pos_embed_rescale=2 would jitter RoPE per call
    batch = batch_of(1)
    with torch.no_grad():
        a, _ = model(batch["src"], batch["src_mask"], batch["tgt"])
        b, _ = model(batch["src"], batch["src_mask"], batch["tgt"])
    assert torch.equal(a.mask, b.mask)


def test_changing_the_source_mask_changes_the_target_logits():
    model = tiny_ccmp().eval()
    batch = batch_of(1)
    with torch.no_grad():
        a, _ = model(batch["src"], box_mask(0, 0)[None], batch["tgt"])
        b, _ = model(batch["src"], box_mask(32, 32)[None], batch["tgt"])
    assert (a.mask - b.mask).abs().max() > 1e-4
    assert (a.cls - b.cls).abs().max() > 0


def test_cycle_loss_flows_gradient_through_soft_mask():
    model = tiny_ccmp()
    batch = batch_of(2)
    last, _ = model(batch["src"], batch["src_mask"], batch["tgt"])
    cycle = model.cycle_term(batch, last.mask)
    (grad,) = torch.autograd.grad(cycle, last.mask)
    assert grad.abs().sum() > 0  # the soft mask sigmoid(logits) is not detached


# --- training: the staged recipe ------------------------------------------------------------------------


STAGES = [
    {"steps": 10, "lr": 1e-3, "lr_end": 1e-4, "warmup_steps": 2, "train_backbones": False},
    {"steps": 20, "lr": 1e-5, "lr_end": 1e-6, "warmup_steps": 4},
]


def test_stage_schedule_lr_matches_hand_values():
    expected = {
        0: 1e-3 * (1 / 2) ** 2,  # squared warm-up
        1: 1e-3,
        2: 1e-3,  # cosine starts
        6: 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 4 / 8)),  # halfway: 5.5e-4
        10: 1e-5 * (1 / 4) ** 2,  # stage 2 warm-up restarts
        14: 1e-5,
        22: 1e-6 + 0.5 * 9e-6,  # halfway through stage 2's cosine
        29: 1e-6 + 0.5 * 9e-6 * (1 + math.cos(math.pi * 15 / 16)),
        40: 1e-6,  # after the last stage
    }
    for step, lr in expected.items():
        assert lr_at(STAGES, step) == pytest.approx(lr, rel=1e-9), step
    model = tiny_ccmp(stages=STAGES)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = {}
    for step in range(41):
        seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    for step, lr in expected.items():
        assert seen[step] == pytest.approx(lr, rel=1e-9), step


class GradientRecorder(L.Callback):
    """Records, at each optimizer step, which parameters have finite gradients and the optimizer state."""

    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append(
            {
                "with_grad": {n for n, p in pl_module.named_parameters() if p.grad is not None},
                "finite": all(
                    torch.isfinite(p.grad).all() for p in pl_module.parameters() if p.grad is not None
                ),
                "optimizer_state": len(optimizer.state),
                "lr": optimizer.param_groups[0]["lr"],
            }
        )


def fit(model: CCMP, steps: int, callbacks=(), batch_size: int = 2) -> L.Trainer:
    loader = DataLoader([pair(i) for i in range(batch_size)], batch_size=batch_size)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    trainer.fit(model, loader)
    return trainer


def test_linear_probing_stage_trains_heads_only_then_everything_trains():
    stages = [{"steps": 2, "lr": 1e-3, "train_backbones": False}, {"steps": 2, "lr": 1e-4}]
    model = tiny_ccmp(stages=stages)
    recorder = GradientRecorder()
    fit(model, 4, [recorder])
    names = {n for n, _ in model.named_parameters()}
    heads = {n for n in names if n.split(".")[0] in ("projector", "mask_head", "cls_head")}
    assert heads and len(recorder.steps) == 4
    for step in recorder.steps[:2]:  # stage 1: linear probing
        assert step["with_grad"] == heads and step["finite"]
    for step in recorder.steps[2:]:  # stage 2: every parameter, finite
        assert step["with_grad"] == names and step["finite"]
    assert recorder.steps[1]["optimizer_state"] > 0
    assert recorder.steps[2]["optimizer_state"] == 0  # fresh AdamW moments at the stage boundary
    assert [s["lr"] for s in recorder.steps] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    assert all(p.requires_grad for p in model.parameters())


def test_a_few_training_steps_lower_the_loss():
    losses = []

    class LossRecorder(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    fit(tiny_ccmp(lr=1e-3), 5, [LossRecorder()])
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


# --- evaluation and the TTT protocol -------------------------------------------------------------------


def test_ttt_protocol_names_the_last_blocks_and_the_cycle_loss():
    model = tiny_ccmp()
    assert isinstance(model, SupportsTestTimeTraining)
    layers = model.target_encoder.model.layer
    assert model.ttt_parameters(2) == [*layers[2].parameters(), *layers[3].parameters()]
    with pytest.raises(ValueError, match="has 4 blocks"):
        model.ttt_parameters(5)
    batch = batch_of(1, "exo-ego")
    assert model.ttt_group(batch) == "exo-ego"
    torch.manual_seed(1)
    loss = model.ttt_loss(batch)
    torch.manual_seed(1)
    last, _ = model(batch["src"], batch["src_mask"], batch["tgt"])
    reverse, _ = model(batch["tgt"], torch.sigmoid(last.mask), batch["src"])
    torch.testing.assert_close(loss, cycle_loss(reverse.mask, batch["src_mask"]))


def test_predict_step_returns_a_mask_and_confidence_per_pair():
    model = tiny_ccmp().eval()
    with torch.no_grad():
        records = model.predict_step(batch_of(2), 0)
    assert [r["__key__"] for r in records] == ["k0", "k1"]
    for r in records:
        assert r["mask"].dtype == torch.bool and r["mask"].shape == (S, S)
        assert 0.0 <= r["confidence"] <= 1.0 and r["setting"] == "ego-exo"


def expected_ious(model: CCMP, samples: list[dict]) -> list[float]:
    """Each pair's IoU against its 270x480 ground truth, computed here from the formulas, not the pipeline.

    sigmoid(logits) > 0.5 at S; nearest to the 480 square (destination d reads source round(d · S / 480));
    rows 105..374 (the exo content, (480 - 270) // 2 = 105); IoU = |P∩G| / (|P∪G| + 1e-7).
    """
    out = []
    with torch.no_grad():
        for sample in samples:
            last, _ = model(sample["src"][None], sample["src_mask"][None], sample["tgt"][None])
            binary = (torch.sigmoid(last.mask[0, 0]) > 0.5).numpy()
            index = np.minimum(np.floor(np.arange(480) * S / 480 + 0.5).astype(int), S - 1)
            pred = binary[index][:, index][105:375]
            gt = sample["tgt_gt"].numpy()
            out.append((pred & gt).sum() / ((pred | gt).sum() + 1e-7))
    return out


def test_validation_logs_metrics_per_direction_and_their_mean():
    samples = eval_samples(["ego-exo", "exo-ego", "exo-exo", "ego-exo"])
    model = tiny_ccmp().eval()
    with torch.no_grad():  # a bias that puts the predicted masks across the ground truth's edge
        model.mask_head[-1].bias.add_(0.3)
    ious = expected_ious(model, samples)
    assert min(ious) > 0.05 and max(ious) < 0.95  # neither empty nor everything: the value is telling
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (results,) = trainer.validate(model, DataLoader(samples, batch_size=2))
    for direction in ("ego-exo", "exo-ego"):
        for name in ("iou", "ca", "le", "va"):
            assert f"val/{direction}/{name}" in results
    assert "val/exo-exo/iou" not in results  # same-view pairs are not scored
    assert results["val/ego-exo/iou"] == pytest.approx((ious[0] + ious[3]) / 2, abs=1e-6)
    assert results["val/exo-ego/iou"] == pytest.approx(ious[1], abs=1e-6)
    assert results["val/iou"] == pytest.approx(((ious[0] + ious[3]) / 2 + ious[1]) / 2, abs=1e-6)


def eval_samples(settings: list[str]) -> list[dict]:
    samples = []
    for i, setting in enumerate(settings):
        sample = pair(i, setting)
        gt = torch.zeros(270, 480, dtype=torch.bool)
        gt[100:200, 150:300] = True
        sample["tgt_gt"], sample["gt_crop"] = gt, torch.tensor(gt_crop_box(270, 480))
        if setting == "exo-ego":
            sample["src_cam"], sample["tgt_cam"] = "cam01", "aria01"
        samples.append(sample)
    return samples


def test_predict_writes_the_official_submission_json(tmp_path):
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path)
    )
    loader = DataLoader(eval_samples(["ego-exo", "exo-ego", "exo-exo"]), batch_size=1)
    trainer.predict(tiny_ccmp(), loader)
    sub = json.loads((tmp_path / "predictions" / "submission.json").read_text())
    ego = sub["ego-exo"]["results"]["take0"]
    assert set(ego["masks"]["cup"]) == {"aria01_cam01"} and ego["subsample_idx"] == [0]
    entry = ego["masks"]["cup"]["aria01_cam01"]["0"]
    assert entry["pred_mask"]["size"] == [270, 480] and 0.0 <= entry["confidence"] <= 1.0
    assert set(sub["exo-ego"]["results"]["take0"]["masks"]["cup"]) == {
        "cam01_aria01"
    }  # exo-exo not submitted


def test_handalx_protocol_logs_instance_miou():
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    samples = eval_samples(["exo-exo", "exo-exo", "ego-exo"])
    for sample, obj in zip(samples, ["cup", "cup", "pan"]):
        sample["object"] = obj
    loader = DataLoader(samples, batch_size=3)
    model = tiny_ccmp(eval_protocol="handalx")
    ious = expected_ious(model, samples)
    (results,) = trainer.test(model, loader)
    # instances take0/cup (pairs 0, 1) and take0/pan (pair 2): the mean of the per-instance means
    assert results["test/instances/iou"] == pytest.approx(((ious[0] + ious[1]) / 2 + ious[2]) / 2, abs=1e-6)
    assert results["test/iou"] == results["test/instances/iou"]
    with pytest.raises(ValueError, match="eval_protocol"):
        CCMP(**TINY, eval_protocol="davis")


def test_switching_a_trained_model_to_the_handalx_protocol_keeps_its_weights():
    # The replication trains under egoexo4d and tests Middlebury per instance: the switch must only
    # change the metrics, not rebuild (or re-initialise) the model.
    model = tiny_ccmp(lr=1e-3)
    fit(model, 3)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(trained[n], p) for n, p in tiny_ccmp().named_parameters())
    model.set_eval_protocol("handalx")
    assert all(torch.equal(trained[n], p) for n, p in model.named_parameters())
    samples = eval_samples(["exo-exo", "ego-exo"])
    ious = expected_ious(model.eval(), samples)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (results,) = trainer.test(model, DataLoader(samples, batch_size=2))
    assert ious[0] != ious[1]
    assert results["test/iou"] == pytest.approx(
        sum(ious) / 2, abs=1e-6
    )  # one instance (take0/cup), two pairs


def test_a_direction_without_visible_pairs_leaves_the_mean_iou_to_the_other():
    # exo-ego holds one invisible pair: its IoU is nan (no visible instance), its VA is a number; the
    # mean IoU over directions is then the ego-exo IoU, not nan (which would break checkpoint selection).
    samples = eval_samples(["ego-exo", "exo-ego"])
    samples[1]["visible"] = torch.tensor(0.0)
    model = tiny_ccmp().eval()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (results,) = trainer.validate(model, DataLoader(samples, batch_size=1))
    assert math.isnan(results["val/exo-ego/iou"]) and math.isfinite(results["val/exo-ego/va"])
    assert results["val/iou"] == pytest.approx(results["val/ego-exo/iou"])
    assert results["val/iou"] == pytest.approx(expected_ious(model, samples[:1])[0], abs=1e-6)
