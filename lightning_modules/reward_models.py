"""Reward models for image editing on a VLM: the EditReward-style baseline, JRM and SpatialReward.

Three methods (docs/methods/jrm.md, docs/methods/spatialreward.md), one backbone builder
(`components.vlm.build_vlm`: Qwen2.5-VL or Qwen3-VL, `pretrained` or a tiny `config`):

- `PreferenceRewardModel`, the discriminative baseline (EditReward, arXiv 2509.26346): a reward token
  `<|Reward|>` ends each rubric prompt; an MLP head per rubric (hidden -> 1024 -> ReLU -> Dropout(0.05)
  -> 16 -> ReLU -> 2, fp32) reads the last hidden state there and gives (mu, log sigma); the heads'
  outputs are pooled (mean / min / sum) and one preference loss is applied to the pooled output: plain
  Bradley-Terry, BT with a margin, Rao-Kupper ties (theta) or the uncertainty-aware BT estimated by
  Monte Carlo. Each rubric is its own backbone pass (2 rubrics x 2 candidates = 4 passes per pair).
  The score at inference is the pooled mu.
- `JointRewardModel`, JRM (arXiv 2602.07533): the same backbone trained jointly on preference (the
  head, as above) and language modelling on rationale text: L = L_pref + lambda L_LM, with the LM loss
  on the rationale (assistant) tokens only, from a second sequence [images, instruction] -> rationale
  (the reward token is never placed after a rationale: inference runs without one). Inference reads
  only the head, so it costs what the baseline costs.
- `SpatialRewardModel`, SpatialReward (arXiv 2602.07458): a generative judge, fine-tuned (SFT, LoRA
  r 32 / alpha 64 in the paper) to answer two prompts with a JSON verdict: semantic consistency (SC)
  `{"edit_region": [{"id", "label", "bbox_2d": [x1, y1, x2, y2]}], "reasoning", "score": [success,
  overediting]}` with boxes on the 0-1000 grid (`[]` when the edit failed) and reasoning that cites
  regions as `<|bbox_i|>` and the overall judgement as `<|global|>`; perceptual quality (PQ)
  `{"reasoning", "score": [naturalness, artifacts]}`; scores on 0-25. The reward is
  SC = (0.6 success + 0.4 overediting) / 2.5, PQ = (0.5 naturalness + 0.5 artifacts) / 2.5 (each
  clipped to [0, 10]), R = SC^0.8 PQ^0.2 / 10. A verdict that does not parse strictly is an error value
  (`VerdictError`), counted, never a score. Its second stage (GRPO in ms-swift with a Gemini-judged
  consistency reward) is not built here: see docs/methods/spatialreward.md.

The losses and the verdict rules are pure functions at the top of the file, each tested against a
value worked by hand from its formula (tests/lightning_modules/test_reward_models.py).

Batches come from `datamodules.preference.PreferenceDataModule`: training batches are pairs (chosen,
rejected, tie flag, rationales, verdicts), evaluation batches are items (K candidates and their human
tiers), scored candidate by candidate and handed to the ranking metrics of `metrics/preference.py`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.components.vlm import Conversation, VisionLanguageModel, build_vlm, lm_loss
from lightning_modules.flow_edit import lr_factor
from omnilab.seeding import torch_generator

# --- preference losses (Δ = r_A - r_B, A the preferred item) -------------------------------------------

LOSSES = ("bt", "bt_margin", "rao_kupper", "uncertainty")
POOLING = ("mean", "min", "sum")
EDITREWARD_MARGIN = 0.57  # EditReward's `constant_margin`
RAO_KUPPER_THETA = 5.0  # EditReward's `btt` loss


def bt_loss(delta: Tensor) -> Tensor:
    """Bradley-Terry: L = mean(-log σ(Δ))."""
    return -F.logsigmoid(delta.float()).mean()


def bt_margin_loss(delta: Tensor, margin: float | Tensor = EDITREWARD_MARGIN) -> Tensor:
    """Bradley-Terry with a margin: L = mean(-log σ(Δ - m))."""
    return -F.logsigmoid(delta.float() - margin).mean()


def rao_kupper_loss(delta: Tensor, tie: Tensor, theta: float = RAO_KUPPER_THETA) -> Tensor:
    """Rao-Kupper ties (θ > 1): P(A≻B) = σ(Δ - log θ), P(tie) = (θ² - 1) σ(Δ - log θ) σ(-Δ - log θ).

    L = mean over pairs of -log P: for a strict pair -log σ(Δ - log θ); for a tie
    -log σ(Δ - log θ) - log σ(-Δ - log θ) - log(θ² - 1).
    """
    if theta <= 1:
        raise ValueError(f"Rao-Kupper needs theta > 1, got {theta}")
    delta, log_theta = delta.float(), math.log(theta)
    win = -F.logsigmoid(delta - log_theta)
    tied = win - F.logsigmoid(-delta - log_theta) - math.log(theta**2 - 1)
    return torch.where(tie.to(delta.device), tied, win).mean()


def uncertainty_bt_loss(
    mu_a: Tensor,
    log_sigma_a: Tensor,
    mu_b: Tensor,
    log_sigma_b: Tensor,
    samples: int = 1000,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Uncertainty-aware BT (EditReward / HPSv3): L = mean over pairs of E_z[-log σ(z)], z ~ N(μ_A - μ_B, σ_A² + σ_B²).

    The expectation is a Monte Carlo mean over `samples` draws z = (μ_A - μ_B) + sqrt(σ_A² + σ_B²) ε,
    ε ~ N(0, 1) from `generator` (a fixed generator gives a fixed estimate); fp32 throughout (the
    reference code draws its 1000 samples in fp16).
    """
    delta = (mu_a - mu_b).float()
    std = torch.sqrt(torch.exp(2 * log_sigma_a.float()) + torch.exp(2 * log_sigma_b.float()))
    eps = torch.randn(
        (*delta.shape, samples), generator=generator, device=generator.device if generator else None
    ).to(delta.device)
    z = delta[..., None] + std[..., None] * eps
    return -F.logsigmoid(z).mean()


