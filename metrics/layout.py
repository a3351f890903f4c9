"""Layout evaluation for SCoT: GenEval's position and counting rules, layout fidelity, and the detectors.

GenEval (Ghosh et al. 2023, its `evaluate_images.py`; docs/methods/scot.md "Evaluation"):
- position: c = centre of box a minus centre of box b; each axis shrinks towards 0 by 0.1 (w_a + w_b)
  (heights for y); normalised by |c|; "left of" / "right of" when the x component is < -0.5 / > 0.5,
  "above" / "below" likewise (image y points down). `relative_position`.
- counting: the prompt's object is found at least `count` times and, through GenEval's `exclude`
  {"class", "count": count + 1}, fewer than count + 1 times (GenEval also raises its detector's threshold
  to 0.9 for this tag): `geneval_correct`.
- an image is correct when every include is met: at least `count` instances, and for a position
  requirement [relation, j] each of the first `count` instances stands in `relation` to the first instance
  of include j.
Layout fidelity (LayoutGPT's protocol): each planned box is matched to a detection of its phrase (Hungarian
matching on IoU within a phrase, `match_boxes`); mIoU is the mean IoU over the planned boxes (0 for an
unmatched one) and `share@0.5` the share of planned boxes whose IoU exceeds 0.5.

Detectors (`Detector`: `detect(image, phrases) -> {phrase: [Detection, ...]}`, highest score first):
- `ColourDetector`, the exact detector of the generated scenes (`omnilab data synth layout`): a phrase that
  names one of the generator's colours ("a red circle") is found as the 8-connected components of the
  pixels within `tau` (RGB distance) of that colour, each at least `min_area` of the image; on a rendered
  scene it returns the rendered boxes exactly. A phrase without a known colour is not detectable by it
  (`supports` says so; the metrics then leave that requirement out and count it).
- `OpenVocabDetector`: an open-vocabulary detector from transformers (OWLv2 / OWL-ViT or Grounding DINO)
  from a weights path or hub id, loaded on first use; a tiny random-init one from `config` for tests.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from torch import Tensor

POSITION_SHRINK = 0.1  # GenEval's evaluate_images.py
IOU_HIT = 0.5
RELATIONS = ("left of", "right of", "above", "below")
Pixels = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    """One detected instance: its phrase, confidence and box (x0, y0, x1, y1) in pixels."""

    phrase: str
    score: float
    box: Pixels


# --------------------------------------------------------------------------- geometry and rules


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when either has no area."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def relative_position(a: Sequence[float], b: Sequence[float], shrink: float = POSITION_SHRINK) -> set[str]:
    """GenEval's relations of box a to box b: a subset of {"left of", "right of", "above", "below"}."""
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    size = np.array([(a[2] - a[0]) + (b[2] - b[0]), (a[3] - a[1]) + (b[3] - b[1])])
    offset = ca - cb
    norm = float(np.linalg.norm(offset))
    revised = np.maximum(np.abs(offset) - shrink * size, 0) * np.sign(offset)
    if norm == 0 or np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / norm
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def geneval_correct(found: dict[str, list[Detection]], meta: dict[str, Any]) -> bool:
    """Whether detections meet GenEval metadata {"include": [{"class", "count", "position"?}], "exclude": [...]}."""
    includes = list(meta.get("include") or [])
    for req in includes:
        count = int(req.get("count", 1))
        objects = found.get(req["class"], [])
        if len(objects) < count:
            return False
        if req.get("position"):
            relation, j = req["position"]
            targets = found.get(includes[int(j)]["class"], [])
            if not targets:
                return False
            if not all(relation in relative_position(o.box, targets[0].box) for o in objects[:count]):
                return False
    return all(
        len(found.get(req["class"], [])) < int(req.get("count", 1)) for req in meta.get("exclude") or []
    )


