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


# --------------------------------------------------------------------------- prompts of one's own (a JSONL)


def write_prompts(folder, records: list) -> str:
    """A prompt JSONL in `folder` with its images (paths relative to it): red 24x16, blue 16x16, green 20x20."""
    from PIL import Image

    (folder / "img").mkdir(exist_ok=True)
    for name, size, colour in (("red", (24, 16), (255, 0, 0)), ("blue", (16, 16), (0, 0, 255)), ("green", (20, 20), (0, 255, 0))):  # fmt: skip
        Image.new("RGB", size, colour).save(folder / "img" / f"{name}.png")
    path = folder / "prompts.jsonl"
    path.write_text(
        "".join((r if isinstance(r, str) else __import__("json").dumps(r)) + "\n" for r in records)
    )
    return str(path)


GOOD = [
    {"instruction": "make image 1 blue", "input_images": ["img/red.png"], "output_image": "img/blue.png"},
    {"instruction": "put image 2 beside image 1", "input_images": ["img/red.png", "img/green.png"]},
]


def test_own_prompts_replace_the_validation_batch_and_a_record_without_target_shows_a_blank(tmp_path):
    path = write_prompts(tmp_path, GOOD)
    module = Sampler()
    grid = SampleGrid(every_n_steps=2, k=4, cell=16, prompts=path)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=2, callbacks=[grid], logger=False, accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=Data())
    assert module.calls == [2]
    batch = grid.batch
    assert batch["instruction"] == [r["instruction"] for r in GOOD] and batch["task"] == ["edit", "compose"]
    assert [len(r) for r in batch["refs"]] == [1, 2]
    red = batch["refs"][0][0]
    assert red.shape == (3, 16, 24) and torch.allclose(red[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(batch["target"][0][:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))  # blue: the output
    assert batch["target"][1].shape == red.shape  # no output_image: sized like the first input
    image = np.asarray(Image.open(tmp_path / "samples" / "step_000002.png").convert("RGB")).astype(int)
    # columns: 2 references, target, prediction (16 px cells, 4 px gaps); rows under the 16 px header, each
    # followed by its caption band: height = 16 + 2 * (16 + 4 + band) + 4
    band = (image.shape[0] - 16 - 4) // 2 - 20
    second_row = 16 + 16 + 4 + band
    target_cell = image[second_row + 8, 4 + 2 * 20 + 8]
    assert (abs(target_cell - 204) <= 1).all()  # the second record's target is the grey (0.6) blank
    first_target = image[16 + 8, 4 + 2 * 20 + 8]
    assert tuple(first_target) == (0, 0, 255)  # the first record's target: its blue output image


def test_own_prompts_go_through_the_multiref_validation_transform(tmp_path):
    from callbacks.images import read_prompts
    from datamodules.multiref import MultiRefTransform

    path = write_prompts(tmp_path, GOOD)
    transform = MultiRefTransform(
        budget=torch.tensor([32]), base_budget=32, target_budget=32, multiple=16, min_side=16,
        upscale=True, train=False,
    )  # fmt: skip
    batch = read_prompts(path, transform)
    # the budget rule of the data kind (B = 32: B² pixels): refs under 32² pixels together, multiples of 16; the target under its own
    assert all(x.shape[-1] % 16 == 0 and x.shape[-2] % 16 == 0 for r in batch["refs"] for x in r)
    assert sum(x.shape[-1] * x.shape[-2] for x in batch["refs"][1]) <= 32 * 32
    assert tuple(batch["target"][0].shape[-2:]) == (32, 32)
    assert batch["grid_no_target"] == [False, True] and batch["n_refs"].tolist() == [1, 2]


@pytest.mark.parametrize(
    ("record", "error", "message"),
    [
        (
            {"instruction": "x", "inputs": ["img/red.png"]},
            "UnknownKey",
            r"prompts.jsonl:2: unknown key 'inputs' \(did you mean 'input_images'\?\)",
        ),
        (
            {"instruction": "x", "input_images": ["img/nothere.png"]},
            "FileNotFoundError",
            r"prompts.jsonl:2: input_images\[0\] 'img/nothere.png'",
        ),
        (
            {"instruction": 3, "input_images": ["img/red.png"]},
            "ValueError",
            r"prompts.jsonl:2: instruction must be a string",
        ),
        (
            {"instruction": "x", "output_image": 5},
            "ValueError",
            r"prompts.jsonl:2: output_image must be an image path",
        ),
        ({"instruction": "x"}, "ValueError", r"prompts.jsonl:2: give output_image or input_images"),
        ("not json", "ValueError", r"prompts.jsonl:2: not a JSON object"),
    ],
)
def test_a_bad_prompt_record_is_an_error_naming_file_line_and_key(tmp_path, record, error, message):
    from callbacks.images import read_prompts

    path = write_prompts(tmp_path, [GOOD[0], record])
    with pytest.raises(Exception, match=message) as info:
        read_prompts(path)
    assert type(info.value).__name__ == error
    assert "--ignore-keys" not in str(info.value)  # a prompt file has no such option


def test_a_missing_prompt_file_is_refused_when_the_callback_is_made(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.jsonl"):
        SampleGrid(prompts=str(tmp_path / "nothere.jsonl"))


def test_a_flow_model_samples_the_own_prompts_at_the_sizes_the_data_kind_gives(tmp_path, monkeypatch):
    from callbacks.images import read_prompts
    from datamodules.multiref import MultiRefTransform
    from tests.lightning_modules.test_flow_edit import tiny

    transform = MultiRefTransform(
        budget=torch.tensor([32]), base_budget=32, target_budget=32, multiple=16, min_side=16, upscale=True,
        train=False,
    )  # fmt: skip
    batch = read_prompts(write_prompts(tmp_path, GOOD), transform)
    monkeypatch.setenv("OMNILAB_CACHE", str(tmp_path / "cache"))  # the tiny tokenizers are built here
    rows = tiny("sd3_kontext").eval().sample_grid(batch, 2)
    assert [len(r) for r, _, _ in rows] == [1, 2]
    # each prediction at its target's size: the output's, or (no output_image) what the rule gives the first input
    assert [tuple(p.shape) for _, _, p in rows] == [tuple(t.shape) for t in batch["target"]]
    assert all(torch.isfinite(p).all() and p.abs().max() <= 1 for _, _, p in rows)
