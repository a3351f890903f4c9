"""UniPic 3.0's few-step distillation: the consistency and DMD math by hand, the teacher/student/critic set-up,
the consistency target against the teacher's own step, DMD's two time-scale updates and its skips, few-step
sampling."""

from __future__ import annotations

import contextlib
import copy
import math

import lightning as L
import pytest
import torch

from callbacks.ema import EMA
from lightning_modules.components.distill import (
    consistency_loss,
    dmd_gradient,
    dmd_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    jump,
    segment_end,
)
from lightning_modules.consistency import TrajectoryMapping
from lightning_modules.dmd import DMD
from lightning_modules.flow_edit import FlowEdit
from tests.lightning_modules.test_flow_edit import (  # noqa: F401
    QUIET,
    TINY,
    loader,
    make_batch,
    tiny,
    tokenizer_cache,
)

QWEN = TINY["qwen_image_edit"]
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}

# --- the math by hand -----------------------------------------------------------------------------------


def test_jump_moves_along_the_velocity_to_the_segment_end():
    # x + (s_end - sigma) v = 1 + (0.25 - 0.5) * 2 = 0.5; per-sample sigmas broadcast over each sample
    assert jump(torch.tensor([1.0]), torch.tensor([2.0]), 0.5, 0.25).item() == pytest.approx(0.5)
    out = jump(
        torch.ones(2, 1), torch.tensor([[2.0], [4.0]]), torch.tensor([0.5, 1.0]), torch.tensor([0.25, 0.5])
    )
    assert out.flatten().tolist() == pytest.approx([0.5, -1.0])


def test_consistency_loss_divides_each_error_by_its_jump_length_squared():
    # sample 1: ||[1,2] - 0||² = 5, gap 0.25 -> 5 / 0.0625 = 80; sample 2: (3 - 1)² = 4, gap 0.5 -> 16
    # Σ / Σ numel = 96 / 3 = 32
    pred = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    target = [torch.zeros(2), torch.tensor([1.0])]
    loss = consistency_loss(pred, target, torch.tensor([0.5, 1.0]), torch.tensor([0.25, 0.5]))
    assert loss.item() == pytest.approx(32.0)
    with pytest.raises(ValueError, match="zero length"):
        consistency_loss(pred, target, torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.25]))


def test_segment_end_is_the_next_grid_point_strictly_below():
    grid = torch.tensor([[1.0, 0.75, 0.5, 0.25, 0.0]] * 3)
    assert segment_end(grid, torch.tensor([0.6, 0.5, 1.0])).tolist() == [0.5, 0.25, 0.75]


def test_dmd_gradient_normalises_per_sample():
    # sample 1: |x - real| = [1, 1], mean 1 -> g = (fake - real) / 1 = [2, -2]
    # sample 2: |x - real| = [4, 4], mean 4 -> g = ([2, 2] - [0, 4]) / 4 = [0.5, -0.5]
    x = torch.tensor([[2.0, 0.0], [4.0, 0.0]])
    real = torch.tensor([[1.0, 1.0], [0.0, 4.0]])
    fake = torch.tensor([[3.0, -1.0], [2.0, 2.0]])
    assert dmd_gradient(x, real, fake).tolist() == [[2.0, -2.0], [0.5, -0.5]]


def test_dmd_loss_value_and_gradient():
    # L = ½ mean (x - sg(x - g))² = ½ mean g² = ½ (4 + 4) / 2 = 2; dL/dx = g / numel = [1, -1]
    x = torch.tensor([2.0, 0.0], requires_grad=True)
    loss = dmd_loss(x, torch.tensor([2.0, -2.0]))
    loss.backward()
    assert loss.item() == pytest.approx(2.0)
    assert x.grad.tolist() == pytest.approx([1.0, -1.0])


def test_gan_losses_are_the_non_saturating_ones():
    # l_fake = [0, ln 3], l_real = [ln 3, 0]; softplus(0) = ln 2, softplus(ln 3) = ln 4, softplus(-ln 3) = ln 4/3
    # L_G = (ln 2 + ln 4/3) / 2 = ln(8/3) / 2; L_D = (ln 2 + ln 4) / 2 + (ln 4/3 + ln 2) / 2 = ln(64/3) / 2
    fake, real = torch.tensor([0.0, math.log(3)]), torch.tensor([math.log(3), 0.0])
    assert gan_generator_loss(fake).item() == pytest.approx(math.log(8 / 3) / 2)
    assert gan_discriminator_loss(fake, real).item() == pytest.approx(math.log(64 / 3) / 2)


