"""The face part of MICo's weight W: ArcFace features of each human source, matched to the faces of the output.

MICo-Bench's `compute_weights.py` embeds faces with InsightFace's ArcFace (`buffalo_l`): for each human
source (`human_indices`) the largest face found in the source is compared with every face found in the
output, and the best cosine is graded (`metrics.viescore.face_score`). With two or more human sources, if
any source has no detected face, every face of the case scores 0.

Here the embedder is the ArcFace IResNet of InsightFace's `arcface_torch` (the same module and parameter
names, so its released `backbone.pth` state dicts load: r18 / r34 / r50 / r100; `.safetensors` of the same
state dict too), read from a weights path with `weights_only=True`. Faces are 112x112 RGB crops scaled to
[-1, 1], as `arcface_torch/inference.py` feeds them. Finding the faces:
- with `detector` (a callable: HxWx3 uint8 image -> list of [x0, y0, x1, y1] boxes), the official path:
  the largest box of the source, every box of the output, and the all-or-nothing rule for several sources;
- without one, a source portrait is its centred square crop (MICo-Bench's human sources are portraits),
  and the output is searched over square windows of `window_scales` x its short side at half-window strides;
  the best window stands for the best-matched face. This finds faces without a detector at the cost of
  ~30 embeddings per output; it is not the official detector, so scores near a grade's edge can differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHES = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}
FACE_SIZE = 112
Detector = Callable[[np.ndarray], list[Sequence[float]]]


class IBasicBlock(nn.Module):
    """IResNet's residual block: BN, conv3x3, BN, PReLU, conv3x3 (stride), BN, plus the (downsampled) input."""

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """The block's output."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    """ArcFace's IResNet: 112x112 face -> `num_features` embedding (arcface_torch's layout and names).

    Args:
        layers: Blocks per stage (r50: 3, 4, 14, 3).
        widths: Channels per stage (64, 128, 256, 512; smaller for tests).
        num_features: Embedding size (512).
        input_size: Face side in pixels (112: the fc reads a 7x7 map after four stride-2 stages).
    """

    def __init__(
        self,
        layers: Sequence[int] = ARCHES["r50"],
        widths: Sequence[int] = (64, 128, 256, 512),
        num_features: int = 512,
        input_size: int = FACE_SIZE,
    ) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-05)
        self.prelu = nn.PReLU(widths[0])
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            self._make_layer(w, n) for w, n in zip(widths, layers)
        )
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=0.0)
        side = input_size // 16
        self.fc = nn.Linear(widths[3] * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        self.input_size = input_size

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-05)
        )
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, 112, 112] faces in [-1, 1] -> [B, num_features] embeddings (not normalised)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.dropout(torch.flatten(self.bn2(x), 1))))


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """An ArcFace state dict from `.safetensors` or a torch file (`weights_only=True`); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ArcFace weights not found at {path}: give the path of an arcface_torch backbone state dict "
            "(e.g. the r50 / r100 `backbone.pth` of InsightFace's arcface_torch releases) or a .safetensors "
            "file of the same state dict (faces.weights in the bench config)"
        )
    if path.suffix == ".onnx":
        raise ValueError(
            f"{path} is an ONNX model (InsightFace's buffalo_l ships w600k_r50.onnx): this suite reads the "
            "arcface_torch state dict (.pth / .safetensors) of the same IResNet"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _square(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The square crop around a box (its longer side), clipped to the image."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    a, b = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    return image[b : int(min(h, cy + side / 2)), a : int(min(w, cx + side / 2))]


def to_uint8(image: Any) -> np.ndarray:
    """An HxWx3 uint8 array of an image given as a [3, H, W] tensor in [-1, 1], a PIL image or an array."""
    if isinstance(image, Tensor):
        return (
            ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        )
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)


class FaceMatcher:
    """(human source images, output image) -> each source's best ArcFace cosine in the output.

    Args:
        weights: Path of the ArcFace state dict (.pth / .safetensors).
        arch: "r18", "r34", "r50" (buffalo_l's recogniser is an r50) or "r100".
        layers: Blocks per stage, overriding `arch` (tests use tiny ones).
        widths: Channels per stage.
        num_features: Embedding size.
        device: "auto" (CUDA when available), "cpu", "cuda", ...
        detector: Optional face detector (image -> boxes); without one, see the module docstring.
        window_scales: Window sides as fractions of the output's short side (no detector).
    """

    def __init__(
        self,
        weights: str,
        arch: str = "r50",
        layers: Sequence[int] | None = None,
        widths: Sequence[int] = (64, 128, 256, 512),
        num_features: int = 512,
        device: str = "auto",
        detector: Detector | None = None,
        window_scales: Sequence[float] = (1.0, 0.5, 0.33, 0.25),
    ) -> None:
        if arch not in ARCHES and layers is None:
            raise ValueError(f"arch {arch!r} is not one of {', '.join(ARCHES)}")
        self.weights, self.layers = weights, tuple(layers or ARCHES[arch])
        self.widths, self.num_features = tuple(widths), num_features
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if device == "auto" else device)
        self.detector, self.window_scales = detector, tuple(window_scales)
        self.net: IResNet | None = None

    def load(self) -> IResNet:
        """The embedder with its weights (read once); FileNotFoundError naming a missing path."""
        if self.net is None:
            net = IResNet(self.layers, self.widths, self.num_features)
            net.load_state_dict(load_state_dict(self.weights), strict=True)
            self.net = net.to(self.device).eval()
        return self.net

    @torch.no_grad()
    def embed(self, crops: list[np.ndarray]) -> Tensor:
        """Unit-norm embeddings [N, F] of uint8 face crops (each resized to 112x112)."""
        net = self.load()
        batch = torch.stack(
            [
                F.interpolate(
                    torch.from_numpy(np.ascontiguousarray(c)).permute(2, 0, 1)[None].float(),
                    size=(FACE_SIZE, FACE_SIZE),
                    mode="bilinear",
                    antialias=True,
                    align_corners=False,
                )[0]
                for c in crops
            ]
        )
        x = (batch / 127.5 - 1.0).to(self.device)
        return F.normalize(net(x).float(), dim=-1).cpu()

    def source_face(self, image: np.ndarray) -> np.ndarray | None:
        """The source's largest detected face, or (no detector) its centred square crop; None if none found."""
        if self.detector is None:
            h, w = image.shape[:2]
            side = min(h, w)
            return image[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
        boxes = list(self.detector(image))
        if not boxes:
            return None
        return _square(image, max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])))

    def output_faces(self, image: np.ndarray) -> list[np.ndarray]:
        """The output's detected faces, or (no detector) square windows over it (see the module docstring)."""
        if self.detector is not None:
            return [_square(image, b) for b in self.detector(image)]
        h, w = image.shape[:2]
        crops = []
        for scale in self.window_scales:
            side = max(8, round(min(h, w) * scale))
            step = max(1, side // 2)
            for y in range(0, h - side + 1, step):
                for x in range(0, w - side + 1, step):
                    crops.append(image[y : y + side, x : x + side])
        return crops

    def __call__(self, sources: Sequence[Any], output: Any) -> list[float]:
        """Best cosine of each source's face among the output's faces (0 where a face is missing, see above)."""
        faces = [self.source_face(to_uint8(s)) for s in sources]
        candidates = self.output_faces(to_uint8(output))
        if not candidates or (any(f is None for f in faces) and len(sources) > 1):
            return [0.0] * len(sources)  # compute_weights.py: any undetected source face zeroes them all
        targets = self.embed(candidates)
        out = []
        for face in faces:
            out.append(0.0 if face is None else float((self.embed([face]) @ targets.T).max()))
        return out
