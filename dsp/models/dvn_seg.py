"""Deep value network for binary segmentation (Gygli, Norouzi & Angelova 2017, §5.2, Figure 2),
and the fully convolutional baseline with the same convolutional layers (Table 2, "FCN").

Value network (Figure 2): the image x [B, C, H, W] and the relaxed mask ȳ [B, 1, H, W] stacked as
one input, 3 convolutional layers (5×5; base_width, 2·base_width, 2·base_width filters; strides
1, 2, 2; ReLU), 2 fully connected layers (384, 192; ReLU; dropout with keep probability 0.75 on
the first) and a linear output s(x, ȳ); v(x, ȳ) = σ(s) ∈ [0, 1] regresses the soft IoU of ȳ
(Eq. 6, 9-11). With 24×24 crops this is the paper's 2.5 million parameters; at 32×32 inputs it
is 3.8 million (the first fully connected layer sees 8·8·128 values). The input side is fixed
(model.size): on crops (data.crop) it is the crop side, and whole images are predicted from a
grid of crops (data.test_crops; dsp.tasks.segmentation).

The model speaks the contract of the multi-label DVN (`dsp.models.dvn`), so GradientInference and
ValueObjective work unchanged: features(x) keeps the image and zero "logits" [B, H, W] (the shape of
ȳ; GradientInference optimises any output shape as a flat vector per example), and
energy(ȳ) = -v(x, ȳ). The features carry no per-pixel evidence of their own: x is only looked at
together with ȳ, so mode "local" is meaningless (σ(0) = 0.5 everywhere); prediction is always the
ascent from ȳ = 0.

The shared conv settings live in a node named `unary` (base_width, depth, kernel_size), like the
UNet unaries of the other horses presets, so `model.unary.base_width=4 model.unary.depth=2` shrinks
any horses model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsp.errors import DspError
from dsp.nn.unet import UNet
from dsp.schema import Count, Rate, SettingsOf, Size
from dsp import interfaces as I


class ConvLayers(nn.Module):
    """`depth` 5×5 convolutions with ReLU: base_width filters at stride 1, then 2·base_width
    filters at stride 2 (Figure 2 with depth=3: 64, 128, 128 filters, strides 1, 2, 2).
    norm="batch" puts a BatchNorm2d between each convolution and its ReLU (not in the paper's
    text; the public PyTorch reproduction of the DVN's horses has it)."""

    def __init__(self, in_channels: Size, base_width: Size = 64, depth: Size = 3, kernel_size: Size = 5,
                 norm: Literal["batch"] | None = None):
        super().__init__()
        if depth < 1 or base_width < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise DspError("model.unary: depth and base_width must be >= 1 and kernel_size odd")
        if norm not in (None, "batch"):
            raise DspError(f"model.unary.norm={norm!r}: choose null (none, Figure 2) or 'batch'")
        layers, c = [], in_channels
        for i in range(depth):
            out = base_width if i == 0 else 2 * base_width
            layers.append(nn.Conv2d(c, out, kernel_size, stride=1 if i == 0 else 2, padding=kernel_size // 2))
            layers += [nn.BatchNorm2d(out)] if norm == "batch" else []
            layers.append(nn.ReLU())
            c = out
        self.net = nn.Sequential(*layers)
        self.out_channels = c
        self.stride = 2 ** (depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# model.unary of the value networks: the settings of their conv layers or UNet trunk (the input
# channels are the model's own).
ConvSettings = Annotated[dict, SettingsOf(ConvLayers, exclude=("in_channels",))]
TrunkSettings = Annotated[dict, SettingsOf(UNet, exclude=("in_channels", "out_channels"))]


@dataclass
class MaskValueFeatures:
    """What inference needs from x: the images [B, C, H, W] and zero logits [B, H, W] (the shape of
    ȳ; no per-pixel evidence, inference starts from ȳ = 0)."""

    features: torch.Tensor
    logits: torch.Tensor

    def detach(self) -> "MaskValueFeatures":
        return MaskValueFeatures(self.features.detach(), self.logits.detach())

    def take(self, index: torch.Tensor) -> "MaskValueFeatures":
        return MaskValueFeatures(self.features[index], self.logits[index])

    @property
    def unary(self) -> torch.Tensor:
        """The zero logits [B, H, W], for SegmentationTask's mode "local"."""
        return self.logits


class MaskValueNetwork(I.Model):
    """What every value network over masks shares: v(x, ȳ) = σ(s(x, ȳ)), energy -v (or -s), the
    ascent's start ȳ = 0. Subclasses define score(ȳ, feats)."""

    inputs = frozenset({I.IMAGES})
    outputs = frozenset({I.MASK})
    provides = frozenset({I.ENERGY, I.VALUE})  # local_probs is the start ȳ = 0, not a local term
    has_local_term = False  # σ(0) = 0.5 everywhere: predict=local is refused (stages, dsp-eval)

    def __init__(self, ascend: str = "value"):
        super().__init__()
        if ascend not in ("value", "score"):
            raise DspError(f"model.ascend={ascend!r}: choose 'value' (Eq. 8) or 'score'")
        self.ascend = ascend

    def features(self, x: torch.Tensor, lengths=None) -> MaskValueFeatures:
        b, _, h, w = x.shape
        return MaskValueFeatures(x, x.new_zeros(b, h, w))

    @staticmethod
    def stacked(y: torch.Tensor, feats) -> torch.Tensor:
        """The network input [B, C + 1, H, W]: image channels and the mask ȳ [B, H, W] as one more."""
        x = feats.features
        return torch.cat([x, y.reshape(x.shape[0], 1, *x.shape[-2:]).to(x.dtype)], 1)

    def score(self, y: torch.Tensor, feats) -> torch.Tensor:
        raise NotImplementedError

    def value(self, y: torch.Tensor, feats) -> torch.Tensor:
        """v(x, ȳ) = σ(s) [B] in [0, 1]: the predicted soft IoU of ȳ."""
        return torch.sigmoid(self.score(y, feats))

    def energy(self, y: torch.Tensor, feats) -> torch.Tensor:
        """-v [B] (or -s with ascend="score"): minimising it is the gradient ascent of Eq. 8."""
        return -(self.value(y, feats) if self.ascend == "value" else self.score(y, feats))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.value(y, self.features(x))

    def local_probs(self, feats) -> torch.Tensor:
        """Zeros [B, H, W]: the paper's start ȳ = 0 (inference.init=local gives the same)."""
        return torch.zeros_like(feats.logits)


class SegmentationValueNetwork(MaskValueNetwork):
    """v(x, ȳ) = σ(s(x, ȳ)) for masks ȳ ∈ [0,1]^{H×W} (Figure 2); see the module docstring."""

    parts = ("conv", "head")  # the children a training stage may name

    def __init__(self, in_channels: Size = 3, size: Size = 32, unary: ConvSettings | None = None,
                 hidden: Sequence[Size] = (384, 192), dropout: Rate = 0.25,
                 ascend: Literal["value", "score"] = "value"):
        super().__init__(ascend)
        if not hidden:
            raise DspError("model.hidden: the value network needs at least one fully connected layer")
        if size is None or int(size) < 1:
            raise DspError(f"model.size={size}: the value network needs the side of its square inputs (the "
                           f"dvn_horses preset reads it from data.crop; without crops set model.size=${{data.size}})")
        self.conv = ConvLayers(in_channels + 1, **dict(unary or {}))
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, in_channels + 1, size, size)).numel()
        layers, width = [], flat
        for i, h in enumerate(hidden):
            layers += [nn.Linear(width, h), nn.ReLU()]
            if i == 0 and dropout > 0:
                layers.append(nn.Dropout(dropout))  # keep probability 1 - dropout = 0.75 (§5.2)
            width = h
        layers.append(nn.Linear(width, 1))
        self.head = nn.Sequential(*layers)
        self.size = size

    def features(self, x: torch.Tensor, lengths=None) -> MaskValueFeatures:
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):  # the fully connected layers fix the input side
            raise DspError(f"the value network was built for {self.size}×{self.size} inputs (model.size) but got "
                           f"{h}×{w}; with crops (data.crop) set model.size to the crop side, "
                           f"and predict through data.test_crops")
        return super().features(x)

    def score(self, y: torch.Tensor, feats) -> torch.Tensor:
        """The pre-sigmoid value s(x, ȳ) [B] for masks ȳ [B, H, W]."""
        return self.head(self.conv(self.stacked(y, feats)).flatten(1)).squeeze(-1)  # [B]


def pooled_mlp(width: int, hidden) -> nn.Sequential:
    """The MLP from the pixel mean of the per-pixel features [B, width] to one score [B, 1]."""
    layers = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 1))


