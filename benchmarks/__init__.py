"""Speed/memory benchmarks and mini-replications: `omnilab bench [name ...]` (`make bench` runs all).

Each module has `main(argv)`; it measures ratios against a baseline in the same run and writes its
section of benchmarks/RESULTS.md (with the command and the date) and an MLflow run in the
`benchmarks` experiment.
"""

BENCHMARKS: dict[str, str] = {
    "loader": "WebDataset shards vs a plain Dataset over the same loose files: samples/s ratio",
    "lightning_overhead": "Lightning fit loop vs a plain PyTorch loop on the same tiny DiT: step-time overhead",
    "ccmp_ttt": "CCMP test-time training: wall time per pair vs plain inference; memory of last-K vs all blocks",
    "ccmp_replication": "CCMP mini-replication: seg only / + cycle / + TTT on held-out synthetic and Middlebury pairs",
    "self_packing": "SELF packing vs naive padding to the longest: padding fraction and training tokens/s",
    "sampler_vs_pipeline": "FlowEdit.sample vs the diffusers Qwen-Image-Edit-Plus denoising loop: time per image",
    "uniref_replication": "UniRef mini-replication: progressive vs full pixel budget; composition PSNR at 1/3/6 refs",
    "grpo_throughput": "Flow-GRPO: rollout images/s, rollout vs update share, 2-step window vs all steps, reference memory",
    "grpo_replication": "Flow-GRPO / MSGRPO / PDTR mini-replication: reward rise, per-reference rules, stage order",
    "judge_throughput": "Judge calls/s with N concurrent requests vs sequential on a local server; cached rerun calls",
    "mico_judge_replication": "VIEScore vs Weighted-Ref-VIEScore with a small trained local judge: rank agreement with exact quality",
    "fsdp_memory": "FSDP per block vs one unit on 2 CPU processes: peak memory per process, as ratios",
    "gpu": "the packed DiTs at full size on one GPU: step time, peak memory, tokens/s, MFU; attention paths",
    "reward_replication": "JRM mini-replication: held-out pairwise accuracy of BT only vs JRM at several lambdas",
    "spatialreward_replication": "SpatialReward mini-replication: verdicts with vs without edit-region boxes",
    "reward_rl_replication": "GRPO on the tiny editing policy with BT, JRM and SpatialReward rewards: held-out redness",
    "reward_throughput": "Reward models: head vs generative verdict pairs/s, MC-BT vs BT step, served vs in-process",
    "pure_sampling": "PURE: entropy top-k vs fixed top-k cost per token, KV cache vs none, tokens/s vs weights roofline",
    "distill_speed": "UniPic 3.0: 8-step student vs 50-step true-CFG teacher sampling (NFE, wall-clock); DMD critic vs student step",
    "pure_replication": "PURE mini-replication: entropy vs fixed top-k vs greedy; perceive-understand-restore vs restore-only",
    "latent_cache": "FlowEdit training step on cached latents and text states vs on the images: step-time ratio",
}
NEEDS_CUDA = {"gpu"}  # `omnilab bench` without names skips these where CUDA is missing