# --- building ---------------------------------------------------------------------------------------------


def build(cls=TrajectoryMapping, **kwargs):
    torch.manual_seed(0)
    model = cls(**{**QWEN, "student_steps": [2], "teacher_steps": 4, "teacher_guidance": 2.0, **kwargs})
    model.configure_model()
    return model


def teacher_checkpoint(tmp_path, **backbone) -> str:
    """A FlowEdit (teacher) checkpoint with an EMA callback state, as a teacher run writes it."""
    torch.manual_seed(1)
    spec = {**QWEN["backbone"], "config": {**QWEN["backbone"]["config"], **backbone}}
    teacher = FlowEdit(**{**QWEN, "backbone": spec})
    teacher.configure_model()
    state = teacher.state_dict()
    ema = {k: v + 1.0 for k, v in state.items() if k.startswith("backbone.")}  # distinguishable from raw
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": state, "callbacks": {"EMA": {"ema": ema, "num_updates": 3}}}, path)
    return str(path)


def test_student_and_teacher_start_from_the_teachers_ema_and_only_the_student_trains(tmp_path):
    path = teacher_checkpoint(tmp_path)
    model = build(init_checkpoint=path)
    ema = torch.load(path, weights_only=True)["callbacks"]["EMA"]["ema"]
    for name, p in model.backbone.named_parameters():
        assert torch.equal(p, ema[f"backbone.{name}"]) and p.requires_grad
    for name, p in model.teacher.named_parameters():
        assert torch.equal(p, ema[f"backbone.{name}"]) and not p.requires_grad
    assert not model.teacher.training and not model.train().teacher.training


def test_a_teacher_checkpoint_of_another_architecture_is_refused_by_name(tmp_path):
    path = teacher_checkpoint(tmp_path, num_layers=2)
    with pytest.raises(ValueError, match=r"does not match the student's backbone config.*unexpected"):
        build(init_checkpoint=path)
    other = {**QWEN["backbone"], "config": {**QWEN["backbone"]["config"], "attention_head_dim": 4}}
    with pytest.raises(ValueError, match=r"teacher's config differs.*attention_head_dim"):
        build(teacher=other)


def test_a_teacher_checkpoint_without_a_backbone_diverged_or_sharded_is_refused_by_name(tmp_path):
    path = teacher_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    torch.save({"state_dict": {"codec.x": torch.zeros(1)}}, tmp_path / "vae_only.ckpt")
    with pytest.raises(ValueError, match=r"vae_only.ckpt holds no `backbone.\*` weights"):
        build(init_checkpoint=str(tmp_path / "vae_only.ckpt"), init_ema=False)
    name = next(k for k in ckpt["callbacks"]["EMA"]["ema"] if k.endswith("weight"))
    ckpt["callbacks"]["EMA"]["ema"][name][0] = float("nan")  # the teacher's run diverged
    torch.save(ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match=rf"nan.ckpt has non-finite.*{name[len('backbone.') :]}"):
        build(init_checkpoint=str(tmp_path / "nan.ckpt"))
    (tmp_path / "sharded.ckpt").mkdir()
    with pytest.raises(ValueError, match="sharded checkpoint folder"):
        build(init_student=str(tmp_path / "sharded.ckpt"))


def test_a_non_finite_consistency_loss_is_a_counted_skip_that_stops_the_run(monkeypatch):
    # a teacher gone NaN: RunHealth (on in every omnilab run) drops the step on all ranks, counts it, then stops
    from callbacks.health import NonFiniteStepError, RunHealth

    model = build(student_steps=[2], teacher_steps=4, teacher_guidance=1.0, target="student")
    monkeypatch.setattr(
        model.teacher, "forward", lambda x, *a, **k: [torch.full_like(xi, float("nan")) for xi in x]
    )
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    health = RunHealth(max_consecutive_skips=2)
    with pytest.raises(NonFiniteStepError, match="2 optimizer steps in a row"):
        L.Trainer(**QUIET, max_steps=3, callbacks=[health]).fit(model, loader(make_batch(2), repeats=3))
    assert health.skipped == 2
    assert not moved(before, dict(model.backbone.named_parameters()))