def joint_loss(pref: Tensor, lm: Tensor, lm_weight: float) -> Tensor:
    """JRM's objective: L = L_pref + λ L_LM."""
    return pref + lm_weight * lm


def pool_heads(outputs: Tensor, strategy: str = "mean") -> Tensor:
    """Fuse the heads' (μ, log σ) [N, H, 2] into one [N, 2] elementwise: mean, min or sum over heads."""
    if strategy == "mean":
        return outputs.mean(1)
    if strategy == "min":
        return outputs.min(1).values
    if strategy == "sum":
        return outputs.sum(1)
    raise ValueError(f"pooling {strategy!r}: choose one of {', '.join(POOLING)}")


# --- SpatialReward: the verdict and the reward -------------------------------------------------------------

GRID = 1000  # boxes are normalized to 0..1000
SCORE_RANGE = 25
SC_WEIGHTS = (0.6, 0.4)  # success, overediting
PQ_WEIGHTS = (0.5, 0.5)  # naturalness, artifacts
SC_EXPONENT = 0.8  # R = SC^a PQ^(1 - a) / 10
BBOX_REF = re.compile(r"<\|bbox_(\d+)\|>")
FENCE = re.compile(r"\A```(?:json)?\s*\n(.*)\n```\Z", re.S)
VerdictKind = Literal["sc", "pq"]
VERDICT_KEYS = {"sc": ("edit_region", "reasoning", "score"), "pq": ("reasoning", "score")}


@dataclass(frozen=True)
class Region:
    """One edit region of a verdict: its id, label and box [x1, y1, x2, y2] on the 0-1000 grid."""

    id: int
    label: str
    bbox: tuple[float, float, float, float]


@dataclass(frozen=True)
class Verdict:
    """A parsed verdict: the prompt kind ("sc" or "pq"), edit regions (SC), reasoning, the two scores."""

    kind: str
    regions: tuple[Region, ...]
    reasoning: str
    scores: tuple[float, float]


@dataclass(frozen=True)
class VerdictError:
    """A judge answer that is not a valid verdict: why, and the text (never turned into a score)."""

    reason: str
    text: str

    def __bool__(self) -> bool:
        return False


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_box(box: Any, what: str = "box") -> tuple[float, float, float, float]:
    """A [x1, y1, x2, y2] box on the 0-1000 grid (x1 < x2, y1 < y2), else ValueError naming it."""
    if not isinstance(box, list | tuple) or len(box) != 4 or not all(_number(v) for v in box):
        raise ValueError(f"{what} {box!r} is not four numbers [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (float(v) for v in box)
    if min(x1, y1, x2, y2) < 0 or max(x1, y1, x2, y2) > GRID:
        raise ValueError(f"{what} {list(box)} is outside the 0-{GRID} grid")
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"{what} {list(box)} is empty or inverted (needs x1 < x2 and y1 < y2)")
    return x1, y1, x2, y2


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_verdict(text: str, kind: VerdictKind, score_range: float = SCORE_RANGE) -> Verdict | VerdictError:
    """The verdict in a judge's answer, or a `VerdictError` saying why not (never raises on bad text).

    Strict: the answer is exactly one JSON object (optionally in one ```json fence), with exactly the
    keys of its kind (SC: edit_region, reasoning, score; PQ: reasoning, score); `score` is two numbers
    in [0, score_range]; every region has exactly id (int), label (str) and bbox_2d (a box on the
    0-1000 grid), ids unique; every `<|bbox_i|>` the reasoning cites is a region's id.
    """
    if kind not in VERDICT_KEYS:
        raise ValueError(f"verdict kind {kind!r}: choose sc or pq")
    body = text.strip()
    if fence := FENCE.match(body):
        body = fence.group(1).strip()
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except ValueError as err:
        return VerdictError(f"not JSON: {err}", text)
    if not isinstance(data, dict):
        return VerdictError(f"the answer is a JSON {type(data).__name__}, not an object", text)
    keys = VERDICT_KEYS[kind]
    if sorted(data) != sorted(keys):
        return VerdictError(f"{kind.upper()} verdict keys {sorted(data)} != {sorted(keys)}", text)
    scores, reasoning = data["score"], data["reasoning"]
    if not isinstance(reasoning, str):
        return VerdictError("reasoning is not a string", text)
    if not isinstance(scores, list) or len(scores) != 2 or not all(_number(s) for s in scores):
        return VerdictError(f"score {scores!r} is not two numbers", text)
    if not all(0 <= s <= score_range for s in scores):
        return VerdictError(f"score {scores} is outside [0, {score_range:g}]", text)
    regions: list[Region] = []
    if kind == "sc":
        raw = data["edit_region"]
        if not isinstance(raw, list):
            return VerdictError("edit_region is not a list", text)
        for i, region in enumerate(raw):
            if not isinstance(region, dict) or sorted(region) != ["bbox_2d", "id", "label"]:
                return VerdictError(f"edit_region[{i}] must have exactly id, label, bbox_2d", text)
            ident, label = region["id"], region["label"]
            if not isinstance(ident, int) or isinstance(ident, bool) or not isinstance(label, str):
                return VerdictError(f"edit_region[{i}]: id must be an int and label a string", text)
            try:
                box = check_box(region["bbox_2d"], f"edit_region[{i}] bbox_2d")
            except ValueError as err:
                return VerdictError(str(err), text)
            regions.append(Region(ident, label, box))
        ids = [r.id for r in regions]
        if len(set(ids)) != len(ids):
            return VerdictError(f"edit_region ids {ids} repeat", text)
        cited = {int(m) for m in BBOX_REF.findall(reasoning)}
        if cited - set(ids):
            return VerdictError(
                f"the reasoning cites <|bbox_{min(cited - set(ids))}|>, which no region has", text
            )
    return Verdict(kind, tuple(regions), reasoning, (float(scores[0]), float(scores[1])))


