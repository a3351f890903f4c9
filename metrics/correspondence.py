"""Ego-Exo4D correspondence metrics, HANDAL-X per-instance mIoU, and the challenge submission JSON.

Implements the official Ego-Exo4D correspondence evaluation (EGO4D/ego-exo4d-relation,
`correspondence/evaluation/{evaluate_egoexo,evaluate_exoego,utils,metrics}.py`, whose mask metrics
are DAVIS 2017's), as CCMP reimplements it (docs/methods/ccmp.md); HANDAL-X's mean per-instance IoU (§6); and
the prediction JSON that the evaluators and EvalAI challenge 2288 read (§7 "Predictions").

The protocol (§5): for each scored instance the GT mask is resized, nearest and unpadded, so that its
longest side is 480 (`resize_longest`: exo 480x270, Aria 480x480). The prediction must have exactly
that shape. An instance whose object is not visible in the target view counts only for VA. IoU, CA and
LE are micro-averaged over all the visible instances of a split. VA is the balanced accuracy of
`gt_visible` against `confidence > 0.5` over all instances.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage.morphology import disk
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

EVAL_LONGEST_SIDE = 480
# The evaluators call `location_score(..., size=(480, 480))` for both directions and both view kinds.
LOCATION_NORMALIZER = math.sqrt(480**2 + 480**2)  # 678.82
CONFIDENCE_THRESHOLD = 0.5  # pred_exists = confidence > 0.5 (strict)
BOUNDARY_THRESHOLD = 0.008  # DAVIS bound_th: tolerance as a fraction of the image diagonal
IOU_EPS = 1e-7

Direction = Literal["ego-exo", "exo-ego"]
MaskLike = Tensor | np.ndarray


def _check_same_shape(pred: np.ndarray, gt: np.ndarray) -> None:
    """Raise ValueError unless the prediction has exactly the GT's shape (the evaluators assert it)."""
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} != GT shape {tuple(gt.shape)}: predict at the GT's "
            "evaluation shape (resize_longest of the target view, padding removed)"
        )


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """DAVIS region similarity J = |P∩G| / (|P∪G| + 1e-7); 1.0 when both masks are empty (as DAVIS)."""
    _check_same_shape(pred, gt)
    pred, gt = pred.astype(bool), gt.astype(bool)
    union = np.logical_or(pred, gt).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, gt).sum() / (union + IOU_EPS))


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """DAVIS boundary map: b(i,j) = m(i,j) differs from its east, south or south-east neighbour.

    Neighbours past the border are background, except that (as DAVIS `_seg2bmap` at the input size) the
    last row compares only with its east neighbour, the last column only with its south neighbour, and
    the bottom-right pixel is never boundary. The boundary is offset half a pixel towards the origin: a
    filled rectangle with rows r0..r1, cols c0..c1 gives the outline of rows r0-1..r1, cols c0-1..c1.
    """
    seg = mask.astype(bool)
    padded = np.pad(seg, ((0, 1), (0, 1)))  # background past the bottom and right borders
    east, south, south_east = padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]
    bmap = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    bmap[-1, :] = seg[-1, :] ^ east[-1, :]
    bmap[:, -1] = seg[:, -1] ^ south[:, -1]
    bmap[-1, -1] = False
    return bmap


def boundary_tolerance(shape: tuple[int, ...]) -> int:
    """DAVIS boundary tolerance d = ceil(0.008 · sqrt(H² + W²)) pixels (5 for 480x270, 6 for 480x480)."""
    height, width = shape[:2]
    return math.ceil(BOUNDARY_THRESHOLD * math.hypot(height, width))


