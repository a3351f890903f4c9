"""Flow-GRPO cost on CPU: rollout images/s, rollout vs update share, a 2-step window vs all steps, reference memory.

Measures (docs/methods/flow_grpo.md; docs/architecture.md):
- rollout images/s of `FlowGRPO.sample_with_logprob` (SDE with log-probs) at T steps, and the share of a GRPO
  iteration (rollout of N trajectories + the update over their trained steps) spent in the rollout;
- Flow-GRPO-Fast: a 2-step high-noise window (SDE + training on 2 steps, ODE elsewhere) vs training all T steps:
  images/s of a whole iteration and the ratio (the README reports about 2.5x on GPUs);
- memory of the KL reference: the LoRA policy with the adapter disabled (this suite) vs a separate frozen copy
  of the backbone: parameter + AdamW state bytes (counted), and the bytes saved for backward by one update
  (measured with torch.autograd.graph.saved_tensors_hooks; the reference pass runs without grad either way).
The model is a small random-init SD3 DiT (the tiny_flow_sd3 family, 4 layers, width 64) at 32 x 32 px.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks.common import interleaved, record
from callbacks.grpo import Rollout
from lightning_modules.flow_grpo import FlowGRPO
from omnilab.seeding import torch_generator

SD3 = {
    "backbone": {
        "family": "sd3_kontext",
        "config": {
            "sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 4,
            "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32,
            "caption_projection_dim": 64, "pooled_projection_dim": 32, "pos_embed_max_size": 32,
        },
    },
    "vae": {
        "config": {
            "block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 16, "norm_num_groups": 8,
            "layers_per_block": 1,
        }
    },
    "text": {
        "config": {
            "clip": [{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "projection_dim": 32, "max_position_embeddings": 77}],
            "t5": {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 1, "num_heads": 2},
        },
        "tokenizer": {"clip": {"model_max_length": 32}, "t5": {}},
        "max_sequence_length": 32,
    },
}  # fmt: skip
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def build(beta: float = 0.04) -> FlowGRPO:
    """The benchmark's FlowGRPO (random init), built, in train mode."""
    torch.manual_seed(0)
    model = FlowGRPO(**SD3, lora=LORA, sampler={"guidance": 1.0, "shift": 3.0}, beta=beta)
    model.configure_model()
    return model.train()