def test_the_student_samples_at_8_4_2_and_1_steps_on_its_training_grid():
    model = build()
    batch = make_batch(2)
    calls = []
    model.backbone.register_forward_hook(lambda module, args, out: calls.append(args[2].clone()))
    for steps in (8, 4, 2, 1):
        calls.clear()
        images = model.sample(batch["refs"], batch["instruction"], size=[(32, 32), (32, 48)], steps=steps)
        assert [tuple(i.shape) for i in images] == [(3, 32, 32), (3, 32, 48)]
        # one student pass per step (no CFG branch), at the grid's sigmas
        grid = model.student_grid(steps, [64, 96])
        assert len(calls) == steps and torch.equal(torch.stack(calls, 1), grid[:, :-1])
        assert torch.equal(model.student_grid(steps, [64, 96]), model.sigmas(steps, [64, 96]))
    assert model.sampler["guidance"] == 1.0 and model.sampler["steps"] == 8  # the student: 8 steps, no CFG


@pytest.mark.parametrize(
    "family",
    [
        "qwen_image_edit",
        pytest.param("sd3_kontext", marks=pytest.mark.slow),
        pytest.param("flux_kontext", marks=pytest.mark.slow),
    ],
)
def test_the_sampler_projects_each_text_once_per_call_with_the_same_images(family, monkeypatch):
    # the per-step overhead removed for the 12x goal: the text stream's input projection (and the conditioning's
    # device copy) once per conditioning and call, not per step; the images are bit-identical to per-step calls
    model = tiny(family)
    m = model.backbone.model
    projection = m.txt_in if family == "qwen_image_edit" else m.context_embedder
    calls = []
    projection.register_forward_hook(lambda *args: calls.append(1))
    batch = make_batch(2)

    def images():
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return model.sample(batch["refs"], batch["instruction"], size=(32, 32), steps=3, generator=gens)

    cached = images()
    assert len(calls) == 2  # CFG: the prompt's and the negative prompt's, each once over 3 steps
    calls.clear()
    monkeypatch.setattr(type(model.backbone), "reuse_condition", lambda self: contextlib.nullcontext())
    per_step = images()
    assert len(calls) == 6
    assert all(torch.equal(a, b) for a, b in zip(cached, per_step))
    assert model.backbone._condition_cache is None  # nothing is kept past the call


# --- the consistency target -------------------------------------------------------------------------------


def consistency_loss_of(model, batch) -> float:
    trainer = L.Trainer(**QUIET, max_steps=1)
    model.trainer = trainer
    model.log = lambda *args, **kwargs: None  # training_step called outside the loop
    with torch.no_grad():
        return float(model.training_step(batch, 0))


@pytest.mark.parametrize("guidance,zero", [(1.0, True), (2.0, False)])
def test_on_the_teachers_own_grid_the_target_is_the_teachers_step(guidance, zero):
    # student grid = teacher grid: every teacher step ends its segment, so the target is the teacher's own Euler
    # step; a student equal to the teacher matches it exactly without CFG and misses it with CFG
    model = build(student_steps=[4], teacher_steps=4, teacher_guidance=guidance)
    loss = consistency_loss_of(model, make_batch(2))
    assert (loss == pytest.approx(0.0, abs=1e-10)) is zero and loss >= 0


def test_off_the_grid_the_target_is_the_ema_students_jump():
    # 8 teacher steps, 2 student steps: a point not one step from its segment end takes the EMA student's jump,
    # so moving the EMA away from the student changes the target (hence the loss); the swap is undone after
    model = build(student_steps=[2], teacher_steps=8, teacher_guidance=1.0)
    batch = make_batch(3)
    trainer = L.Trainer(**QUIET, max_steps=1, callbacks=[EMA(decay=0.5)])
    model.trainer = trainer
    model.log = lambda *args, **kwargs: None
    ema = trainer.callbacks[[isinstance(c, EMA) for c in trainer.callbacks].index(True)]
    with torch.no_grad():
        same = float(model.training_step(batch, 0))
        ema.ema = {n: p.detach() + 0.1 for n, p in model.named_parameters() if p.requires_grad}
        moved = float(model.training_step(batch, 0))
    assert abs(moved - same) > 1e-6
    assert all(torch.equal(p, q) for p, q in zip(model.backbone.parameters(), model.teacher.parameters()))