def match_boxes(planned: Sequence[Sequence[float]], detected: Sequence[Sequence[float]]) -> list[float]:
    """IoU of each planned box with its detection under the Hungarian matching that maximises total IoU (0 if none)."""
    if not planned:
        return []
    if not detected:
        return [0.0] * len(planned)
    cost = np.array([[box_iou(p, d) for d in detected] for p in planned])
    rows, cols = linear_sum_assignment(-cost)
    ious = [0.0] * len(planned)
    for r, c in zip(rows, cols):
        ious[r] = float(cost[r, c])
    return ious


def layout_ious(regions: Sequence[tuple[str, Pixels]], found: dict[str, list[Detection]]) -> list[float]:
    """Per planned (phrase, pixel box): its IoU with the matched detection of the same phrase."""
    by_phrase: dict[str, list[int]] = {}
    for i, (phrase, _) in enumerate(regions):
        by_phrase.setdefault(phrase, []).append(i)
    ious = [0.0] * len(regions)
    for phrase, idx in by_phrase.items():
        matched = match_boxes([regions[i][1] for i in idx], [d.box for d in found.get(phrase, [])])
        for i, v in zip(idx, matched):
            ious[i] = v
    return ious


# --------------------------------------------------------------------------- detectors


class Detector:
    """Base of the detectors: what the layout evaluation asks of one."""

    def supports(self, phrase: str) -> bool:
        """Whether this detector can look for `phrase` at all."""
        raise NotImplementedError

    def detect(self, image: Tensor, phrases: Sequence[str]) -> dict[str, list[Detection]]:
        """Instances of each phrase in a [3, H, W] image in [-1, 1], boxes in its pixels, best first."""
        raise NotImplementedError


def _article(phrase: str) -> str:
    """A phrase without its leading article or count word ("a red circle" -> "red circle")."""
    return re.sub(r"^(?:a|an|the|one|two|three|four|five|six|\d+)\s+", "", phrase.strip().lower())


def _singular(word: str) -> str:
    return word[:-2] if word.endswith(("ches", "shes", "xes")) else word[:-1] if word.endswith("s") else word


class ColourDetector(Detector):
    """The exact detector of the generated layout scenes: connected components of a named colour's pixels.

    Args:
        colours: {colour name: [r, g, b]} (default: the generator's palette, datamodules/synth/multiref.py).
        tau: RGB distance under which a pixel has the colour (the generator draws flat colours).
        min_area: Smallest component kept, as a share of the image's pixels.
    """

    def __init__(
        self, colours: dict[str, list[int]] | None = None, tau: float = 60.0, min_area: float = 0.004
    ) -> None:
        if colours is None:
            from datamodules.synth.multiref import COLOURS

            colours = {k: list(v) for k, v in COLOURS.items()}
        self.colours = {k: np.array(v, np.float32) for k, v in colours.items()}
        self.tau, self.min_area = tau, min_area

    def colour_of(self, phrase: str) -> str | None:
        """The palette colour a phrase names, or None."""
        words = _article(phrase).split()
        return next((w for w in words if w in self.colours), None)

    def supports(self, phrase: str) -> bool:
        """Phrases that name a palette colour."""
        return self.colour_of(phrase) is not None

    def detect(self, image: Tensor, phrases: Sequence[str]) -> dict[str, list[Detection]]:
        """Components of each phrase's colour, largest first (score = the component's share of the image)."""
        rgb = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()
        h, w = rgb.shape[:2]
        out: dict[str, list[Detection]] = {}
        for phrase in dict.fromkeys(phrases):
            colour = self.colour_of(phrase)
            if colour is None:
                continue
            near = np.linalg.norm(rgb - self.colours[colour], axis=-1) < self.tau
            labels, _ = ndimage.label(near, structure=np.ones((3, 3)))
            found = []
            for k, sl in enumerate(ndimage.find_objects(labels), start=1):
                area = int((labels[sl] == k).sum())
                if area < self.min_area * h * w:
                    continue
                ys, xs = sl
                found.append(
                    Detection(
                        phrase,
                        area / (h * w),
                        (float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)),
                    )
                )
            out[phrase] = sorted(found, key=lambda d: -d.score)
        return out