def format_verdict(verdict: Verdict | dict[str, Any], boxes: bool = True) -> str:
    """The JSON text of a verdict (the SFT target); `boxes=False` leaves SC's edit regions out (`[]`)
    and drops the `<|bbox_i|>` citations from the reasoning (the no-box ablation)."""
    if isinstance(verdict, dict):
        kind = "sc" if "edit_region" in verdict else "pq"
        verdict = Verdict(
            kind,
            tuple(
                Region(int(r["id"]), str(r["label"]), tuple(r["bbox_2d"]))
                for r in verdict.get("edit_region", [])
            ),
            str(verdict["reasoning"]),
            tuple(verdict["score"]),
        )
    reasoning = verdict.reasoning if boxes else re.sub(r"<\|bbox_\d+\|>\s*", "", verdict.reasoning)

    def num(v: float) -> int | float:
        return int(v) if float(v).is_integer() else float(v)

    out: dict[str, Any] = {}
    if verdict.kind == "sc":
        out["edit_region"] = (
            [{"id": r.id, "label": r.label, "bbox_2d": [num(v) for v in r.bbox]} for r in verdict.regions]
            if boxes
            else []
        )
    out["reasoning"] = reasoning
    out["score"] = [num(s) for s in verdict.scores]
    return json.dumps(out, ensure_ascii=False)


def sc_score(success: float, overediting: float, score_range: float = SCORE_RANGE) -> float:
    """SC = (0.6 success + 0.4 overediting) / (range / 10), clipped to [0, 10]."""
    w1, w2 = SC_WEIGHTS
    return min(10.0, max(0.0, (w1 * success + w2 * overediting) / (score_range / 10)))


def pq_score(naturalness: float, artifacts: float, score_range: float = SCORE_RANGE) -> float:
    """PQ = (0.5 naturalness + 0.5 artifacts) / (range / 10), clipped to [0, 10]."""
    w3, w4 = PQ_WEIGHTS
    return min(10.0, max(0.0, (w3 * naturalness + w4 * artifacts) / (score_range / 10)))


def spatial_reward(sc: float, pq: float, exponent: float = SC_EXPONENT) -> float:
    """SpatialReward's RL reward R = SC^a · PQ^(1 - a) / 10 (a = 0.8), in [0, 1] for SC, PQ in [0, 10]."""
    return (sc**exponent) * (pq ** (1 - exponent)) / 10


def verdict_reward(
    sc: Verdict | VerdictError, pq: Verdict | VerdictError, score_range: float = SCORE_RANGE
) -> float:
    """R of an (SC, PQ) verdict pair; NaN when either is a `VerdictError` (the caller counts it)."""
    if not isinstance(sc, Verdict) or not isinstance(pq, Verdict):
        return math.nan
    return spatial_reward(sc_score(*sc.scores, score_range), pq_score(*pq.scores, score_range))


# --- prompts ------------------------------------------------------------------------------------------------

