"""FlowGRPO: on-policy ratio 1, fp32 under autocast, KL to the adapter-disabled reference, windows, SFT init, merge."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from callbacks.grpo import ROLLOUT_KEY
from lightning_modules.components import flow
from lightning_modules.flow_edit import FlowEdit
from lightning_modules.flow_grpo import FlowGRPO, adapters_disabled, ensure_init_checkpoint
from omnilab.seeding import torch_generator
from tests.lightning_modules.test_flow_edit import TINY

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
SIDE = 16  # 16 x 16 px images: 8 x 8 latents, 16 tokens


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def tokenizer_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNILAB_CACHE", str(tmp_path_factory.mktemp("omnilab-cache")))
        yield


def tiny_grpo(family: str = "sd3_kontext", guidance: float = 1.0, **overrides) -> FlowGRPO:
    """A tiny FlowGRPO (random init, LoRA r4), built; no CFG unless `guidance` > 1."""
    torch.manual_seed(0)
    args = {**TINY[family], "lora": LORA, "sampler": {"steps": 3, "guidance": guidance}, "lr": 1e-2}
    model = FlowGRPO(**{**args, **overrides})
    model.configure_model()
    return model


def prompt_batch(prompts=("a red image", "a red square"), tasks=None, refs=None) -> dict:
    """A batch of the multiref contract: prompts, optional refs, tasks, empty meta, SIDE x SIDE targets."""
    n = len(prompts)
    return {
        "refs": refs if refs is not None else [[] for _ in range(n)],
        "instruction": list(prompts),
        "task": list(tasks or ["t2i"] * n),
        "meta": [{} for _ in range(n)],
        "target": [torch.zeros(3, SIDE, SIDE) for _ in range(n)],
        "__key__": [f"k{i}" for i in range(n)],
    }


class _Repeat(Dataset):
    def __init__(self, batch: dict, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return copy.copy(self.batch)  # the callback adds a key to the batch dict


def prompt_loader(batch: dict | None = None, length: int = 1000) -> DataLoader:
    """A loader yielding (a shallow copy of) the same batch."""
    return DataLoader(_Repeat(batch or prompt_batch(), length), batch_size=None, collate_fn=lambda b: b)


def rollout(model: FlowGRPO, n: int = 4, steps: int = 3, train_steps=(0, 1, 2), **kw):
    """n trajectories of the prompt batch's first prompt (one group), with advantages +-1."""
    gens = [torch_generator(0, "test", k) for k in range(n)]
    out = model.sample_with_logprob(
        [[] for _ in range(n)],
        ["a red image"] * n,
        [(SIDE, SIDE)] * n,
        steps,
        None,
        list(train_steps),
        gens,
        **kw,
    )
    out.advantages = torch.tensor([1.0, -1.0] * (n // 2))
    return out


def test_first_update_ratio_is_exactly_one_on_policy_and_moves_after_a_step():
    for guidance in (1.0, 3.0):  # with and without CFG
        model = tiny_grpo(guidance=guidance).train()
        r = rollout(model)
        loss, stats = model.grpo_loss(r)
        assert stats["ratio_min"].item() == 1.0 and stats["ratio_max"].item() == 1.0
        assert stats["approx_kl"].item() == 0.0 and stats["clip_fraction"].item() == 0.0
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        loss.backward()
        optimizer.step()
        _, stats = model.grpo_loss(r)
        assert stats["ratio_min"].item() < 1.0 < stats["ratio_max"].item()  # re-scoring sees the new weights


@pytest.mark.parametrize("kind", ["cps", "dance"])
def test_other_sde_kinds_are_on_policy_too(kind):
    model = tiny_grpo(sde_kind=kind, noise_level=0.8 if kind == "cps" else 0.3).train()
    _, stats = model.grpo_loss(rollout(model))
    assert stats["ratio_min"].item() == 1.0 == stats["ratio_max"].item()


def test_loss_and_kl_are_fp32_under_bf16_autocast():
    model = tiny_grpo().train()
    seen = []
    model.backbone.register_forward_hook(lambda mod, args, out: seen.extend(v.dtype for v in out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = rollout(model)
        loss, stats = model.grpo_loss(r)
    assert seen and set(seen) == {torch.bfloat16}  # the DiT did run in bf16
    assert r.log_probs.dtype == torch.float32
    assert loss.dtype == torch.float32
    assert {v.dtype for v in stats.values()} == {torch.float32}
    loss.backward()


def test_kl_to_the_reference_is_zero_at_start_and_grows_after_updates():
    model = tiny_grpo(beta=0.04).train()
    r = rollout(model)
    x = [lat[0] for lat in r.latents]
    cond = model._batch_conditioning(r.conditioning)
    with torch.no_grad():
        before = model._velocity(x, cond, r.sigmas[:, 0], 1.0)
    loss, stats = model.grpo_loss(r)
    assert stats["kl"].item() == 0.0  # LoRA B = 0: the adapter-disabled network is the policy
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    kls = []
    for _ in range(3):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss, stats = model.grpo_loss(r)
        kls.append(stats["kl"].item())
    assert 0 < kls[0] < kls[-1]
    with torch.no_grad(), adapters_disabled(model.backbone):
        reference = model._velocity(x, cond, r.sigmas[:, 0], 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, reference))  # the reference itself never moved


def test_adapters_disabled_restores_requires_grad_and_needs_an_adapter():
    model = tiny_grpo()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with adapters_disabled(model.backbone):
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="no LoRA adapter"), adapters_disabled(torch.nn.Linear(2, 2)):
        pass


def test_window_stores_only_its_steps_and_runs_the_ode_before_it():
    model = tiny_grpo()
    steps, window = 6, [1, 2]
    r = rollout(model, steps=steps, train_steps=window, sde_steps=window)
    assert r.latents[0].shape[0] == 2 and r.next_latents[0].shape[0] == 2 and r.log_probs.shape == (4, 2)
    sigmas = model.sigmas(steps, [16])[0]
    shift = model.shift_for([16], model.sampler["shift"])
    assert torch.allclose(sigmas, flow.sigma_schedule(steps, shift, grid="sd3")[0])  # the SD3 pipeline's grid
    assert torch.allclose(r.sigmas[0], sigmas[1:3]) and torch.allclose(r.next_sigmas[0], sigmas[2:4])
    # step 0 is an Euler ODE step from the generator's initial noise
    x0 = torch.randn(16, SIDE // 2, SIDE // 2, generator=torch_generator(0, "test", 0))
    cond = model._batch_conditioning(r.conditioning[:1])
    with torch.no_grad():
        v0 = model._velocity([x0], cond, sigmas[:1], 1.0)[0]
    assert torch.allclose(r.latents[0][0], flow.euler_step(x0, v0, sigmas[0], sigmas[1]), atol=1e-6)
    with pytest.raises(ValueError, match="SDE steps"):
        rollout(model, steps=steps, train_steps=[3], sde_steps=window)


def test_group_members_share_one_text_encoding():
    model = tiny_grpo()
    calls = []
    encode = model.text_encoder.forward
    model.text_encoder.forward = lambda prompts, refs: calls.append(len(prompts)) or encode(prompts, refs)
    r = rollout(model, n=4)
    assert calls == [1]  # four trajectories of one prompt: encoded once
    assert r.conditioning[0]["hidden"].data_ptr() == r.conditioning[3]["hidden"].data_ptr()


def test_init_checkpoint_loads_the_sft_weights_into_the_base_before_lora(tmp_path):
    torch.manual_seed(1)
    sft = FlowEdit(**TINY["sd3_kontext"])
    sft.configure_model()
    with torch.no_grad():
        for p in sft.backbone.parameters():
            p.add_(0.5)
    path = tmp_path / "sft.ckpt"
    torch.save({"state_dict": sft.state_dict(), "optimizer_states": [{"x": 1}]}, path)
    model = tiny_grpo(init_checkpoint=str(path))
    base = model.state_dict()
    for name, value in sft.state_dict().items():
        key = (
            name
            if name in base
            else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        assert torch.equal(base[key], value), name
    assert any("lora_A" in n for n in base)
    _, stats = model.grpo_loss(rollout(model.train()))
    assert stats["kl"].item() == 0.0
    with pytest.raises(ValueError, match="does not match"):
        tiny_grpo("flux_kontext", init_checkpoint=str(path))


def test_a_missing_init_checkpoint_without_an_experiment_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="init_experiment"):
        ensure_init_checkpoint(tmp_path / "none.ckpt", None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ensure_init_checkpoint(tmp_path / "none.ckpt", "no_such/experiment")


def test_restart_adapter_merges_the_lora_and_starts_a_fresh_one():
    model = tiny_grpo().train()
    r = rollout(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model.grpo_loss(r)[0].backward()
        optimizer.step()
    x, cond = [lat[0] for lat in r.latents], model._batch_conditioning(r.conditioning)
    with torch.no_grad():
        trained = model._velocity(x, cond, r.sigmas[:, 0], 1.0)
        model.restart_adapter()
        merged = model._velocity(x, cond, r.sigmas[:, 0], 1.0)
        with adapters_disabled(model.backbone):
            reference = model._velocity(x, cond, r.sigmas[:, 0], 1.0)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(trained, merged))
    assert all(torch.equal(a, b) for a, b in zip(merged, reference))  # the reference is the merged model
    assert all(not p.any() for n, p in model.named_parameters() if "lora_B" in n)
    assert model.merged_adapters == 1 and not any(k.startswith("backbone.") for k in model._reloadable)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["flow_grpo"] == {"merged_adapters": 1}


def test_training_step_without_the_grpo_callback_is_a_clear_error():
    model = tiny_grpo()
    with pytest.raises(RuntimeError, match="GRPORollouts"):
        model.training_step(prompt_batch(), 0)
    skip = model.training_step({**prompt_batch(), ROLLOUT_KEY: None}, 0)  # a skip every rank agreed on
    assert skip.item() == 0.0 and skip.requires_grad  # a backward that reaches DDP's hooks on every rank


def test_lora_is_required_and_defaults_to_the_notes_config():
    model = FlowGRPO(**TINY["sd3_kontext"])
    assert model.lora["r"] == 32 and model.lora["lora_alpha"] == 64 and model.lr == 3e-4
    assert (model.beta, model.clip_range, model.noise_level) == (0.04, 1e-4, 0.7)