class OpenVocabDetector(Detector):
    """An open-vocabulary detector from transformers: OWLv2 / OWL-ViT or Grounding DINO, queried with the phrases.

    Args:
        pretrained: Weights (hub id or dir with its processor), e.g. google/owlv2-base-patch16-ensemble or
            IDEA-Research/grounding-dino-base; loaded on first use.
        config: Or a random-init config dict for tests: {"model_type": "owlv2" | "grounding-dino", ...} (with
            `tokenizer` and `image_processor` kwargs).
        threshold: Box confidence kept (GenEval's 0.3).
        max_per_phrase: Instances kept per phrase (GenEval: 16).
        device: "cpu", "cuda", ...
    """

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        threshold: float = 0.3,
        max_per_phrase: int = 16,
        device: str = "cpu",
    ) -> None:
        if (pretrained is None) == (config is None):
            raise ValueError("OpenVocabDetector: give exactly one of `pretrained` and `config`")
        self.pretrained, self.config = pretrained, dict(config or {})
        self.threshold, self.max_per_phrase, self.device = threshold, max_per_phrase, device
        self.model: Any = None
        self.processor: Any = None

    def supports(self, phrase: str) -> bool:
        """Any phrase (open vocabulary)."""
        return bool(phrase.strip())

    def load(self) -> None:
        """Build the model and processor (first use)."""
        if self.model is not None:
            return
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        from lightning_modules.components.backbones import build_backbone

        if self.pretrained is not None:
            self.model = build_backbone(AutoModelForZeroShotObjectDetection, pretrained=self.pretrained)
            self.processor = AutoProcessor.from_pretrained(self.pretrained)
        else:
            kind = self.config.get("model_type", "owlv2")
            if kind not in TINY_DETECTORS:
                raise ValueError(
                    f"OpenVocabDetector config model_type {kind!r}: choose {', '.join(TINY_DETECTORS)}"
                )
            self.model, self.processor = TINY_DETECTORS[kind](self.config)
        self.model.eval().to(self.device)

    @torch.no_grad()
    def detect(self, image: Tensor, phrases: Sequence[str]) -> dict[str, list[Detection]]:
        """Boxes of each phrase above `threshold` (post-processed at the image's size), best first."""
        self.load()
        queries = list(dict.fromkeys(_article(p) for p in phrases))
        rgb = (
            ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        )
        h, w = rgb.shape[:2]
        grounding = "grounding" in type(self.model).__name__.lower()
        text: Any = ". ".join(queries) + "." if grounding else [queries]
        inputs = self.processor(images=[rgb], text=text, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        if grounding:
            (result,) = self.processor.post_process_grounded_object_detection(
                outputs, inputs.input_ids, threshold=self.threshold, target_sizes=[(h, w)]
            )
            labels = [
                str(x) for x in (result["text_labels"] if "text_labels" in result else result["labels"])
            ]
            names = [next((q for q in queries if q in label), label) for label in labels]
        else:
            side = max(h, w)  # OWL pads the image to a square at the bottom / right: boxes on that square
            (result,) = self.processor.post_process_grounded_object_detection(
                outputs, threshold=self.threshold, target_sizes=[(side, side)]
            )
            names = [queries[int(i)] for i in result["labels"]]
        out: dict[str, list[Detection]] = {}
        for name, score, box in zip(names, result["scores"].tolist(), result["boxes"].tolist()):
            x0, y0, x1, y1 = (min(max(v, 0.0), s) for v, s in zip(box, (w, h, w, h)))
            if x1 <= x0 or y1 <= y0:
                continue
            for phrase in phrases:
                if _article(phrase) == name:
                    out.setdefault(phrase, []).append(Detection(phrase, float(score), (x0, y0, x1, y1)))
        return {k: sorted(v, key=lambda d: -d.score)[: self.max_per_phrase] for k, v in out.items()}


def _tiny_owlv2(config: dict[str, Any]) -> tuple[Any, Any]:
    """A random-init OWLv2 and its processor from a config dict (tests).

    The offline tokenizer is T5-style (its first token of a query is a word, id > 0): OWL treats a query whose
    first id is 0 as padding, and the offline CLIP-style tokenizer starts every text with id 0.
    """
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    from lightning_modules.components.tokenizers import load_tokenizer

    cfg = dict(config)
    cfg.pop("model_type", None)
    tokenizer = load_tokenizer(cfg.pop("tokenizer", None), "t5")
    image_kwargs = cfg.pop("image_processor", {})
    ids = {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text_config = {**ids, "bos_token_id": None, **cfg.pop("text_config", {})}
    vision_config = cfg.pop("vision_config", {})
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text_config, vision_config=vision_config, **cfg))
    size = int(model.config.vision_config.image_size)
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessorPil(size={"height": size, "width": size}, **image_kwargs),
        tokenizer=tokenizer,
    )
    return model, processor