def test_a_tiny_fit_logs_finite_fid_and_kid_of_the_students_samples_with_the_named_extractor(tmp_path):
    from safetensors.torch import save_file

    from metrics.distribution import TinyEncoder

    encoder = TinyEncoder()
    save_file(encoder.state_dict(), str(tmp_path / "encoder.safetensors"))
    val_fid = {"weights_path": str(tmp_path / "encoder.safetensors"), "kid_subset_size": 50}
    model = build(student_steps=[2], teacher_steps=4, target="student", val_sample_steps=2, val_fid=val_fid)
    trainer = L.Trainer(**QUIET, max_steps=1, limit_val_batches=2)
    trainer.fit(model, loader(make_batch(3)), loader(make_batch(3, seed=1), repeats=2))
    metrics = trainer.callback_metrics
    for key in ("val/fid", "val/kid", "val/kid_std", "val/pixel_mse"):
        assert math.isfinite(float(metrics[key])), key
    # both validation batches entered (batch 0's samples reused, batch 1's drawn); KID's subset capped at 6
    extractor = model.scores().fid.inception
    assert model.scores().kid.subset_size == 6
    assert all(
        torch.equal(a, b) for a, b in zip(extractor.state_dict().values(), encoder.state_dict().values())
    )
    assert not any("inception" in k or "scores" in k for k in model.state_dict())  # not a submodule
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors"):
        build(val_fid={"weights_path": "nowhere.safetensors"}).scores()
    with pytest.raises(ValueError, match=r"val_fid: unknown keys \['extractor'\]"):
        build(val_fid={"extractor": "tiny"})
    assert build(val_fid={"batches": 0}).scores() is None


def test_the_fid_encoder_trains_on_the_training_targets_and_is_written_once(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "fid" / "encoder.safetensors"
    model = build(val_fid={"weights_path": str(path), "fit_steps": 2, "fit_images": 4})
    assert math.isfinite(model.fit_fid_encoder(loader(make_batch(3), repeats=2)))
    trained = model.scores().fid.inception.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in load_file(str(path)).items())
    assert model.fit_fid_encoder(loader(make_batch(3))) is None  # its file exists now: loaded, not refitted
    assert (
        build(val_fid={"fit_steps": 0}).fit_fid_encoder(loader(make_batch(3))) is None
    )  # seeded random init


# --- DMD ------------------------------------------------------------------------------------------------------


class Recorder(L.Callback):
    """The student's and the critic's weights after each step."""

    def __init__(self) -> None:
        self.steps: list[tuple[dict, dict]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        student = {n: p.detach().clone() for n, p in pl_module.backbone.named_parameters()}
        critic = {id(p): p.detach().clone() for p in pl_module.critic_parameters()}
        self.steps.append((student, critic))


def moved(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full_critic", "lora_critic"])
def test_dmd_updates_the_critic_every_step_and_the_student_every_kth(lora):
    model = build(DMD, critic_updates=2, critic_lora=lora, student_steps=[2, 1], lr=1e-2, critic_lr=1e-2)
    if lora:
        assert model.critic is None and all(
            "lora_" in n for n, p in model.teacher.named_parameters() if p.requires_grad
        )
    else:
        assert not any(p.requires_grad for p in model.teacher.parameters())
    start = (
        {n: p.detach().clone() for n, p in model.backbone.named_parameters()},
        {id(p): p.detach().clone() for p in model.critic_parameters()},
    )
    recorder = Recorder()
    trainer = L.Trainer(**QUIET, max_steps=2, callbacks=[recorder])
    trainer.fit(model, loader(make_batch(2), repeats=2))
    states = [start, *recorder.steps]
    assert trainer.global_step == 2
    # step 0 updates the student, step 1 does not; the critic moves at every step
    assert [moved(states[i][0], states[i + 1][0]) for i in range(2)] == [True, False]
    assert all(moved(states[i][1], states[i + 1][1]) for i in range(2))
    assert model.skips == 0


def test_the_lora_critics_teacher_is_the_network_without_the_adapter():
    model = build(DMD, critic_lora=LORA)
    with torch.no_grad():
        for name, p in model.teacher.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter (B starts at zero)
    batch = make_batch(1)
    refs, x0, text, _ = model.condition(batch)
    sigma = torch.tensor([0.5])
    plain = copy.deepcopy(model.teacher)
    from lightning_modules.flow_grpo import adapters_disabled

    with torch.no_grad():
        with adapters_disabled(plain.model):
            want = plain(x0, refs, sigma, text)
        with model.real_score() as real:
            got = real(x0, refs, sigma, text)
        fake = model.fake_score(x0, refs, sigma, text)
    assert all(torch.allclose(a, b) for a, b in zip(got, want))
    assert not all(torch.allclose(a, b) for a, b in zip(fake, want))  # the adapter is on for the critic


def test_a_diverging_critic_is_skipped_counted_then_stops_the_run(monkeypatch):
    model = build(DMD, critic_updates=1, max_consecutive_skips=2)
    weight = next(model.critic.parameters())
    monkeypatch.setattr(
        model.critic,
        "forward",
        lambda x, *a, **k: [torch.full_like(xi, float("nan")) + 0 * weight.sum() for xi in x],
    )
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    trainer = L.Trainer(**QUIET, max_steps=3)
    with pytest.raises(RuntimeError, match=r"2 updates in a row.*non-finite.*critic diverged"):
        trainer.fit(model, loader(make_batch(2), repeats=3))
    assert model.skips == 4  # two steps, each a non-finite DMD gradient and a non-finite critic loss
    assert not moved(before, dict(model.backbone.named_parameters()))  # no garbage update reached the student


def test_gan_settings_are_checked_and_default_to_dmd2s_weights():
    with pytest.raises(ValueError, match=r"DMD.gan: unknown keys \['weight'\]"):
        DMD(**QWEN, gan={"weight": 5e-3})
    with pytest.raises(ValueError, match="critic_updates"):
        DMD(**QWEN, critic_updates=0)
    with pytest.raises(ValueError, match=r"gan.layer=5: the DiT has 1 transformer blocks"):
        build(DMD, gan={"layer": 5})
    model = DMD(**QWEN, gan={})
    assert (model.gan["generator_weight"], model.gan["critic_weight"]) == (5e-3, 1e-2)
    assert DMD(**QWEN).gan is None and DMD(**QWEN).gan_head is None  # off by default


def gradients(model, batch):
    """The student's and the critic's (with the head's) gradients of one DMD training step at step 0."""
    model.trainer = L.Trainer(**QUIET, max_steps=1)
    model.log = lambda *args, **kwargs: None
    model.train().training_step(batch, 0).backward()
    grad = lambda p: torch.zeros_like(p) if p.grad is None else p.grad.clone()  # noqa: E731
    return [grad(p) for p in model.student_parameters()], [grad(p) for p in model.critic_parameters()]


def test_the_gan_generator_loss_reaches_the_student_only():
    # DMD2 zeroes the critic's gradients of the generator's GAN loss; here one backward subtracts the same loss
    # of the detached fakes: the critic's and the head's gradients equal those without the generator term,
    # the student's differ
    batch = make_batch(2)
    with_g = gradients(build(DMD, critic_updates=1, gan={"generator_weight": 1.0}), batch)
    without = gradients(build(DMD, critic_updates=1, gan={"generator_weight": 0.0}), batch)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-8) for a, b in zip(with_g[1], without[1]))
    assert any(a.abs().sum() > 0 for a in with_g[1][-4:])  # the head trains (on the critic's loss)
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(with_g[0], without[0]))