SYSTEM = "You are an expert judge of image edits."
RUBRICS = {
    "instruction": (
        "The first image is the source and the last image is its edited version. Editing instruction: "
        "{instruction}\nRate how well the edit follows the instruction and keeps everything the instruction "
        "does not mention unchanged, from 1 (not at all) to 4 (perfectly)."
    ),
    "quality": (
        "The first image is the source and the last image is its edited version. Editing instruction: "
        "{instruction}\nRate the visual quality of the edited image from 1 (poor) to 4 (excellent): "
        "natural lighting and geometry, no artifacts, distortion or blur."
    ),
}
REWARD_SUFFIX = "\nPlease provide the overall ratings of this image: {token}"
RATIONALE_PROMPT = (
    "The first image is the source and the last image is its edited version. Editing instruction: "
    "{instruction}\nExplain whether the edit follows the instruction, what else changed, and how natural "
    "the result looks."
)
SC_PROMPT = (
    "You judge image edits. Two images follow: the original and its edited version. Find the edited "
    "region(s) of the second image and judge the edit.\nAnswer with one JSON object and nothing else:\n"
    '{{"edit_region": [{{"id": 0, "label": "what changed", "bbox_2d": [x1, y1, x2, y2]}}], '
    '"reasoning": "...", "score": [success, overediting]}}\n'
    "Boxes are on a 0-1000 grid (0 = left/top, 1000 = right/bottom); use [] for edit_region when the two "
    "images look the same (the edit failed). success: 0 (the instruction is not followed) to {score_range} "
    "(followed perfectly); overediting: 0 (the image is a different scene) to {score_range} (a minimal, "
    "effective edit). In the reasoning, write <|bbox_id|> before describing region id and <|global|> "
    "before the overall judgement.\nEditing instruction: {instruction}"
)
PQ_PROMPT = (
    "You judge generated images. Answer with one JSON object and nothing else:\n"
    '{{"reasoning": "...", "score": [naturalness, artifacts]}}\n'
    "naturalness: 0 (unnatural lighting, shadows or distances) to {score_range} (looks natural); "
    "artifacts: 0 (heavy distortion, blur, watermarks, broken shapes) to {score_range} (no artifacts)."
)


def _source_labels(n_sources: int) -> list[str]:
    """Labels written before the images: the sources, then the candidate."""
    if n_sources == 1:
        return ["Source image: ", "Edited image: "]
    return [f"Input image {k + 1}: " for k in range(n_sources)] + ["Output image: "]


# --- the modules ---------------------------------------------------------------------------------------------