class PooledValueNetwork(MaskValueNetwork):
    """A fully convolutional value network (ours, not in the paper): a UNet trunk, per-pixel layers
    over its features and ȳ, the mean over pixels, then a small MLP to s(x, ȳ).

    Why this shape: soft IoU = Σ_p min(ȳ_p, y*_p) / Σ_p max(ȳ_p, y*_p) is a ratio of two pixel
    means, and min/max of ȳ_p and a per-pixel estimate of y*_p are one ReLU layer over
    [features_p, ȳ_p]; so the per-pixel layer, the mean and the MLP can express the oracle once the
    trunk segments. Figure 2's fully connected layers must instead learn every position separately.
    Being convolutional, it takes inputs of any side (crops or whole images).

    trunk_sees_mask=True: the trunk reads the image stacked with ȳ (like Figure 2), so it can judge
    the mask's shape, but every ascent step runs the whole UNet. False: the trunk reads the image
    alone and runs once per image (features(x)), like the multi-label DVN's feature network; ȳ
    then meets the image features in `mask_layers` 3×3 convolutions (its local shape) and the 1×1
    per-pixel layer, and an ascent step costs only those.

    head picks how the per-pixel layers become s(x, ȳ):
      "mlp"    the mean of the per-pixel features, then the MLP `hidden` (the default).
      "ratio"  the soft IoU's own form, learned: two non-negative maps a_p, d_p (softplus of a 1×1
               layer over the per-pixel features) and v = ā / (ā + d̄), i.e. s = log ā − log d̄
               (bar: mean over pixels, + eps). The soft IoU is this with a_p = min(ȳ_p, y*_p)
               and d_p = |ȳ_p − y*_p| (union − intersection), so the head has to learn only the
               per-pixel terms, not a division.
      "iou"    the oracle itself against a per-pixel estimate ŷ(x) = σ(1×1 layer over the trunk
               features, which do not see ȳ): v = soft IoU(ȳ, ŷ), s = log Σ min(ȳ, ŷ) − log Σ |ȳ − ŷ|.
               Nothing is left to learn but ŷ, so the ascent converges to ŷ: a diagnostic of
               what the tuples' training signal can teach a per-pixel segmenter, not a value
               network in the paper's sense.
      "iou_mlp" "iou" plus a learned correction: s = s_iou + the "mlp" head's score over the
               per-pixel features of [trunk, ȳ] (its last layer starts at zero, so training starts
               from "iou"). The correction can learn what the oracle form cannot: a shape prior,
               and the calibration of v on the masks the ascent visits."""

    parts = ("trunk", "pixel", "head", "correction")  # the children a training stage may name

    HEADS = ("mlp", "ratio", "iou", "iou_mlp")
    EPS = 1e-3  # added to both pixel means of the ratio heads: keeps log finite at ȳ = 0 and ȳ = ŷ

    def __init__(self, in_channels: Size = 3, unary: TrunkSettings | None = None, pixel_features: Size = 32,
                 hidden: Sequence[Size] = (64,), trunk_sees_mask: bool = False, mask_layers: Count = 0,
                 head: Literal["mlp", "ratio", "iou", "iou_mlp"] = "mlp", ascend: Literal["value", "score"] = "value"):
        super().__init__(ascend)
        if pixel_features < 1 or mask_layers < 0:
            raise DspError(f"model.pixel_features={pixel_features}, model.mask_layers={mask_layers}: "
                           f"give pixel_features >= 1 and mask_layers >= 0")
        if head not in self.HEADS:
            raise DspError(f"model.head={head!r}: choose one of {', '.join(self.HEADS)}")
        if head.startswith("iou") and trunk_sees_mask:
            raise DspError(f"model.head={head} estimates y* from the image alone: set model.trunk_sees_mask=false")
        self.trunk_sees_mask, self.head_kind = trunk_sees_mask, head
        self.trunk = UNet(in_channels + trunk_sees_mask, out_channels=None, **dict(unary or {}))
        layers, width = [], self.trunk.out_channels + 1  # trunk features and ȳ_p again
        for _ in range(mask_layers):
            layers += [nn.Conv2d(width, pixel_features, 3, padding=1), nn.ReLU()]
            width = pixel_features
        layers += [nn.Conv2d(width, pixel_features, 1), nn.ReLU()]
        self.pixel = nn.Sequential(*layers)
        self.correction = None
        if head == "mlp":
            self.head = pooled_mlp(pixel_features, hidden)
        elif head == "ratio":
            self.head = nn.Conv2d(pixel_features, 2, 1)  # a_p and d_p before their softplus
        else:
            # the logit of ŷ_p, from the trunk alone (named head like the other kinds' last layer)
            self.head = nn.Conv2d(self.trunk.out_channels, 1, 1)
            self.pixel = None if head == "iou" else self.pixel
            if head == "iou_mlp":  # a learned correction that starts at zero
                self.correction = pooled_mlp(pixel_features, hidden)
                nn.init.zeros_(self.correction[-1].weight)
                nn.init.zeros_(self.correction[-1].bias)

    @classmethod
    def log_ratio(cls, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """s = log ā − log d̄ [B] from the pixel means ā, d̄ [B], so that σ(s) = ā / (ā + d̄), eps aside."""
        return (a + cls.EPS).log() - (d + cls.EPS).log()

    def features(self, x: torch.Tensor, lengths=None) -> MaskValueFeatures:
        if self.trunk_sees_mask:
            return super().features(x)  # the trunk runs per mask, in score()
        b, _, h, w = x.shape
        return MaskValueFeatures(self.trunk(x), x.new_zeros(b, h, w))  # [B, base_width, H, W]

    def score(self, y: torch.Tensor, feats) -> torch.Tensor:
        if self.trunk_sees_mask:
            stacked = self.stacked(y, feats)  # [B, C + 1, H, W]: the image and ȳ
            trunk, mask = self.trunk(stacked), stacked[:, -1:]
        else:
            trunk = feats.features  # [B, base_width, H, W]: the image's, from features()
            mask = y.reshape(trunk.shape[0], 1, *trunk.shape[-2:]).to(trunk.dtype)
        if self.head_kind in ("iou", "iou_mlp"):
            y_hat = torch.sigmoid(self.head(trunk))  # [B, 1, H, W]: the estimate of y*
            a, d = torch.minimum(mask, y_hat), (mask - y_hat).abs()  # intersection, union − intersection
            s = self.log_ratio(a.mean((1, 2, 3)), d.mean((1, 2, 3)))  # [B]
            if self.correction is None:
                return s
            per_pixel = self.pixel(torch.cat([trunk, mask], 1))  # [B, pixel_features, H, W]
            return s + self.correction(per_pixel.mean((2, 3))).squeeze(-1)
        per_pixel = self.pixel(torch.cat([trunk, mask], 1))  # [B, pixel_features, H, W]
        if self.head_kind == "ratio":
            a, d = F.softplus(self.head(per_pixel)).mean((2, 3)).unbind(-1)  # [B] each
            return self.log_ratio(a, d)
        return self.head(per_pixel.mean((2, 3))).squeeze(-1)  # [B]


@dataclass
class FCNFeatures:
    unary: torch.Tensor  # [B, H, W] foreground logits

    def detach(self) -> "FCNFeatures":
        return FCNFeatures(self.unary.detach())


class FCN(I.Model):
    """Fully convolutional baseline (Long et al. 2015; DVN §5.2): the value network's conv layers on
    the image alone, then one foreground logit per pixel. Trained per pixel (objective
    UnaryCrossEntropy), predicted locally.

    upsample="bilinear": a 1×1 convolution to one logit per stride×stride block, bilinearly
    upsampled (at stride 4 no mask finer than the blocks: legs one or two pixels wide are lost).
    upsample="learned": a transposed convolution from the features (kernel 2·stride, stride
    `stride`, Long et al.'s learned "deconvolution"), so each block gets its own stride×stride
    pattern of logits."""

    parts = ("conv", "classifier")  # the children a training stage may name
    inputs = frozenset({I.IMAGES})
    outputs = frozenset({I.MASK})
    provides = frozenset({I.LOCAL, I.LOCAL_LOGITS})
    structured = classmethod(lambda cls, config: False)  # predicted by its local term alone

    def __init__(self, in_channels: Size = 3, unary: ConvSettings | None = None,
                 upsample: Literal["bilinear", "learned"] = "bilinear"):
        super().__init__()
        if upsample not in ("bilinear", "learned"):
            raise DspError(f"model.upsample={upsample!r}: choose 'bilinear' or 'learned'")
        self.conv = ConvLayers(in_channels, **dict(unary or {}))
        s, self.upsample = self.conv.stride, upsample
        if upsample == "learned":
            self.classifier = nn.ConvTranspose2d(self.conv.out_channels, 1, 2 * s, stride=s, padding=s // 2)
        else:
            self.classifier = nn.Conv2d(self.conv.out_channels, 1, 1)

    def features(self, x: torch.Tensor, lengths=None) -> FCNFeatures:
        h, w = x.shape[-2:]
        u = self.classifier(self.conv(x))  # [B, 1, h', w']: blocks (bilinear) or >= [B, 1, H, W] (learned)
        if self.upsample == "learned":
            u = u[..., :h, :w]  # ⌈H/s⌉·s (+1 at stride 1) rows: cut to the image
        else:
            u = F.interpolate(u, size=(h, w), mode="bilinear", align_corners=False)
        return FCNFeatures(u.squeeze(1))  # [B, H, W]

    def local_probs(self, feats: FCNFeatures) -> torch.Tensor:
        return torch.sigmoid(feats.unary)

    def local_logits(self, feats: FCNFeatures) -> torch.Tensor:
        return feats.unary  # [B, H, W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).unary
