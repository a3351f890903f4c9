"""SampleGrid: the grid layout by hand, logging every N steps and after validation, MLflow artifact names."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger, MLFlowLogger
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

from callbacks.images import SampleGrid, SupportsSampleGrid, label_grid, letterbox, make_grid, to_pil


def test_letterbox_keeps_aspect_and_centres():
    image = torch.full((3, 32, 64), -1.0)  # black, twice as wide as high
    box = letterbox(image, 16, fill=1.0)
    assert box.shape == (3, 16, 16)
    # scaled by 16/64 to 8 x 16: rows 4..11 are the image, rows 0..3 and 12..15 the white fill
    assert (box[:, 4:12] == -1).all() and (box[:, :4] == 1).all() and (box[:, 12:] == 1).all()


def test_make_grid_columns_are_references_then_target_then_prediction():
    red, green, blue = (torch.tensor(c, dtype=torch.float32)[:, None, None].expand(3, 8, 8) for c in
                        ([1, -1, -1], [-1, 1, -1], [-1, -1, 1]))  # fmt: skip
    rows = [([red, red], green, blue), ([red], green, blue)]
    grid = make_grid(rows, cell=8, gap=2)
    # 2 ref columns + target + prediction: width 4·8 + 5·2 = 42; height 2·8 + 3·2 = 22
    assert grid.shape == (3, 22, 42)

    def cell(row: int, col: int) -> Tensor:
        top, left = 2 + row * 10, 2 + col * 10
        return grid[:, top : top + 8, left : left + 8]

    assert torch.equal(cell(0, 1), red) and torch.equal(cell(0, 2), green) and torch.equal(cell(0, 3), blue)
    assert torch.equal(cell(1, 0), red) and torch.equal(cell(1, 2), green)
    assert (cell(1, 1) == 0.6).all()  # the missing second reference is a grey blank
    assert to_pil(grid).size == (42, 22)


class Sampler(L.LightningModule):
    """A module that trains a scalar and answers sample_grid with its batch (prediction = negated target)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls: list[int] = []

    def training_step(self, batch, batch_idx):
        return (self.w - 1) ** 2

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample_grid(self, batch, k):
        self.calls.append(self.global_step)
        assert not self.training  # sampled in eval mode
        return [(r, t, -t) for r, t in zip(batch["refs"][:k], batch["target"][:k])]


def batch() -> dict:
    refs = [[torch.zeros(3, 8, 8)], [], [torch.ones(3, 8, 16), torch.zeros(3, 8, 8)]]
    return {"refs": refs, "target": [torch.rand(3, 8, 8) for _ in range(3)], "__key__": ["a", "b", "c"]}


def _same(b: dict) -> dict:
    return b


class Data(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader([batch()] * 4, batch_size=None, collate_fn=_same)

    def val_dataloader(self):
        return DataLoader([batch()], batch_size=None, collate_fn=_same)


class RecordingMLFlow(MLFlowLogger):
    """MLFlowLogger whose experiment records log_image calls instead of talking to a tracking server."""

    def __init__(self) -> None:
        Logger.__init__(self)  # not MLFlowLogger.__init__: its MlflowClient opens a tracking store
        self.images: list[tuple[str, str, tuple[int, int]]] = []

    @property
    def save_dir(self) -> None:
        return None

    @property
    def experiment(self):
        return self

    @property
    def run_id(self) -> str:
        return "run-0"

    @property
    def name(self) -> str:
        return "test"

    @property
    def version(self) -> str:
        return "run-0"

    def log_image(self, run_id, image, artifact_file):
        assert isinstance(image, Image.Image)
        self.images.append((run_id, artifact_file, image.size))

    def log_hyperparams(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def finalize(self, status="success"):
        pass

    def save(self):
        pass


def test_grids_every_n_steps_and_after_validation(tmp_path):
    logger = RecordingMLFlow()
    module = Sampler()
    grid = SampleGrid(every_n_steps=2, k=2, cell=16)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=4, callbacks=[grid], logger=logger, accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=Data())
    # steps 2 and 4; the validation after step 4 does not log step 4 twice
    assert module.calls == [2, 4]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    assert [(r, f) for r, f, _ in logger.images] == [
        ("run-0", "samples/step_000002.png"),
        ("run-0", "samples/step_000004.png"),
    ]
    # k = 2 rows; columns: 1 reference (the most among the first two samples), target, prediction
    size = Image.open(tmp_path / "samples" / "step_000004.png").size
    # plus a 16-pixel header naming the columns (no instructions in this batch: no caption bands)
    assert size == logger.images[-1][2] == (3 * 16 + 4 * 4, 16 + 2 * 16 + 3 * 4)
    assert grid.state_dict() == {"last_step": 4}


def test_validation_end_logs_when_no_step_schedule(tmp_path):
    module = Sampler()
    grid = SampleGrid(every_n_steps=0, k=3, cell=8)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=4, callbacks=[grid], logger=False, accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=1, val_check_interval=2,
    )  # fmt: skip
    trainer.fit(module, datamodule=Data())
    assert module.calls == [2, 4]  # after each validation, never in the sanity check
    assert (tmp_path / "samples" / "step_000002.png").is_file()


def test_grid_needs_the_protocol_and_resumes_its_step():
    assert isinstance(Sampler(), SupportsSampleGrid)
    grid = SampleGrid()
    with pytest.raises(TypeError, match="sample_grid"):
        grid._module(L.LightningModule())
    grid.load_state_dict({"last_step": 7})
    assert grid.last_step == 7


def test_a_labelled_grid_names_its_columns_and_prints_each_instruction():
    rows = [([torch.zeros(3, 8, 8)], torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)) for _ in range(2)]
    grid = to_pil(make_grid(rows, cell=64, gap=4))
    plain = label_grid(grid, 2, 1, None, cell=64, gap=4)
    labelled = label_grid(grid, 2, 1, ["make it red", "add a hat"], cell=64, gap=4)
    assert labelled.width == grid.width and labelled.height > plain.height > grid.height
    image = np.asarray(labelled.convert("L")).astype(int)
    header = image[:16]
    assert (header < 128).sum() > 30  # the column names are drawn
    band = image[16 + 64 : 16 + 64 + 12, : grid.width // 2]  # under the first row: its instruction
    assert (band < 128).sum() > 10
    assert (np.asarray(plain.convert("L"))[16 + 64 : 16 + 64 + 4] > 200).all()  # no caption: the gap is blank
