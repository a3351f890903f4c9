"""`omnilab test` benchmarks: MICo-Bench from saved outputs with a real local judge server; any editing checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lightning_modules.edit_bench import EditBench, build_editor, experiment_model
from omnilab.chat import message_parts
from omnilab.cli import main
from tests.chat_server import ChatServer, Reply
from tests.datamodules.test_bench import write_mico_bench

REPO = Path(__file__).resolve().parents[2]
BASE = str(REPO / "experiments" / "_base" / "default.yaml")


def judge_script(body, n):
    texts, _ = message_parts(body["messages"][0])
    if texts[0].startswith("Given two images"):
        return Reply("yes")
    if "the refined prompt" in texts[0]:
        return Reply("I cannot tell.")  # De&Re's SC answer does not parse
    if texts[0].startswith("You are a professional"):
        return Reply('{"score": [9, 6], "reasoning": "close"}')
    return Reply("[8, 7]")


def bench_config(tmp_path, base_url):
    config = {
        "model": {
            "class_path": "lightning_modules.edit_bench.EditBench",
            "init_args": {
                "metric": "weighted_ref",
                "weight": "vlm",
                "outputs_dir": str(tmp_path / "outputs"),
                "judge": {"class_path": "omnilab.chat.ChatClient",
                          "init_args": {"base_url": base_url, "model": "judge", "retries": 0,
                                        "cache_dir": str(tmp_path / "cache")}},
                "max_side": 64,
                "grid_k": 2,
            },
        },
        "data": {"class_path": "datamodules.bench.EditBenchDataModule",
                 "init_args": {"benchmark": "mico", "data_dir": str(tmp_path / "MICo-Bench"), "batch_size": 2}},
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False},
    }  # fmt: skip
    path = tmp_path / "experiments" / "mico" / "bench.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_mico_bench_scores_records_failures_and_a_rerun_asks_the_judge_nothing(tmp_path):
    write_mico_bench(tmp_path / "MICo-Bench")
    for rel in ("mico_bench_hoi/0.png", "mico_bench_hoi/1.png", "mico_bench_dere/2.png"):
        (tmp_path / "outputs" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 24, 3), 120, np.uint8)).save(tmp_path / "outputs" / rel)
    with ChatServer(judge_script) as server:
        config = bench_config(tmp_path, server.base_url)
        main(["test", "--config", BASE, "--config", config])
        calls = server.count
        summary = json.loads((tmp_path / "runs/mico/bench/latest/bench/summary.json").read_text())
        main(["test", "--config", BASE, "--config", config])
        assert server.count == calls  # every answer came from the cache
    # hoi/0: W = 1 (two yes), SC = sqrt(9 * 6), PQ = sqrt(8 * 7): final = sqrt(3024) = 54.99
    task = summary["partitions"]["task"]
    assert task["mico_bench_hoi/final"] == pytest.approx(math.sqrt(3024))
    assert task["cases/final"] == pytest.approx(math.sqrt(3024)) and task["count"] == 1
    assert (task["status/ok"], task["status/missing_image"], task["status/not_json"]) == (1, 1, 1)
    assert summary["partitions"]["category"]["human_object/final"] == pytest.approx(math.sqrt(3024))
    assert summary["version"] == "v3" and summary["judge"] == "judge"
    case = json.loads((tmp_path / "runs/mico/bench/latest/bench/cases/mico_bench_dere/2.json").read_text())
    assert case["status"] == "not_json" and case["answers"]["sc"] == "I cannot tell." and "final" not in case
    assert (tmp_path / "runs/mico/bench/latest/bench/grids/mico_bench_hoi.png").is_file()
    assert "| mico_bench_hoi | 1 |" in (tmp_path / "runs/mico/bench/latest/bench/summary.md").read_text()


def test_a_checkpoint_brings_its_own_editor_and_weights(tmp_path):
    spec = experiment_model("unipic2/kontext_tiny")
    editor = build_editor(spec)
    with torch.no_grad():
        next(editor.backbone.parameters()).add_(0.5)  # weights that differ from a fresh random init
    hparams = {**editor.hparams, "_class_path": spec["class_path"]}
    checkpoint = {"state_dict": editor.state_dict(), "hyper_parameters": hparams}
    bench = EditBench(editor="mico/tiny")  # a configured editor of another family: the checkpoint wins
    bench.configure_model()
    bench.on_load_checkpoint(checkpoint)
    bench.load_state_dict(checkpoint["state_dict"])
    assert type(bench.editor).__name__ == "FlowEdit" and bench.editor.family == "sd3_kontext"
    for key, value in editor.state_dict().items():
        assert torch.equal(bench.editor.state_dict()[key], value), key
    with pytest.raises(ValueError, match="_class_path"):
        EditBench().on_load_checkpoint({"state_dict": {"backbone.x": torch.zeros(1)}, "hyper_parameters": {}})


@pytest.mark.slow
def test_make_eval_with_ckpt_path_benchmarks_that_checkpoint(tmp_path):
    spec = experiment_model("unipic2/kontext_tiny")
    editor = build_editor(spec)
    hparams = {**editor.hparams, "_class_path": spec["class_path"]}
    import lightning

    checkpoint = {"state_dict": editor.state_dict(), "hyper_parameters": hparams}
    torch.save({**checkpoint, "pytorch-lightning_version": lightning.__version__}, tmp_path / "edit.ckpt")

    def script(body, n):  # SC (two images) [5, 6] -> 5; PQ (one image) [8, 9] -> 8
        two = len(message_parts(body["messages"][0])[1]) == 2
        return Reply('{"score": [5, 6], "reasoning": ""}' if two else '{"score": [8, 9], "reasoning": ""}')

    with ChatServer(script) as server:
        main(
            ["test", "--config", BASE, "--config", str(REPO / "experiments/gedit/tiny.yaml"),
             "--ckpt_path", str(tmp_path / "edit.ckpt"), "--model.init_args.init_checkpoint=null",
             "--model.init_args.judge=omnilab.chat.ChatClient", f"--model.init_args.judge.base_url={server.base_url}",
             "--model.init_args.judge.model=judge", "--data.init_args.limit=2",
             f"--data.init_args.data_dir={tmp_path}/data", "--data.init_args.synth_samples={train: 4, val: 4, test: 8}",
             "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
        )  # fmt: skip
    summary = json.loads((tmp_path / "runs/gedit/tiny/latest/bench/summary.json").read_text())
    values = summary["partitions"]["all"]
    assert (
        values["count"] == 2 and values["cases/sc"] == 5 and values["cases/o"] == pytest.approx(math.sqrt(40))
    )
