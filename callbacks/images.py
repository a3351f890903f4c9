"""Sample grids logged while training: references | target | prediction, one row per sample (docs/architecture.md).

Every `every_n_steps` optimizer steps and at the end of each validation, the callback asks the module for
predictions on the first `k` samples of one fixed validation batch (captured from the first validation
batch, or drawn once from the datamodule's validation loader), draws them as a grid and logs it: to MLflow
as the artifact `samples/step_NNNNNN.png` of the run, to TensorBoard as an image, and always as a PNG under
`<default_root_dir>/samples/`. Each cell is the image letterboxed (aspect kept, centred) into a square of
`cell` pixels; a row holds `max_refs` reference cells (empty when a sample has fewer), then the target,
then the prediction; a header names the columns and each row's instruction is printed under it (`label_grid`).

The module's whole contract is `SupportsSampleGrid.sample_grid(batch, k)`. It runs on every rank (a
sharded model needs all ranks in its forward); only global rank 0 draws and logs.

Prompts of one's own (`prompts: path.jsonl`, docs/data.md): one record a line in the edit_jsonl converter's
format (`datamodules/convert/edit_jsonl.py`): {"instruction": str, "input_images": [paths], "output_image":
path (optional: the target column; without it the column is blank and the prediction takes the size the
data kind would give a target of the first input's size), "task_type", "id", ...}, paths relative to the
JSONL's folder. They are decoded by the datamodule's own validation transform when it is the multiref kind's
(same budget and sizes as validation), and collated as its batches are. A bad record is an error naming the
file, the line and the key; an unknown key names the nearest known one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from omnilab.fsdp import run_in_root

Row = tuple[list[Tensor], Tensor, Tensor]  # (references, target, prediction), each [3, H, W] in [-1, 1]


@runtime_checkable
class SupportsSampleGrid(Protocol):
    """What a module offers for sample grids."""

    def sample_grid(self, batch: dict[str, Any], k: int) -> list[Row]:
        """(references, target, prediction) of the first k samples of `batch`, images in [-1, 1]."""
        ...


def to_pil(image: Tensor) -> Any:
    """A [3, H, W] image in [-1, 1] as an RGB PIL image."""
    from PIL import Image

    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def letterbox(image: Tensor, cell: int, fill: float = 1.0) -> Tensor:
    """Fit a [3, H, W] image into a [3, cell, cell] square: scaled to its longer side, centred, `fill` around."""
    h, w = image.shape[-2:]
    scale = cell / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", antialias=True)[0]
    out = torch.full((3, cell, cell), fill)
    top, left = (cell - nh) // 2, (cell - nw) // 2
    out[:, top : top + nh, left : left + nw] = resized.clamp(-1, 1).cpu()
    return out


def draw_boxes(
    image: Tensor, boxes: list[tuple[float, ...]], colour: tuple[float, ...] = (1.0, -1.0, 1.0)
) -> Tensor:
    """A copy of a [3, H, W] image in [-1, 1] with each box (x0, y0, x1, y1 in [0, 1] of the image) outlined."""
    out = image.detach().float().clone()
    h, w = out.shape[-2:]
    c = torch.tensor(colour, dtype=out.dtype, device=out.device)[:, None]
    for x0, y0, x1, y1 in boxes:
        left, top = min(w - 1, max(0, int(x0 * w))), min(h - 1, max(0, int(y0 * h)))
        right, bottom = min(w - 1, max(left, int(x1 * w) - 1)), min(h - 1, max(top, int(y1 * h) - 1))
        out[:, top, left : right + 1] = out[:, bottom, left : right + 1] = c
        out[:, top : bottom + 1, left] = out[:, top : bottom + 1, right] = c
    return out


def make_grid(rows: list[Row], cell: int = 128, gap: int = 4, max_refs: int | None = None) -> Tensor:
    """One [3, H, W] image in [-1, 1]: per row `max_refs` reference cells (blank if absent), target, prediction."""
    if not rows:
        raise ValueError("make_grid needs at least one row")
    n_refs = max(len(r) for r, _, _ in rows) if max_refs is None else max_refs
    padded = [[*refs[:n_refs], *([None] * (n_refs - min(len(refs), n_refs))), t, p] for refs, t, p in rows]
    return cell_grid(padded, cell, gap)


def cell_grid(rows: list[list[Tensor | None]], cell: int = 128, gap: int = 4) -> Tensor:
    """One [3, H, W] image in [-1, 1] of rows of letterboxed cells (None: a grey blank), white around them."""
    if not rows:
        raise ValueError("a grid needs at least one row")
    columns = max(len(r) for r in rows)
    width, height = columns * cell + (columns + 1) * gap, len(rows) * cell + (len(rows) + 1) * gap
    grid = torch.full((3, height, width), 1.0)  # white background
    for i, cells in enumerate(rows):
        top = gap + i * (cell + gap)
        for j, image in enumerate(cells):
            left = gap + j * (cell + gap)
            box = letterbox(image, cell) if image is not None else torch.full((3, cell, cell), 0.6)
            grid[:, top : top + cell, left : left + cell] = box
    return grid


def label_grid(
    grid: Any,
    n_rows: int,
    n_refs: int,
    captions: list[str] | None = None,
    cell: int = 128,
    gap: int = 4,
    names: list[str] | None = None,
    labels: list[list[str]] | None = None,
) -> Any:
    """A grid's PIL image (`make_grid` / `cell_grid`) with a header naming the columns and, under each row, the
    lines of each cell's label (`labels[row][column]`, lines split at newlines) and the row's caption.

    `names` default to reference 1..`n_refs`, target, prediction (the SampleGrid layout).
    """
    import textwrap

    from PIL import Image, ImageDraw

    header, line = 16, 12
    chars = max(8, grid.width // 6)
    wrapped = [textwrap.wrap(c or "", chars)[:2] if captions else [] for c in (captions or [""] * n_rows)]
    cell_lines = [[str(text).split("\n") for text in row] for row in (labels or [[]] * n_rows)]
    n_label = max((len(lines) for row in cell_lines for lines in row), default=0)
    band = line * (n_label + max((len(w) for w in wrapped), default=0)) + (2 if captions or labels else 0)
    out = Image.new("RGB", (grid.width, header + n_rows * (cell + gap + band) + gap), "white")
    draw = ImageDraw.Draw(out)
    if names is None:
        names = [f"reference {i + 1}" for i in range(n_refs)] + ["target", "prediction"]
    for j, name in enumerate(names):
        draw.text((gap + j * (cell + gap) + 2, 2), name[: cell // 6], fill=(0, 0, 0))
    for i in range(n_rows):
        top = header + i * (cell + gap + band)
        out.paste(grid.crop((0, gap + i * (cell + gap), grid.width, gap + i * (cell + gap) + cell)), (0, top))
        for j, lines in enumerate(cell_lines[i] if i < len(cell_lines) else []):
            for n, text in enumerate(lines):
                draw.text(
                    (gap + j * (cell + gap) + 2, top + cell + 1 + n * line), text[: cell // 6], fill=(0, 0, 0)
                )
        for n, text in enumerate(wrapped[i]):
            draw.text((gap + 2, top + cell + 1 + (n_label + n) * line), text, fill=(0, 0, 0))
    return out


def captions_of(batch: dict[str, Any], k: int) -> list[str] | None:
    """The first k instructions (or prompts) of a batch, when it has them."""
    for key in ("instruction", "prompt", "caption"):
        values = batch.get(key)
        if isinstance(values, list | tuple) and all(isinstance(v, str) for v in values[:k]):
            return [str(v) for v in values[:k]]
    return None


def _first(batch: dict[str, Any], k: int) -> dict[str, Any]:
    """The first k samples of a collated batch (lists and tensors sliced, other values kept), on the CPU."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.ndim:
            out[key] = value[:k].cpu()
        elif isinstance(value, list | tuple):
            out[key] = [_cpu(v) for v in value[:k]]
        else:
            out[key] = value
    return out