def _tiny_grounding_dino(config: dict[str, Any]) -> tuple[Any, Any]:
    """A random-init Grounding DINO (Swin image backbone, BERT text backbone) and its processor (tests).

    `backbone_config` / `text_config` are SwinConfig / BertConfig kwargs; the offline T5-style tokenizer stands in
    for BERT's (so the phrase of a box is read back only approximately: fine for a random model). Grounding DINO
    needs d_model divisible by 32 (its GroupNorms) and at least 2 decoder layers (its tied box heads).
    """
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SwinConfig,
    )

    from lightning_modules.components.tokenizers import load_tokenizer

    cfg = dict(config)
    cfg.pop("model_type", None)
    tokenizer = load_tokenizer(cfg.pop("tokenizer", None), "t5")
    image_kwargs = cfg.pop("image_processor", {})
    text = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        **cfg.pop("text_config", {}),
    }
    backbone = SwinConfig(**cfg.pop("backbone_config", {}))
    model_config = GroundingDinoConfig(
        backbone_config=backbone, text_config=BertConfig(**text), use_timm_backbone=False, **cfg
    )
    model = GroundingDinoForObjectDetection(model_config)
    side = int(backbone.image_size)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(
            size={"shortest_edge": side, "longest_edge": side}, **image_kwargs
        ),
        tokenizer=tokenizer,
    )
    return model, processor


TINY_DETECTORS = {"owlv2": _tiny_owlv2, "grounding-dino": _tiny_grounding_dino}


# --------------------------------------------------------------------------- the scores of a batch


def layout_scores(
    image: Tensor,
    regions: Sequence[tuple[str, Sequence[int]]],
    detector: Detector,
    geneval: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Scores of one generated image: "correct" (GenEval rule, NaN without metadata or detectable classes),
    "miou" and "hit" (share of planned boxes with IoU > 0.5; NaN without a detectable plan).

    `regions`: the plan's (phrase, box on the 0-1000 grid); `geneval`: {"tag", "include": [...]}.
    """
    h, w = image.shape[-2:]
    required = [*(geneval or {}).get("include", []), *(geneval or {}).get("exclude", [])]
    phrases = [p for p, _ in regions] + [r["class"] for r in required]
    usable = [p for p in dict.fromkeys(phrases) if detector.supports(p)]
    found = detector.detect(image, usable) if usable else {}
    out = {"correct": float("nan"), "miou": float("nan"), "hit": float("nan")}
    if geneval and required and all(detector.supports(r["class"]) for r in required):
        out["correct"] = float(geneval_correct(found, geneval))
    planned = [
        (p, (b[0] * w / 1000, b[1] * h / 1000, b[2] * w / 1000, b[3] * h / 1000))
        for p, b in regions
        if detector.supports(p)
    ]
    if planned:
        ious = layout_ious(planned, found)
        out["miou"] = float(np.mean(ious))
        out["hit"] = float(np.mean([v > IOU_HIT for v in ious]))
    return out