@pytest.mark.parametrize(
    "lora", [None, pytest.param(LORA, marks=pytest.mark.slow)], ids=["full_critic", "lora_critic"]
)
def test_a_tiny_dmd_fit_with_the_gan_head(lora):
    model = build(DMD, critic_updates=2, critic_lora=lora, lr=1e-2, critic_lr=1e-2, gan={})
    head = {n: p.detach().clone() for n, p in model.gan_head.named_parameters()}
    student = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    trainer = L.Trainer(**QUIET, max_steps=2)
    trainer.fit(model, loader(make_batch(2), repeats=2))
    metrics = trainer.callback_metrics
    for key in ("train/gan_critic_loss", "train/gan_generator_loss", "train/dmd_loss", "train/critic_loss"):
        assert math.isfinite(float(metrics[key])), key
    assert moved(head, dict(model.gan_head.named_parameters()))
    assert moved(student, dict(model.backbone.named_parameters()))
    assert model.skips == 0 and {g["name"] for g in trainer.optimizers[0].param_groups} == {
        "student",
        "critic",
    }


def test_the_student_decodes_with_its_teachers_fitted_vae(tmp_path):
    from lightning_modules.consistency import load_codec_weights

    teacher_vae, student_vae = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    state = {f"codec.{k}": v for k, v in teacher_vae.state_dict().items()}
    torch.save({"state_dict": {**state, "backbone.x": torch.zeros(1)}}, tmp_path / "fitted.ckpt")
    torch.save({"state_dict": {"backbone.x": torch.zeros(1)}}, tmp_path / "pretrained_vae.ckpt")
    assert not load_codec_weights(student_vae, tmp_path / "pretrained_vae.ckpt")
    assert not torch.equal(student_vae.weight, teacher_vae.weight)
    assert load_codec_weights(student_vae, tmp_path / "fitted.ckpt")
    assert torch.equal(student_vae.weight, teacher_vae.weight)
