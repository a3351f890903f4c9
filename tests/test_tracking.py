"""MLflow tracking: a fit's params, metric history and config artifact read back, locally and over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from omnilab.cli import main
from omnilab.tracking import compare_runs
from tests.test_cli import BASE, toy_experiment


def fit_with_mlflow(root: Path, uri: str, *extra: str) -> None:
    exp = toy_experiment(root, logger=None, log_every_n_steps=1)
    logger = "--trainer.logger=lightning.pytorch.loggers.MLFlowLogger"
    main(
        [
            "fit",
            "--config",
            BASE,
            "--config",
            str(exp),
            logger,
            f"--trainer.logger.tracking_uri={uri}",
            *extra,
        ]
    )


def check_run(client: MlflowClient, tmp: Path) -> None:
    exp = client.get_experiment_by_name("toy")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tiny"
    assert run.data.params["model/lr"] == "0.01" and run.data.params["data/batch_size"] == "2"
    assert run.data.tags["config"].endswith("experiments/toy/tiny.yaml") and run.data.tags["git_sha"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [h.step for h in history] == [0, 1, 2]
    assert "test/loss" in run.data.metrics and "val/loss" in run.data.metrics
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp))
    assert "tests.toy.ToyModule" in Path(config).read_text()


def test_fit_logs_params_metrics_and_config_to_sqlite(in_tmp):
    uri = f"sqlite:///{in_tmp}/mlruns/mlflow.db"
    fit_with_mlflow(in_tmp, uri)
    check_run(MlflowClient(tracking_uri=uri), in_tmp)
    table = compare_runs("toy", "train/loss", out=in_tmp / "curves.png", uri=uri)
    assert "tiny" in table.splitlines()[1] and (in_tmp / "curves.png").stat().st_size > 1000
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fit_logs_to_a_real_mlflow_server_over_http(in_tmp):
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{in_tmp}/server.db", "--artifacts-destination", str(in_tmp / "art"),
            "--workers", "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        uri = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(server.stderr.read().decode()[-2000:])
                time.sleep(0.5)
        fit_with_mlflow(in_tmp, uri)
        check_run(MlflowClient(tracking_uri=uri), in_tmp)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_compare_tells_fits_apart_and_draws_a_readable_figure(in_tmp):
    """Three fits (one with a single point), an eval run and a noise param, in a real sqlite MLflow store."""
    from PIL import Image

    from omnilab.tracking import COMMAND_TAG, EVALUATES_TAG

    uri = f"sqlite:///{in_tmp}/mlruns/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("toy")
    ids = []
    for i, (lr, points) in enumerate([("0.1", 5), ("0.01", 5), ("0.001", 1)]):
        run = client.create_run(exp, run_name="tiny", tags={COMMAND_TAG: "fit"})
        ids.append(run.info.run_id)
        for key, value in {"model/lr": lr, "model/backbone/config/num_layers": "2", "data/data_dir": f"d{i}",
                           "trainer/logger/tags/x": str(i), "optimizer/lr": "7"}.items():  # fmt: skip
            client.log_param(run.info.run_id, key, value)
        for step in range(points):
            client.log_metric(run.info.run_id, "val/loss", 1.0 / (step + 1 + i), step=step)
    evaluation = client.create_run(exp, run_name="tiny", tags={COMMAND_TAG: "test", EVALUATES_TAG: ids[0]})
    client.log_metric(evaluation.info.run_id, "val/loss", 9.0, step=0)
    out = in_tmp / "curves.png"
    table = compare_runs("toy", "val/loss", out=out, uri=uri)
    header, *rows, _ = table.splitlines()
    # the differing param once, by a name no other param ends with (optimizer/lr exists); noise left out
    assert header.split() == ["run", "id", "status", "model/lr", "val/loss"]
    assert len(rows) == 3 and evaluation.info.run_id[:8] not in table
    assert {row.split()[1] for row in rows} == {i[:8] for i in ids}
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert image.shape[1] >= 1000 and image.shape[0] >= 600  # 200 dpi
    # each run's colour (C0, C1, C2) is drawn: the one-point run shows as a marker
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        assert (np.abs(image - colour).sum(axis=2) < 30).sum() > 20, colour
