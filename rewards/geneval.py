"""GenEval as a reward: object presence, counts, colours and relative positions checked by a detector.

The text-to-image reward of Flow-GRPO's `geneval` server, which PDTR's first stage trains on (UniPic 2.0,
UniPic 2.0 paper; served by `omnilab serve reward --config experiments/unipic2/pdtr.yaml --reward geneval`).
GenEval's protocol (Ghosh et al. 2023, its `evaluate_images.py`):

- A prompt comes with GenEval metadata in the sample's json: {"tag": "single_object" | "two_object" |
  "counting" | "colors" | "position" | "color_attr", "include": [{"class", "count", "color"?, "position"?:
  [relation, index of another include]}], "exclude": [{"class", "count"}]}.
- Detector: Mask2Former instance segmentation trained on COCO (GenEval: Swin-S through mmdet; here the same
  architecture through transformers, `Mask2FormerForUniversalSegmentation`, from a weights path), keeping at
  most 16 instances per class above a confidence of 0.3 (0.9 for the counting tag).
- Colour: CLIP zero-shot over 10 colours ("a photo of a {colour} {class}") on the object's box crop with the
  pixels outside its mask set to grey.
- Position: c = centre offset of the two boxes; each axis shrinks by 0.1 (w_a + w_b) (or heights) towards 0;
  normalised by |c|; "left of" / "right of" when the x component is < -0.5 / > 0.5, "above" / "below" likewise.
- An include is met when at least `count` instances are found, the first `count` of them have its colour,
  and they stand in its relation to the first instance of the other include; an exclude is met when fewer
  than `count` are found. The image is correct when all are met.

The score is 1 for a correct image and otherwise the share of requirements met (`partial`; GenEval reports
the 0/1; a partial score gives the policy a gradient between them: our choice). A sample without GenEval
metadata is NaN ("not applicable").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metrics.layout import relative_position  # GenEval's position rule, one place
from rewards.base import Reward, RewardError, check_batch, to_uint8
from rewards.reward_model import resolve_device

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
THRESHOLD, COUNT_THRESHOLD, MAX_OBJECTS = 0.3, 0.9, 16
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Detection:
    """One instance: its class name, confidence, box (x0, y0, x1, y1) in pixels and mask (H x W bool)."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None


def evaluate(
    found: dict[str, list[Detection]], colours: dict[int, str], meta: dict[str, Any]
) -> tuple[int, int]:
    """(requirements met, requirements) of one image: `found` per class (sorted by confidence), `colours`
    the colour of each detection by id()."""
    includes, excludes = list(meta.get("include") or []), list(meta.get("exclude") or [])
    met = 0
    for req in includes:
        objects = found.get(req["class"], [])[: int(req.get("count", 1))]
        ok = len(found.get(req["class"], [])) >= int(req.get("count", 1))
        if ok and req.get("color"):
            ok = all(colours.get(id(o)) == req["color"] for o in objects)
        if ok and req.get("position"):
            relation, index = req["position"]
            targets = found.get(includes[int(index)]["class"], [])
            ok = bool(targets) and all(relation in relative_position(o.box, targets[0].box) for o in objects)
        met += ok
    for req in excludes:
        met += len(found.get(req["class"], [])) < int(req.get("count", 1))
    return met, len(includes) + len(excludes)


