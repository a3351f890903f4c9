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
    "pure_sampling": "PURE: entropy top-k vs fixed top-k cost per token, KV cache vs none, tokens/s vs weights roofline",
    "pure_replication": "PURE mini-replication: entropy vs fixed top-k vs greedy; perceive-understand-restore vs restore-only",
}