def contour_accuracy(pred: np.ndarray, gt: np.ndarray) -> float:
    """DAVIS boundary F: F = 2PR/(P+R), P = |B_P ∩ dil(B_G)|/|B_P|, R = |B_G ∩ dil(B_P)|/|B_G|.

    B = `seg2bmap(mask)`; dil = dilation by a disk of radius d = `boundary_tolerance(shape)` (x² + y² ≤ d²);
    no centroid registration (the official code does none). Empty boundaries follow DAVIS `f_measure`:
    both empty -> P = R = 1, F = 1; only B_P empty (e.g. an empty prediction) -> P = 1, R = 0, F = 0;
    only B_G empty -> P = 0, R = 1, F = 0. A mask that fills the whole frame has an empty boundary too.
    """
    _check_same_shape(pred, gt)
    pred_boundary, gt_boundary = seg2bmap(pred), seg2bmap(gt)
    n_pred, n_gt = pred_boundary.sum(), gt_boundary.sum()
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    structure = disk(boundary_tolerance(gt.shape)).astype(bool)
    precision = (pred_boundary & ndimage.binary_dilation(gt_boundary, structure=structure)).sum() / n_pred
    recall = (gt_boundary & ndimage.binary_dilation(pred_boundary, structure=structure)).sum() / n_gt
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def bbox_center(mask: np.ndarray) -> tuple[int, int]:
    """Bounding-box centre (row, col) = ((r_min + r_max) // 2, (c_min + c_max) // 2); (W // 2, H // 2) if empty.

    The official `crop_mask` pads both masks by H (the row count) on every side and
    `compute_size_boundry_centroid` returns (x, y) = ((c_min + c_max) // 2, (r_min + r_max) // 2) of the
    padded array, or, for an empty mask, (H' // 2, W' // 2) of the padded H' x W' = 3H x (W + 2H) array,
    still read as (x, y). Shifted back by the padding, an empty mask's centre is x = H // 2, y = W // 2:
    row W // 2, column H // 2 of the unpadded array. That transposes the array centre (on a 270x480 exo
    target: row 240, column 135, not row 135, column 240); LE follows the official figure, so this does too.
    """
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        height, width = mask.shape[:2]
        return width // 2, height // 2
    return int(rows.min() + rows.max()) // 2, int(cols.min() + cols.max()) // 2


def location_error(pred: np.ndarray, gt: np.ndarray) -> float:
    """LE = ‖c_P − c_G‖₂ / sqrt(480² + 480²), c = `bbox_center`; the normalizer is fixed for every shape."""
    _check_same_shape(pred, gt)
    (pred_row, pred_col), (gt_row, gt_col) = bbox_center(pred), bbox_center(gt)
    return math.hypot(pred_row - gt_row, pred_col - gt_col) / LOCATION_NORMALIZER


def existence_accuracy(pred: np.ndarray, gt: np.ndarray) -> bool:
    """Whether both masks are empty or both are not (the official `utils.existence_accuracy`)."""
    return bool(np.any(pred)) == bool(np.any(gt))


def _balanced_accuracy_from_counts(tp: int, fn: int, tn: int, fp: int) -> float:
    """Mean recall over the classes present in the GT: ½(TPR + TNR), or one recall if one class is present.

    sklearn's `balanced_accuracy_score` drops a class absent from y_true (with a warning); nan if none.
    """
    recalls = []
    if tp + fn > 0:
        recalls.append(tp / (tp + fn))
    if tn + fp > 0:
        recalls.append(tn / (tn + fp))
    return sum(recalls) / len(recalls) if recalls else math.nan


def balanced_accuracy(gt_exists: ArrayLike, pred_exists: ArrayLike) -> float:
    """Balanced accuracy ½(TPR + TNR) of binary existence labels, as sklearn's `balanced_accuracy_score`."""
    gt, pred = np.asarray(gt_exists, dtype=bool), np.asarray(pred_exists, dtype=bool)
    return _balanced_accuracy_from_counts(
        tp=int((gt & pred).sum()),
        fn=int((gt & ~pred).sum()),
        tn=int((~gt & ~pred).sum()),
        fp=int((~gt & pred).sum()),
    )


def eval_shape(height: int, width: int, longest: int = EVAL_LONGEST_SIDE) -> tuple[int, int]:
    """(H', W') = int(side · (1 / max(H, W) · longest)), the official `reshape_img_nopad` size (float arithmetic)."""
    ratio = 1.0 / max(height, width) * longest
    return int(height * ratio), int(width * ratio)