def rollout(
    model: FlowGRPO, n: int, steps: int, train_steps: list[int], sde_steps: list[int] | None, size: int
) -> Rollout:
    """n trajectories of distinct prompts, advantages +-1."""
    gens = [torch_generator(0, "bench", k) for k in range(n)]
    prompts = [f"a red star at the top left, {k}" for k in range(n)]
    out = model.sample_with_logprob([[] for _ in range(n)], prompts, [(size, size)] * n, steps, None, train_steps, gens, sde_steps=sde_steps)  # fmt: skip
    out.advantages = torch.tensor([1.0, -1.0] * (n // 2) + [0.0] * (n % 2))
    return out


def iteration(
    model: FlowGRPO, optimizer: torch.optim.Optimizer, n: int, steps: int, window: bool, size: int
) -> tuple[float, float]:
    """(rollout seconds, update seconds) of one GRPO iteration: all T steps trained, or a 2-step window."""
    train = [1, 2] if window else list(range(steps))
    start = time.perf_counter()
    r = rollout(model, n, steps, train, train if window else None, size)
    mid = time.perf_counter()
    optimizer.zero_grad()
    loss, _ = model.grpo_loss(r)
    loss.backward()
    optimizer.step()
    return mid - start, time.perf_counter() - mid


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while `fn` runs (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main(argv: list[str] | None = None) -> None:
    """Time the rollout and the update, the window vs all steps, and count the reference's memory."""
    parser = argparse.ArgumentParser(prog="omnilab bench grpo_throughput")
    parser.add_argument("--trajectories", type=int, default=8, help="trajectories per iteration (one chunk)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps T (Flow-GRPO: 10)")
    parser.add_argument("--size", type=int, default=32, help="image side in px")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: tiny models run best on one)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, steps, size = args.trajectories, args.steps, args.size
    model = build()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    iteration(model, optimizer, n, steps, False, size)  # warm-up
    parts: dict[str, list[tuple[float, float]]] = {"all": [], "window": []}
    interleaved(
        {
            "all": lambda: parts["all"].append(iteration(model, optimizer, n, steps, False, size)) or 0.0,
            "window": lambda: (
                parts["window"].append(iteration(model, optimizer, n, steps, True, size)) or 0.0
            ),
        },
        args.repeats,
    )
    med = {
        k: (statistics.median(r for r, _ in v), statistics.median(u for _, u in v)) for k, v in parts.items()
    }
    ips = {k: n / (r + u) for k, (r, u) in med.items()}

    # memory: the adapter-disabled reference vs a separate frozen copy of the backbone
    def nbytes(params) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    trainable = [p for p in model.parameters() if p.requires_grad]
    base_backbone = nbytes(p for n_, p in model.backbone.named_parameters() if "lora_" not in n_)
    all_params = nbytes(model.parameters())
    adam = 2 * sum(p.numel() * 4 for p in trainable)  # exp_avg and exp_avg_sq in fp32
    r = rollout(model, n, steps, list(range(steps)), None, size)
    lora_saved = saved_bytes(lambda: model.grpo_loss(r)[0])
    frozen = copy.deepcopy(model.backbone).requires_grad_(False)
    policy_only = saved_bytes(lambda: _loss_with_copy(model, frozen, r))
    rows = [
        {
            "quantity": f"rollout images/s (T={steps}, SDE all steps, {n} per chunk)",
            "value": n / med["all"][0],
        },
        {"quantity": "GRPO iteration images/s, all steps trained", "value": ips["all"]},
        {
            "quantity": "rollout share of the iteration, all steps trained",
            "value": med["all"][0] / sum(med["all"]),
        },
        {"quantity": "GRPO iteration images/s, 2-step window trained", "value": ips["window"]},
        {
            "quantity": "rollout share of the iteration, 2-step window",
            "value": med["window"][0] / sum(med["window"]),
        },
        {"quantity": "speed-up window / all steps (published ~2.5x)", "value": ips["window"] / ips["all"]},
        {
            "quantity": "parameters, LoRA policy + disabled-adapter reference (MiB)",
            "value": all_params / 2**20,
        },
        {
            "quantity": "parameters, + separate frozen reference copy (MiB)",
            "value": (all_params + base_backbone) / 2**20,
        },
        {"quantity": "AdamW state, LoRA only (MiB)", "value": adam / 2**20},
        {
            "quantity": "saved activations of one update, adapter-disabled reference (MiB)",
            "value": lora_saved / 2**20,
        },
        {
            "quantity": "saved activations of one update, frozen-copy reference (MiB)",
            "value": policy_only / 2**20,
        },
    ]
    notes = (
        f"Random-init SD3 DiT (4 layers, width 64), {size}x{size} px, {n} trajectories of {steps} steps per iteration, "
        f"no CFG, LoRA r8; medians of {args.repeats} interleaved iterations. The window run is Flow-GRPO-Fast's: ODE "
        "outside the 2 window steps, so its rollout costs the same and the saving is all in the update (T vs 2 "
        "re-scored steps). Memory is counted on CPU (parameter and optimizer-state bytes) and measured for saved "
        "activations (saved_tensors_hooks, each storage once): the reference pass runs under no_grad in both "
        "variants, so the adapter-disabled reference saves exactly the frozen copy's parameter bytes and nothing else."
    )
    metrics = {
        "window_speedup": ips["window"] / ips["all"],
        "rollout_share_all": med["all"][0] / sum(med["all"]),
    }
    record("grpo_throughput", "Flow-GRPO throughput and reference memory (CPU)", rows, notes, metrics)


def _loss_with_copy(model: FlowGRPO, frozen: torch.nn.Module, r: Rollout) -> torch.Tensor:
    """grpo_loss with the reference velocity from a separate frozen copy (for the memory comparison)."""
    live = model.backbone
    calls = {"n": 0}

    def reference_from_copy(*args, **kwargs):
        calls["n"] += 1
        return (
            frozen(*args, **kwargs)
            if not torch.is_grad_enabled()
            else live.__class__.forward(live, *args, **kwargs)
        )

    model.backbone.forward = reference_from_copy  # the no-grad (reference) passes go to the copy
    try:
        return model.grpo_loss(r)[0]
    finally:
        del model.backbone.forward


if __name__ == "__main__":
    main()