def _cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.cpu()
    if isinstance(value, list | tuple):
        return [_cpu(v) for v in value]
    return value


NO_TARGET = "grid_no_target"  # batch key: per sample, True where a prompt record gave no output_image


def _record_image(value: Any, root: Path, where: str, key: str) -> Any:
    """The HxWx3 uint8 array of an image path of a prompt record (relative to `root`); errors name file:line:key."""
    import numpy as np
    from PIL import Image

    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {key} must be an image path (a string), got {value!r}")
    path = Path(value) if Path(value).is_absolute() else root / value
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {key} {value!r}: {path} does not exist")
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except Exception as err:
        raise ValueError(f"{where}: {key} {value!r}: {path} is not a readable image ({err})") from err


def read_prompts(path: str | Path, transform: Any = None, collate: Any = None) -> dict[str, Any]:
    """A batch of the multiref kind from a prompt JSONL (edit_jsonl records; see the module docstring).

    `transform(sample, rng)` decodes a sample as the data kind's validation does (None: images as they are)
    and `collate(examples)` makes the batch (default `collate_multiref`). ValueError / FileNotFoundError /
    UnknownKey name the file, line and key of a bad record.
    """
    import numpy as np

    from datamodules.convert.edit_jsonl import RECORD_KEYS, check_keys, default_task, iter_records
    from datamodules.multiref import collate_multiref, image_tensor
    from datamodules.webdataset import BadSample, SkipSample

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SampleGrid prompts: {path} does not exist")
    examples, no_target = [], []
    for line, record in iter_records(path):
        where = f"{path}:{line}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: not a JSON object: {str(record)[:80]!r}")
        check_keys(record, RECORD_KEYS, where, escape=None)
        instruction, inputs = record.get("instruction"), record.get("input_images", [])
        if not isinstance(instruction, str):
            raise ValueError(f"{where}: instruction must be a string, got {instruction!r}")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list):
            raise ValueError(f"{where}: input_images must be a list of image paths, got {inputs!r}")
        refs = [_record_image(p, path.parent, where, f"input_images[{k}]") for k, p in enumerate(inputs)]
        output = record.get("output_image")
        if output is None and not refs:
            raise ValueError(
                f"{where}: give output_image or input_images (the prediction takes the target's size, "
                "else the first input's)"
            )
        target = _record_image(output, path.parent, where, "output_image") if output is not None else refs[0]
        task = (
            record.get("task_type") if isinstance(record.get("task_type"), str) else default_task(len(refs))
        )
        meta = {"instruction": instruction, "task": task, "n_refs": len(refs), "source": "prompts"}
        key = str(record.get("id", f"{path.stem}_{line}"))
        sample = {"json": meta, "target.png": target, **{f"ref{k}.png": r for k, r in enumerate(refs)}}
        try:
            if transform is not None:
                example = transform(sample, np.random.default_rng(0))
            else:
                example = {
                    "refs": [image_tensor(r, f"ref{k}") for k, r in enumerate(refs)],
                    "target": image_tensor(target, "target"),
                    "instruction": instruction, "task": task, "n_refs": len(refs),
                    "ref_budget": 0, "ref_pixel_cap": 0, "meta": meta,
                }  # fmt: skip
        except (BadSample, SkipSample) as err:
            raise ValueError(f"{where}: the data kind refuses this record: {err}") from err
        examples.append({**example, "__key__": key})
        no_target.append(output is None)
    if not examples:
        raise ValueError(f"SampleGrid prompts: {path} holds no record")
    batch = (collate or collate_multiref)(examples)
    batch[NO_TARGET] = no_target
    return batch