class GenEvalReward(Reward):
    """GenEval's checks on generated images (see the module doc): {"score": [N]}, NaN without GenEval metadata.

    Args:
        detector: Mask2Former COCO instance-segmentation weights (hub id or dir with its image processor).
        detector_config: Or a random-init `Mask2FormerConfig` dict (tests), with `image_processor` kwargs.
        colour_model: CLIP weights (hub id or dir with its tokenizer) for the colour check.
        colour_config: Or a random-init `CLIPConfig` dict plus `tokenizer` (a `load_tokenizer` spec).
        threshold: Detection confidence (GenEval 0.3).
        count_threshold: Detection confidence for the counting tag (0.9).
        max_objects: Instances kept per class (16).
        partial: Score the share of requirements met (else GenEval's 0/1).
        device: "auto", "cpu", "cuda:1", ...
        name: The reward's name.
    """

    nan_ok = True

    def __init__(
        self,
        detector: str | None = None,
        detector_config: dict[str, Any] | None = None,
        colour_model: str | None = None,
        colour_config: dict[str, Any] | None = None,
        threshold: float = THRESHOLD,
        count_threshold: float = COUNT_THRESHOLD,
        max_objects: int = MAX_OBJECTS,
        partial: bool = True,
        device: str = "auto",
        name: str = "geneval",
    ) -> None:
        from transformers import (
            AutoImageProcessor,
            AutoTokenizer,
            CLIPConfig,
            CLIPModel,
            Mask2FormerConfig,
            Mask2FormerForUniversalSegmentation,
            Mask2FormerImageProcessorPil,
        )

        from lightning_modules.components.backbones import build_backbone
        from lightning_modules.components.tokenizers import load_tokenizer

        self.device = resolve_device(device)
        if detector is not None:
            self.detector = build_backbone(Mask2FormerForUniversalSegmentation, pretrained=detector)
            self.processor = AutoImageProcessor.from_pretrained(detector)
        elif detector_config is not None:
            cfg = dict(detector_config)
            self.processor = Mask2FormerImageProcessorPil(**cfg.pop("image_processor", {}))
            self.detector = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(**cfg))
        else:
            raise ValueError("GenEvalReward needs `detector` (weights) or `detector_config`")
        if colour_model is not None:
            self.clip = build_backbone(CLIPModel, pretrained=colour_model)
            self.clip_tokenizer = AutoTokenizer.from_pretrained(colour_model)
        elif colour_config is not None:
            cfg = dict(colour_config)
            self.clip_tokenizer = load_tokenizer(cfg.pop("tokenizer", None), "clip")
            self.clip = CLIPModel(CLIPConfig(**cfg))
        else:
            raise ValueError("GenEvalReward needs `colour_model` (CLIP weights) or `colour_config`")
        self.detector.eval().to(self.device)
        self.clip.eval().to(self.device)
        self.labels = {int(k): v for k, v in self.detector.config.id2label.items()}
        self.threshold, self.count_threshold, self.max_objects = threshold, count_threshold, max_objects
        self.partial, self.name = partial, name
        self.clip_size = int(self.clip.config.vision_config.image_size)

    def detect(self, image: Tensor, threshold: float) -> dict[str, list[Detection]]:
        """Instances per class name above `threshold`, highest confidence first, at most max_objects each."""
        rgb = to_uint8(image)
        inputs = self.processor(images=[rgb], return_tensors="pt").to(self.device)
        outputs = self.detector(**inputs)
        (result,) = self.processor.post_process_instance_segmentation(
            outputs, threshold=threshold, target_sizes=[rgb.shape[:2]], return_binary_maps=True
        )
        masks = result["segmentation"]
        found: dict[str, list[Detection]] = {}
        for k, info in enumerate(result["segments_info"]):
            mask = masks[k].bool().cpu().numpy() if masks is not None and len(masks) > k else None
            if mask is None or not mask.any():
                continue
            ys, xs = np.nonzero(mask)
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            det = Detection(
                self.labels.get(int(info["label_id"]), str(info["label_id"])), float(info["score"]), box, mask
            )
            found.setdefault(det.label, []).append(det)
        return {k: sorted(v, key=lambda d: -d.score)[: self.max_objects] for k, v in found.items()}

    def colour(self, image: Tensor, det: Detection) -> str:
        """CLIP's zero-shot colour of a detection (box crop, grey outside the mask)."""
        x0, y0, x1, y1 = (round(v) for v in det.box)
        crop = image[:, y0:y1, x0:x1].float().clone()
        if det.mask is not None:
            keep = torch.from_numpy(det.mask[y0:y1, x0:x1])
            crop[:, ~keep] = 0.0  # mid grey in [-1, 1]
        pixels = F.interpolate(
            crop[None], size=(self.clip_size, self.clip_size), mode="bicubic", antialias=True
        )
        pixels = ((pixels.clamp(-1, 1) + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
            CLIP_STD
        ).view(1, 3, 1, 1)
        texts = [f"a photo of a {c} {det.label}" for c in COLOURS]
        tokens = self.clip_tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
        logits = self.clip(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            pixel_values=pixels.to(self.device),
        ).logits_per_image
        return COLOURS[int(logits[0].argmax())]

    @torch.no_grad()
    def __call__(
        self,
        images: list[Tensor],
        prompts: list[str],
        references: list[list[Tensor]],
        meta: list[dict[str, Any]],
    ) -> dict[str, Tensor]:
        """{"score": [N]}: 1 when every requirement holds, else the share met (or 0); NaN without metadata."""
        n = check_batch(images, prompts, references, meta)
        scores = []
        for image, info in zip(images, meta):
            if not info.get("include") and not info.get("exclude"):
                scores.append(math.nan)
                continue
            try:
                threshold = self.count_threshold if info.get("tag") == "counting" else self.threshold
                found = self.detect(image, threshold)
                colours = {
                    id(o): self.colour(image, o)
                    for req in info.get("include") or []
                    if req.get("color")
                    for o in found.get(req["class"], [])[: int(req.get("count", 1))]
                }
                met, total = evaluate(found, colours, info)
            except (KeyError, TypeError, ValueError, IndexError) as err:
                raise RewardError(
                    f"reward {self.name!r}: GenEval metadata {info!r:.120} is malformed: {err}"
                ) from err
            scores.append(1.0 if met == total else (met / total if self.partial else 0.0))
        return {"score": torch.tensor(scores, dtype=torch.float32).reshape(n)}