def resize_longest(mask: np.ndarray, longest: int = EVAL_LONGEST_SIDE) -> np.ndarray:
    """Nearest-neighbour resize to longest side `longest`, as the official `reshape_img_nopad`.

    Output size `eval_shape` (exo 3840x2160 -> 480x270, Aria 1408 -> 480); source index =
    min(floor(dst · (1 / (dst_size / src_size))), src_size − 1), cv2.INTER_NEAREST's (not the pixel-centre
    INTER_NEAREST_EXACT's). Keeps the dtype.
    """
    height, width = mask.shape[:2]
    new_height, new_width = eval_shape(height, width, longest)

    def source_index(new_size: int, size: int) -> np.ndarray:
        inverse_scale = 1.0 / (new_size / size)
        return np.minimum(np.floor(np.arange(new_size) * inverse_scale).astype(np.int64), size - 1)

    return mask[source_index(new_height, height)[:, None], source_index(new_width, width)[None, :]]


def _as_numpy_mask(mask: MaskLike) -> np.ndarray:
    """A 2-D mask (tensor or array, any device) as a numpy bool array."""
    if isinstance(mask, Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(bool)


class CorrespondenceMetrics(Metric):
    """Ego-Exo4D IoU, CA, LE (micro-averaged over visible instances) and VA (over all instances).

    State is float64 sums and counts (summed across DDP ranks). `compute()` returns "iou", "ca", "le",
    "va" and "existence_acc" as float64 (the official code computes in numpy float64): "existence_acc" is
    the official `existence_accuracy` averaged over the visible instances (the prediction and the
    ground-truth mask both empty or both not; an annotated ground truth may be empty), which CCMP prints
    besides VA; a mean over no instances is nan.
    """

    is_differentiable = False
    higher_is_better = None  # IoU, CA, VA: higher; LE: lower
    full_state_update = False

    iou_sum: Tensor
    ca_sum: Tensor
    le_sum: Tensor
    n_visible: Tensor
    n_agree: Tensor
    tp: Tensor
    fn: Tensor
    tn: Tensor
    fp: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("iou_sum", "ca_sum", "le_sum"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("n_visible", "n_agree", "tp", "fn", "tn", "fp"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        pred_masks: Sequence[MaskLike],
        gt_masks: Sequence[MaskLike],
        confidence: Tensor,
        gt_visible: Tensor,
    ) -> None:
        """Score N instances: HxW bool masks at the GT's evaluation shape, confidence [N], gt_visible [N].

        The GT mask of an invisible instance is not read (any placeholder will do); its prediction counts
        only for VA.
        """
        if not len(pred_masks) == len(gt_masks) == len(confidence) == len(gt_visible):
            raise ValueError(
                f"got {len(pred_masks)} predictions, {len(gt_masks)} GT masks, {len(confidence)} "
                f"confidences and {len(gt_visible)} visibility flags; they must match"
            )
        visible = gt_visible.detach().bool().cpu()
        pred_exists = (confidence.detach() > CONFIDENCE_THRESHOLD).cpu()
        iou_sum = ca_sum = le_sum = 0.0
        n_agree = 0
        for pred_mask, gt_mask, is_visible in zip(pred_masks, gt_masks, visible.tolist()):
            if not is_visible:
                continue
            pred, gt = _as_numpy_mask(pred_mask), _as_numpy_mask(gt_mask)
            iou_sum += iou(pred, gt)
            ca_sum += contour_accuracy(pred, gt)
            le_sum += location_error(pred, gt)
            n_agree += int(existence_accuracy(pred, gt))
        self.iou_sum += iou_sum
        self.ca_sum += ca_sum
        self.le_sum += le_sum
        self.n_visible += int(visible.sum())
        self.n_agree += n_agree
        self.tp += int((visible & pred_exists).sum())
        self.fn += int((visible & ~pred_exists).sum())
        self.tn += int((~visible & ~pred_exists).sum())
        self.fp += int((~visible & pred_exists).sum())

    def compute(self) -> dict[str, Tensor]:
        """{"iou", "ca", "le", "existence_acc"}: means over visible instances; "va": balanced accuracy."""
        n_visible = self.n_visible.item()

        def mean(total: Tensor | int) -> Tensor:
            value = float(total) / n_visible if n_visible else math.nan
            return torch.tensor(value, dtype=torch.float64, device=self.device)

        va = _balanced_accuracy_from_counts(self.tp.item(), self.fn.item(), self.tn.item(), self.fp.item())
        return {
            "iou": mean(self.iou_sum),
            "ca": mean(self.ca_sum),
            "le": mean(self.le_sum),
            "va": torch.tensor(va, dtype=torch.float64, device=self.device),
            "existence_acc": mean(self.n_agree),
        }


def instance_key(instance_id: str) -> int:
    """A stable signed 64-bit key of an instance id (blake2b), the same in every process and run."""
    digest = hashlib.blake2b(instance_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class HandalInstanceIoU(Metric):
    """HANDAL-X mIoU: `iou` averaged over each instance's frames, then averaged over instances.

    Keeps one (instance key, IoU) pair per frame, concatenated across DDP ranks, and groups them in
    `compute()`, so an instance whose frames are spread over ranks is still one instance. The key is a
    64-bit hash of the id (a 32-bit CRC would collide between some of ~10⁴ instances).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    instance_keys: list[Tensor] | Tensor
    ious: list[Tensor] | Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("instance_keys", default=[], dist_reduce_fx="cat")
        self.add_state("ious", default=[], dist_reduce_fx="cat")

    def update(
        self, pred_masks: Sequence[MaskLike], gt_masks: Sequence[MaskLike], instance_ids: Sequence[str]
    ) -> None:
        """Score N frames: HxW bool masks of equal shapes and the instance id of each frame."""
        if not len(pred_masks) == len(gt_masks) == len(instance_ids):
            raise ValueError(
                f"got {len(pred_masks)} predictions, {len(gt_masks)} GT masks and {len(instance_ids)} "
                "instance ids; they must match"
            )
        values = [iou(_as_numpy_mask(p), _as_numpy_mask(g)) for p, g in zip(pred_masks, gt_masks)]
        self.ious.append(torch.tensor(values, dtype=torch.float64, device=self.device))
        keys = [instance_key(i) for i in instance_ids]
        self.instance_keys.append(torch.tensor(keys, dtype=torch.long, device=self.device))

    def compute(self) -> Tensor:
        """Mean over instances of the mean IoU over the instance's frames, float64 (nan before any update)."""
        if isinstance(self.ious, list) and not self.ious:
            return torch.tensor(math.nan, dtype=torch.float64, device=self.device)
        keys, ious = dim_zero_cat(self.instance_keys), dim_zero_cat(self.ious)
        _, group = torch.unique(keys, return_inverse=True)
        n_instances = int(group.max()) + 1
        sums = torch.zeros(n_instances, dtype=ious.dtype, device=ious.device).index_add_(0, group, ious)
        counts = torch.zeros_like(sums).index_add_(0, group, torch.ones_like(ious))
        return (sums / counts).mean()


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of an HxW bool mask, column-major (pycocotools), as {"size": [H, W], "counts": str}."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask).astype(np.uint8)))
    return {"size": [int(side) for side in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """The HxW bool mask of a COCO RLE {"size", "counts"}, counts str or bytes (as the evaluators)."""
    return mask_utils.decode(rle).astype(bool)


class SubmissionWriter:
    """Collects predictions and writes the Ego-Exo4D correspondence prediction JSON (docs/methods/ccmp.md).

    Layout: {direction: {"version": "xx", "challenge": "xx", "results": {take: {"masks": {obj: {
    "<src_cam>_<tgt_cam>": {frame: {"pred_mask": RLE, "confidence": float}}}}, "subsample_idx": [int]}}}}
    with frames as strings. Both directions are always written, an unused one with empty results: that is
    the merged EvalAI submission (`generate_evalai_submission.py`, whose "xx" fields are marked DO NOT
    CHANGE), and each official evaluator reads only its own section. Ego cameras are the ones whose name
    contains "aria", so "ego-exo" keys read "<aria>_<exo>" and "exo-ego" keys "<exo>_<aria>".

    With a `plan` (the `<split>-plan.json` that `omnilab data convert egoexo4d` writes: what the official
    `validate_predictions` requires), the submission holds exactly the plan's takes, objects (an object
    without an ego camera as an empty dict), camera pairs and frames: a planned frame that was not
    predicted (its frame file was missing, its pair skipped) gets an empty mask of the target's
    evaluation shape with confidence 0, counted in `filled`; a prediction outside the plan is left out,
    counted in `unplanned`. Without a plan it holds what was added, `subsample_idx` the sorted frames seen.
    """

    def __init__(self, plan: dict[str, Any] | None = None) -> None:
        self.plan = plan
        self._masks: dict[str, dict[str, dict[str, Any]]] = {"ego-exo": {}, "exo-ego": {}}
        self._frames: dict[str, dict[str, set[int]]] = {"ego-exo": {}, "exo-ego": {}}
        self.filled = self.unplanned = 0

    def add(
        self,
        direction: Direction,
        take: str,
        obj: str,
        src_cam: str,
        tgt_cam: str,
        frame: int | str,
        mask: np.ndarray,
        confidence: float,
    ) -> None:
        """Record one frame's target-view mask (at the GT's evaluation shape) and existence confidence."""
        if direction not in self._masks:
            raise ValueError(f"direction must be 'ego-exo' or 'exo-ego', got {direction!r}")
        pairs = self._masks[direction].setdefault(take, {}).setdefault(obj, {})
        frames = pairs.setdefault(f"{src_cam}_{tgt_cam}", {})
        frames[str(int(frame))] = {
            "pred_mask": encode_rle(_as_numpy_mask(mask)),
            "confidence": float(confidence),
        }
        self._frames[direction].setdefault(take, set()).add(int(frame))

    def _planned(self, direction: str) -> dict[str, Any]:
        """The results of one direction, shaped by the plan (placeholders for frames not predicted)."""
        results: dict[str, Any] = {}
        got = self._masks[direction]
        for take, spec in self.plan["takes"].items():
            masks: dict[str, Any] = {}
            for obj, directions in spec["objects"].items():
                masks[obj] = {}
                for pair, planned_pair in directions.get(direction, {}).items():
                    shape = tuple(planned_pair.get("shape") or (EVAL_LONGEST_SIDE, EVAL_LONGEST_SIDE))
                    entries: dict[str, Any] = {}
                    for frame in map(str, planned_pair["frames"]):
                        entry = got.get(take, {}).get(obj, {}).get(pair, {}).get(frame)
                        if entry is None:
                            entry = {"pred_mask": encode_rle(np.zeros(shape, bool)), "confidence": 0.0}
                            self.filled += 1
                        entries[frame] = entry
                    masks[obj][pair] = entries
            results[take] = {"masks": masks, "subsample_idx": list(spec["subsample_idx"])}
        planned = {
            (take, obj, pair, frame)
            for take, spec in self.plan["takes"].items()
            for obj, directions in spec["objects"].items()
            for pair, planned_pair in directions.get(direction, {}).items()
            for frame in map(str, planned_pair["frames"])
        }
        self.unplanned += sum(
            (take, obj, pair, frame) not in planned
            for take, objs in got.items()
            for obj, pairs in objs.items()
            for pair, frames in pairs.items()
            for frame in frames
        )
        return results

    def to_dict(self) -> dict[str, Any]:
        """The submission as a JSON-ready dict (with a plan: `filled` / `unplanned` count this call's gaps)."""
        self.filled = self.unplanned = 0
        out = {}
        for direction, takes in self._masks.items():
            if self.plan is not None:
                results = self._planned(direction)
            else:
                results = {
                    take: {"masks": masks, "subsample_idx": sorted(self._frames[direction][take])}
                    for take, masks in takes.items()
                }
            out[direction] = {"version": "xx", "challenge": "xx", "results": results}
        return out

    def write(self, path: str | Path) -> None:
        """Write the submission JSON to `path` (parent folders created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