class SampleGrid(Callback):
    """Log a grid of (references | target | prediction) rows every N steps and after each validation.

    Args:
        every_n_steps: Log after every n-th optimizer step (0: only after validation).
        k: Samples (rows) per grid.
        cell: Side of one letterboxed cell in pixels.
        on_validation_end: Also log after every validation (not during the sanity check).
        out_dir: Folder of the PNGs (default `<default_root_dir>/samples`).
        prompts: A JSONL of one's own validation prompts and images (edit_jsonl records, paths relative to the
            file; see the module docstring) instead of the first validation batch; the first k are drawn.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        k: int = 4,
        cell: int = 128,
        on_validation_end: bool = True,
        out_dir: str | None = None,
        prompts: str | None = None,
    ) -> None:
        self.every_n_steps, self.k, self.cell = every_n_steps, k, cell
        self.log_on_validation_end, self.out_dir = on_validation_end, out_dir
        if prompts is not None and not Path(prompts).is_file():
            raise FileNotFoundError(f"SampleGrid prompts: {prompts} does not exist")
        self.prompts = prompts
        self.batch: dict[str, Any] | None = None
        self.last_step = -1

    def _module(self, pl_module: LightningModule) -> SupportsSampleGrid:
        if not isinstance(pl_module, SupportsSampleGrid):
            raise TypeError(
                f"SampleGrid needs a module with sample_grid(batch, k); {type(pl_module).__name__} has none"
            )
        return pl_module

    def load_prompts(self, trainer: Trainer) -> dict[str, Any]:
        """The first k records of `prompts` as a batch, decoded by the datamodule's validation transform when it
        is the multiref kind's (else the images as they are)."""
        from datamodules.multiref import MultiRefTransform

        datamodule = getattr(trainer, "datamodule", None)
        transform = datamodule.transform(False) if hasattr(datamodule, "transform") else None
        if not isinstance(transform, MultiRefTransform):
            transform = None
        collate = datamodule.collate() if transform is not None and hasattr(datamodule, "collate") else None
        return _first(read_prompts(self.prompts, transform, collate), self.k)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Read `prompts` at the start, so a bad record stops the run before it trains."""
        if self.prompts is not None and self.batch is None:
            self.batch = self.load_prompts(trainer)

    def _fixed_batch(self, trainer: Trainer) -> dict[str, Any] | None:
        """The prompt records, else the captured validation batch, else the first batch of the validation loader."""
        if self.batch is None and self.prompts is not None:
            self.batch = self.load_prompts(trainer)
        if self.batch is None:
            datamodule = getattr(trainer, "datamodule", None)
            loader = datamodule.val_dataloader() if datamodule is not None else None
            if loader is None:
                return None
            self.batch = _first(next(iter(loader)), self.k)
        return self.batch

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Keep the first k samples of the first validation batch as the fixed batch."""
        if self.batch is None and batch_idx == 0 and dataloader_idx == 0 and isinstance(batch, dict):
            self.batch = _first(batch, self.k)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Every `every_n_steps` optimizer steps: log a grid."""
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.log_grid(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """After each validation (not the sanity check): log a grid."""
        if (
            self.log_on_validation_end
            and not trainer.sanity_checking
            and trainer.global_step != self.last_step
        ):
            self.log_grid(trainer, pl_module)

    def log_grid(self, trainer: Trainer, pl_module: LightningModule) -> Path | None:
        """Sample the fixed batch, draw the grid and log it; returns the PNG path on rank 0."""
        module = self._module(pl_module)
        batch = self._fixed_batch(trainer)
        if batch is None:
            return None
        step = trainer.global_step
        self.last_step = step
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                rows = run_in_root(trainer, module, "sample_grid", batch, self.k)  # FSDP: through its forward
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return None
        blank = (self.batch or {}).get(NO_TARGET) or [False] * len(rows)
        rows = [(_cpu(r), None if none else _cpu(t), _cpu(p)) for (r, t, p), none in zip(rows, blank)]
        n_refs = max(len(r) for r, _, _ in rows)
        image = label_grid(
            to_pil(make_grid(rows, self.cell)),
            len(rows),
            n_refs,
            captions_of(self.batch or {}, len(rows)),
            self.cell,
        )
        out_dir = Path(self.out_dir or Path(trainer.default_root_dir) / "samples")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step:06d}.png"
        image.save(path)
        for logger in trainer.loggers:
            log_image(logger, image, step)
        return path

    def state_dict(self) -> dict[str, Any]:
        """The step of the last grid (so a resumed run does not log the same step twice)."""
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step of the last grid."""
        self.last_step = int(state_dict.get("last_step", -1))


def log_image(logger: Any, image: Any, step: int, stem: str = "step", tag: str = "samples") -> None:
    """Send one PIL image to a logger that can take it (the MLflow artifact `samples/<stem>_NNNNNN.png`, a
    TensorBoard image under `tag`); other loggers skip it."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, image, artifact_file=f"samples/{stem}_{step:06d}.png")
    elif isinstance(logger, TensorBoardLogger):
        import numpy as np

        logger.experiment.add_image(tag, np.asarray(image), step, dataformats="HWC")