class RewardHead(nn.Module):
    """EditReward's head: hidden -> 1024 -> ReLU -> Dropout -> 16 -> ReLU -> 2 (μ, log σ), run in fp32."""

    def __init__(self, hidden: int, widths: Sequence[int] = (1024, 16), dropout: float = 0.05) -> None:
        super().__init__()
        w1, w2 = widths
        self.net = nn.Sequential(
            nn.Linear(hidden, w1),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(w1, w2),
            nn.ReLU(),
            nn.Linear(w2, 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        """[N, hidden] -> [N, 2] = (μ, log σ), in fp32 whatever the autocast."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.net.float()(x.float())


def check_master_weights(module: nn.Module) -> None:
    """ValueError naming trainable parameters held in bf16/fp16: the optimizer would update them in place.

    AdamW's step is about the learning rate; a bf16 weight w moves only by at least ~|w| / 256, so EditReward's
    2e-6 on weights ~1e-2 rounds to no change. Trainable weights are kept in fp32 (the master weights DeepSpeed's
    bf16 mode keeps for EditReward; LLaMA-Factory's fp32 LoRA adapters) and bf16-mixed computes in bf16.
    """
    half = [
        (name, p.dtype)
        for name, p in module.named_parameters()
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)
    ]
    if half:
        raise ValueError(
            f"{len(half)} trainable parameters are stored in {half[0][1]} (first: {half[0][0]}): optimizer steps "
            "below their resolution would be lost. Load the backbone in fp32 (`backbone: {load: {dtype: float32}}`); "
            "`precision: bf16-mixed` computes in bf16."
        )


class _VLMModule(L.LightningModule):
    """What the three reward models share: the VLM, LoRA, freezing, the optimizer, item evaluation."""

    def __init__(
        self,
        backbone: dict[str, Any],
        lr: float,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        lora: dict[str, Any] | None = None,
        freeze_vision: bool = False,
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule {lr_schedule!r}: choose constant or cosine")
        self.backbone_spec = dict(backbone)
        self.lr, self.weight_decay, self.warmup_steps, self.lr_schedule = (
            lr,
            weight_decay,
            warmup_steps,
            lr_schedule,
        )
        self.lora, self.freeze_vision, self.gradient_checkpointing = (
            lora,
            freeze_vision,
            gradient_checkpointing,
        )
        self.seed = seed
        self.vlm: VisionLanguageModel | None = None
        self.parse_failures = 0  # judge answers that did not parse (SpatialReward)
        from metrics.preference import PreferenceMetrics

        self.val_metrics, self.test_metrics = PreferenceMetrics(), PreferenceMetrics()

    def added_tokens(self) -> list[str]:
        """Special tokens this model adds to the tokenizer."""
        return []

    def build_backbone(self) -> None:
        """Build the VLM (idempotent), then LoRA / frozen vision / checkpointing as configured."""
        if self.vlm is not None:
            return
        spec = {"family": "qwen2_5_vl", **self.backbone_spec}
        self.vlm = build_vlm(**spec, added_tokens=self.added_tokens())
        model = self.vlm.model
        if self.lora:
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(**self.lora), model)
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
                if "lora_" in name:  # fp32 adapters over a bf16 base, as LLaMA-Factory trains them
                    p.data = p.data.float()
        if self.freeze_vision:
            model.model.visual.requires_grad_(False)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (subclasses add their heads and token embeddings)."""
        return [{"params": [p for p in self.vlm.parameters() if p.requires_grad], "lr": self.lr}]

    def configure_optimizers(self) -> Any:
        """AdamW over the trainable parameters; linear warm-up, then constant or cosine, stepped per step."""
        groups = [g for g in self.param_groups() if g["params"]]
        check_master_weights(self)
        optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        total = int(total) if total is not None and math.isfinite(total) else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.warmup_steps, total, self.lr_schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- scoring edits (the reward interface) and evaluation on items
    def score_edits(
        self, sources: Sequence[Sequence[Tensor]], instructions: Sequence[str], images: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        """Score N edited images, each with its source image(s) and instruction: {"score": [N], ...} (fp32)."""
        raise NotImplementedError

    def score_items(self, batch: dict[str, Any]) -> list[Tensor]:
        """Each item's candidate scores ([K_i] fp32; NaN where a judge answer did not parse)."""
        sources, instructions, images, sizes = [], [], [], []
        for src, instruction, candidates in zip(batch["sources"], batch["instruction"], batch["candidates"]):
            for image in candidates:
                sources.append(src)
                instructions.append(instruction)
                images.append(image)
            sizes.append(len(candidates))
        scores = self.score_edits(sources, instructions, images)["score"].float().cpu()
        return list(torch.split(scores, sizes))

    def on_validation_epoch_start(self) -> None:
        """Forget the previous validation's items."""
        self.val_metrics.reset()

    def on_test_epoch_start(self) -> None:
        """Forget the previous test's items."""
        self.test_metrics.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Score every candidate of the held-out items."""
        with torch.no_grad():
            self.val_metrics.update(self.score_items(batch), batch["tiers"], batch["meta"])

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Score every candidate of the benchmark items."""
        with torch.no_grad():
            self.test_metrics.update(self.score_items(batch), batch["tiers"], batch["meta"])

    def _report(self, prefix: str, metrics: Any, table: bool) -> dict[str, float]:
        values, text = metrics.compute()
        values = {f"{prefix}/{k}": v for k, v in values.items()}
        for key, value in values.items():
            if math.isfinite(value):
                self.log(key, value, batch_size=1)
        if table and text and self.trainer.is_global_zero:
            print(text, flush=True)
            _log_table(self, f"{prefix}_benchmark.md", text)
        return values

    def on_validation_epoch_end(self) -> None:
        """Log val/pair_accuracy (the checkpoint monitor) and the other ranking metrics."""
        if not self.trainer.sanity_checking:
            self._report("val", self.val_metrics, table=False)

    def on_test_epoch_end(self) -> None:
        """Log the benchmark metrics, print the table and save it with the run."""
        self._report("test", self.test_metrics, table=True)


def _log_table(module: L.LightningModule, name: str, text: str) -> None:
    """Save a table as an MLflow artifact when the run logs to MLflow (else only printed)."""
    from lightning.pytorch.loggers import MLFlowLogger

    for logger in module.loggers:
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_text(logger.run_id, text, f"tables/{name}")


class PreferenceRewardModel(_VLMModule):
    """The discriminative reward model (EditReward-style): rubric prompts ending in a reward token, MLP heads.

    Args:
        backbone: The VLM: `{family: qwen2_5_vl | qwen3_vl, pretrained: <hub id or dir> | config: {...},
            tokenizer: {...}, image_processor: {min_pixels, max_pixels, ...}, load: {dtype: ...}}`
            (`components.vlm.build_vlm`).
        rubrics: {head name: rubric prompt with `{instruction}`}; one head and one backbone pass per rubric
            (EditReward: instruction following and visual quality).
        pooling: How the heads' (μ, log σ) fuse: "mean" (EditReward), "min" or "sum".
        loss: "uncertainty" (EditReward's default), "bt", "bt_margin" or "rao_kupper".
        margin: m of "bt_margin" (EditReward's constant margin 0.57).
        theta: θ of "rao_kupper" (EditReward's btt: 5).
        mc_samples: Monte Carlo samples of "uncertainty" (1000).
        head_widths: The head's two hidden widths (1024, 16).
        head_dropout: The head's dropout (0.05).
        reward_token: The special token the heads read (added to the tokenizer).
        system_prompt: The system prompt of every conversation.
        lr: Learning rate of the backbone (EditReward: 2e-6, full fine-tuning).
        head_lr: Learning rate of the heads (None: lr).
        special_token_lr: Learning rate of the reward token's embedding (EditReward: 2e-6), trained as its
            own offset added to that token's input embedding.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps (EditReward: 5% of training).
        lr_schedule: "constant" (EditReward: constant with warm-up) or "cosine".
        lora: peft `LoraConfig` kwargs; when set, only LoRA parameters of the backbone train.
        freeze_vision: Freeze the vision tower.
        gradient_checkpointing: Recompute the backbone's blocks in the backward pass.
        seed: Seed of the Monte Carlo draws.
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        rubrics: dict[str, str] | None = None,
        pooling: Literal["mean", "min", "sum"] = "mean",
        loss: Literal["bt", "bt_margin", "rao_kupper", "uncertainty"] = "uncertainty",
        margin: float = EDITREWARD_MARGIN,
        theta: float = RAO_KUPPER_THETA,
        mc_samples: int = 1000,
        head_widths: tuple[int, int] = (1024, 16),
        head_dropout: float = 0.05,
        reward_token: str = "<|Reward|>",
        system_prompt: str = SYSTEM,
        lr: float = 2e-6,
        head_lr: float | None = None,
        special_token_lr: float = 2e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        lora: dict[str, Any] | None = None,
        freeze_vision: bool = False,
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone, lr, weight_decay, warmup_steps, lr_schedule, lora, freeze_vision, gradient_checkpointing, seed)  # fmt: skip
        self.save_hyperparameters()
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r}: choose one of {', '.join(LOSSES)}")
        if pooling not in POOLING:
            raise ValueError(f"pooling {pooling!r}: choose one of {', '.join(POOLING)}")
        self.rubrics = dict(rubrics) if rubrics is not None else dict(RUBRICS)
        if not self.rubrics or any("{instruction}" not in r for r in self.rubrics.values()):
            raise ValueError("rubrics must be a non-empty {name: prompt} whose prompts contain {instruction}")
        self.pooling, self.loss_kind, self.margin, self.theta = pooling, loss, margin, theta
        self.mc_samples, self.head_widths, self.head_dropout = mc_samples, tuple(head_widths), head_dropout
        self.reward_token, self.system_prompt = reward_token, system_prompt
        self.head_lr, self.special_token_lr = head_lr, special_token_lr
        self.heads: nn.ModuleDict | None = None
        self.token_offset: nn.Parameter | None = None

    def added_tokens(self) -> list[str]:
        """The reward token."""
        return [self.reward_token]

    def configure_model(self) -> None:
        """Build the VLM, one head per rubric and the reward token's embedding offset (idempotent)."""
        if self.heads is not None:
            return
        self.build_backbone()
        hidden = self.vlm.model.config.get_text_config().hidden_size
        self.heads = nn.ModuleDict(
            {name: RewardHead(hidden, self.head_widths, self.head_dropout) for name in self.rubrics}
        )
        self.token_offset = nn.Parameter(torch.zeros(hidden))
        self.reward_token_id = int(self.vlm.tokenizer.convert_tokens_to_ids(self.reward_token))
        self.vlm.model.get_input_embeddings().register_forward_hook(self._add_token_offset)

    def _add_token_offset(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        """Input embeddings + the trained offset at the reward token."""
        at = (args[0] == self.reward_token_id).unsqueeze(-1)
        return output + at.to(output.dtype) * self.token_offset.to(output.dtype)

    def param_groups(self) -> list[dict[str, Any]]:
        """Backbone at lr, heads at head_lr, the reward token's embedding offset at special_token_lr."""
        return [
            *super().param_groups(),
            {"params": list(self.heads.parameters()), "lr": self.head_lr or self.lr},
            {"params": [self.token_offset], "lr": self.special_token_lr, "weight_decay": 0.0},
        ]

    def conversation(
        self, sources: Sequence[Tensor], instruction: str, image: Tensor, rubric: str
    ) -> Conversation:
        """One rubric pass: [sources..., candidate] + the rubric + the reward token."""
        text = rubric.format(instruction=instruction) + REWARD_SUFFIX.format(token=self.reward_token)
        return Conversation(
            images=[*sources, image],
            labels=_source_labels(len(sources)),
            text=text,
            system=self.system_prompt,
        )

    def head_outputs(
        self, sources: Sequence[Sequence[Tensor]], instructions: Sequence[str], images: Sequence[Tensor]
    ) -> Tensor:
        """The pooled (μ, log σ) [N, 2] of N candidates: one pass per rubric, each read by its head."""
        names = list(self.heads)
        convs = [
            self.conversation(src, instruction, image, self.rubrics[name])
            for name in names
            for src, instruction, image in zip(sources, instructions, images)
        ]
        inputs = self.vlm.inputs(convs)
        hidden = self.vlm.hidden_states(inputs)
        at = inputs["input_ids"] == self.reward_token_id
        if not bool((at.sum(1) == 1).all()):
            raise ValueError(f"every rubric pass must hold the reward token {self.reward_token} exactly once")
        pooled_hidden = hidden[at]  # [H * N, D] in rubric-major order
        n = len(images)
        outputs = torch.stack(
            [self.heads[name](pooled_hidden[k * n : (k + 1) * n]) for k, name in enumerate(names)], 1
        )
        return pool_heads(outputs, self.pooling)

    def score_edits(
        self, sources: Sequence[Sequence[Tensor]], instructions: Sequence[str], images: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        """{"score": μ [N], "log_sigma": [N]}: the pooled head output."""
        out = self.head_outputs(sources, instructions, images)
        return {"score": out[:, 0], "log_sigma": out[:, 1]}

    def preference_loss(self, chosen: Tensor, rejected: Tensor, tie: Tensor) -> Tensor:
        """The configured loss of pooled (μ, log σ) [B, 2] pairs; ties enter only Rao-Kupper (else left out)."""
        delta = chosen[:, 0] - rejected[:, 0]
        if self.loss_kind == "rao_kupper":
            return rao_kupper_loss(delta, tie, self.theta)
        keep = ~tie.to(delta.device)
        if not bool(keep.any()):
            return delta.sum() * 0.0  # only tied pairs: nothing to learn from without a tie model
        if self.loss_kind == "bt":
            return bt_loss(delta[keep])
        if self.loss_kind == "bt_margin":
            return bt_margin_loss(delta[keep], self.margin)
        generator = torch_generator(self.seed, "mc", self.global_step)
        c, r = chosen[keep], rejected[keep]
        return uncertainty_bt_loss(c[:, 0], c[:, 1], r[:, 0], r[:, 1], self.mc_samples, generator)

    def pair_outputs(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Pooled (μ, log σ) of the chosen and rejected candidates of a pair batch, in one forward pass."""
        n = len(batch["chosen"])
        out = self.head_outputs(
            [*batch["sources"], *batch["sources"]],
            [*batch["instruction"], *batch["instruction"]],
            [*batch["chosen"], *batch["rejected"]],
        )
        return out[:n], out[n:]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """L_pref on the batch's pairs; logs train/loss and train/pair_accuracy (strict pairs)."""
        chosen, rejected = self.pair_outputs(batch)
        loss = self.preference_loss(chosen, rejected, batch["tie"])
        self._log_pairs(chosen, rejected, batch["tie"], loss)
        return loss

    def _log_pairs(self, chosen: Tensor, rejected: Tensor, tie: Tensor, loss: Tensor) -> None:
        strict = ~tie.to(chosen.device)
        n = len(tie)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        if bool(strict.any()):
            acc = (chosen[strict, 0] > rejected[strict, 0]).float().mean()
            self.log("train/pair_accuracy", acc, batch_size=int(strict.sum()))


class JointRewardModel(PreferenceRewardModel):
    """JRM: the discriminative model trained jointly with language modelling on rationales, L = L_pref + λ L_LM.

    The LM term is the cross-entropy of each candidate's rationale (the assistant tokens only) given
    [source images, candidate, rationale prompt] on the same backbone; pairs without rationales add
    nothing to it. Inference is the parent's: the head only.

    Args:
        lm_weight: λ (the notes suggest sweeping 0.01-1; GRM's weight_ratio 0.01 is the nearest published value).
        rationale_prompt: The user text of the generative sequence, with `{instruction}`.
        **kwargs: `PreferenceRewardModel` arguments.
    """

    def __init__(
        self, lm_weight: float = 0.1, rationale_prompt: str = RATIONALE_PROMPT, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if lm_weight < 0:
            raise ValueError(f"lm_weight must be >= 0, got {lm_weight}")
        if "{instruction}" not in rationale_prompt:
            raise ValueError("rationale_prompt must contain {instruction}")
        self.lm_weight, self.rationale_prompt = lm_weight, rationale_prompt

    def rationale_loss(self, batch: dict[str, Any]) -> Tensor | None:
        """L_LM over the batch's candidates that have a rationale (None when none has one)."""
        convs = []
        for side in ("chosen", "rejected"):
            for src, instruction, image, rationale in zip(
                batch["sources"], batch["instruction"], batch[side], batch[f"{side}_rationale"]
            ):
                if rationale:
                    convs.append(
                        Conversation(
                            images=[*src, image],
                            labels=_source_labels(len(src)),
                            text=self.rationale_prompt.format(instruction=instruction),
                            system=self.system_prompt,
                            answer=rationale,
                        )
                    )
        if not convs:
            return None
        inputs = self.vlm.inputs(convs, with_answer=True)
        return lm_loss(self.vlm.logits(self.vlm.hidden_states(inputs)), inputs["labels"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """L = L_pref + λ L_LM; logs both terms."""
        chosen, rejected = self.pair_outputs(batch)
        pref = self.preference_loss(chosen, rejected, batch["tie"])
        lm = self.rationale_loss(batch) if self.lm_weight > 0 else None
        loss = joint_loss(pref, lm, self.lm_weight) if lm is not None else pref
        self._log_pairs(chosen, rejected, batch["tie"], loss)
        n = len(batch["tie"])
        self.log("train/pref_loss", pref.detach(), batch_size=n)
        if lm is not None:
            self.log("train/lm_loss", lm.detach(), batch_size=n)
        return loss


# Qwen's language-model projections (all linear layers of the LLM, LLaMA-Factory's `lora_target: all`
# without the vision tower, which LLaMA-Factory freezes by default)
LM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
SPATIALREWARD_LORA = {"r": 32, "lora_alpha": 64, "lora_dropout": 0.05, "target_modules": LM_LORA_TARGETS}


class SpatialRewardModel(_VLMModule):
    """SpatialReward: a generative judge fine-tuned to answer the SC and PQ prompts with JSON verdicts.

    Training (SFT): for each candidate with a target verdict ({"sc": {...}, "pq": {...}} in the data), the
    cross-entropy of the SC verdict given [sources..., candidate, SC prompt] and of the PQ verdict given
    [candidate, PQ prompt], on the answer tokens only. Scoring: greedy verdicts, parsed strictly; the
    reward SC^0.8 PQ^0.2 / 10; an answer that does not parse gives NaN and is counted (`parse_failures`).

    Args:
        backbone: The VLM (`components.vlm.build_vlm`; the paper: Qwen3-VL-8B-Instruct).
        lora: peft `LoraConfig` kwargs (the paper: r 32, alpha 64, dropout 0.05 on all LLM linear layers);
            None: full fine-tuning.
        boxes: Train on the verdicts' edit regions (SpatialReward); False: the same verdicts with
            `edit_region: []` and no `<|bbox_i|>` citations (the ablation).
        score_range: The verdicts' score range (25).
        sc_prompt: The SC prompt (`{instruction}`, `{score_range}`); the released weights answer the
            official wording best: pass it here.
        pq_prompt: The PQ prompt (`{score_range}`).
        system_prompt: The system prompt.
        max_new_tokens: Longest verdict generated.
        lr: Learning rate (the paper: 1e-4, cosine, 10% warm-up).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps.
        lr_schedule: "cosine" (the paper) or "constant".
        freeze_vision: Freeze the vision tower.
        gradient_checkpointing: Recompute the backbone's blocks in the backward pass.
        seed: Seed (unused by greedy decoding; kept for the shared schema).
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        lora: dict[str, Any] | None = None,
        boxes: bool = True,
        score_range: float = SCORE_RANGE,
        sc_prompt: str = SC_PROMPT,
        pq_prompt: str = PQ_PROMPT,
        system_prompt: str = SYSTEM,
        max_new_tokens: int = 512,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "cosine",
        freeze_vision: bool = False,
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone, lr, weight_decay, warmup_steps, lr_schedule, lora, freeze_vision, gradient_checkpointing, seed)  # fmt: skip
        self.save_hyperparameters()
        if "{instruction}" not in sc_prompt:
            raise ValueError("sc_prompt must contain {instruction}")
        self.boxes, self.score_range = boxes, score_range
        self.sc_prompt, self.pq_prompt, self.system_prompt = sc_prompt, pq_prompt, system_prompt
        self.max_new_tokens = max_new_tokens
        self.verdicts_seen = 0

    def configure_model(self) -> None:
        """Build the VLM (and LoRA); idempotent."""
        self.build_backbone()

    def sc_conversation(
        self, sources: Sequence[Tensor], instruction: str, image: Tensor, answer: str | None = None
    ) -> Conversation:
        """The SC prompt over [sources..., candidate]."""
        text = self.sc_prompt.format(instruction=instruction, score_range=_fmt(self.score_range))
        return Conversation(
            images=[*sources, image],
            labels=_source_labels(len(sources)),
            text=text,
            system=self.system_prompt,
            answer=answer,
        )

    def pq_conversation(self, image: Tensor, answer: str | None = None) -> Conversation:
        """The PQ prompt over the candidate alone."""
        text = self.pq_prompt.format(score_range=_fmt(self.score_range))
        return Conversation(images=[image], text=text, system=self.system_prompt, answer=answer)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """SFT on the SC and PQ verdicts of the pairs' candidates (answer tokens only)."""
        convs = []
        for side in ("chosen", "rejected"):
            for src, instruction, image, verdict in zip(
                batch["sources"], batch["instruction"], batch[side], batch[f"{side}_verdict"]
            ):
                if verdict:
                    convs.append(
                        self.sc_conversation(
                            src, instruction, image, format_verdict(verdict["sc"], self.boxes)
                        )
                    )
                    convs.append(self.pq_conversation(image, format_verdict(verdict["pq"])))
        if not convs:
            raise ValueError(
                "SpatialReward trains on target verdicts, and this batch has none: use data whose items carry "
                "`verdicts` (e.g. `omnilab data synth preference`)"
            )
        inputs = self.vlm.inputs(convs, with_answer=True)
        loss = lm_loss(self.vlm.logits(self.vlm.hidden_states(inputs)), inputs["labels"])
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(convs))
        return loss

    def judge(
        self, sources: Sequence[Sequence[Tensor]], instructions: Sequence[str], images: Sequence[Tensor]
    ) -> tuple[list[Verdict | VerdictError], list[Verdict | VerdictError], list[str]]:
        """(SC verdicts, PQ verdicts, raw answers) of N candidates: greedy answers parsed strictly."""
        n = len(images)
        convs = [self.sc_conversation(s, i, x) for s, i, x in zip(sources, instructions, images)]
        convs += [self.pq_conversation(x) for x in images]
        answers = self.vlm.generate(convs, self.max_new_tokens)
        sc = [parse_verdict(a, "sc", self.score_range) for a in answers[:n]]
        pq = [parse_verdict(a, "pq", self.score_range) for a in answers[n:]]
        return sc, pq, answers

    def score_edits(
        self, sources: Sequence[Sequence[Tensor]], instructions: Sequence[str], images: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        """{"score": R [N], "sc": SC [N], "pq": PQ [N]}; NaN where a verdict did not parse (counted)."""
        sc, pq, _ = self.judge(sources, instructions, images)
        failed = sum(not isinstance(v, Verdict) for v in sc + pq)
        self.parse_failures += failed
        self.verdicts_seen += len(sc) + len(pq)
        nan = math.nan
        return {
            "score": torch.tensor([verdict_reward(s, p, self.score_range) for s, p in zip(sc, pq)]),
            "sc": torch.tensor(
                [sc_score(*s.scores, self.score_range) if isinstance(s, Verdict) else nan for s in sc]
            ),
            "pq": torch.tensor(
                [pq_score(*p.scores, self.score_range) if isinstance(p, Verdict) else nan for p in pq]
            ),
        }

    def _report(self, prefix: str, metrics: Any, table: bool) -> dict[str, float]:
        values = super()._report(prefix, metrics, table)
        if self.verdicts_seen:
            rate = self.parse_failures / self.verdicts_seen
            self.log(f"{prefix}/parse_failure_rate", rate, batch_size=1)
            values[f"{prefix}/parse_failure_rate"] = rate
        self.parse_failures = self.verdicts_seen = 0
        return values


def _fmt(value: float) -> str:
    """25.0 -> "25"."""
    return str(int(value)) if float(value).is_integer() else str(value)
