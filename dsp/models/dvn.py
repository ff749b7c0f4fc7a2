"""Deep value networks for multi-label outputs (Gygli, Norouzi & Angelova 2017, §3, §5.1).

    s(x, ȳ) = Σ_i ȳ_i b_iᵀF(x)  +  c2ᵀ g(C1 ȳ + c1),      v(x, ȳ) = σ(s(x, ȳ)) ∈ [0, 1]

The SPEN architecture (§5.1: local terms non-linear in x and linear in ȳ, a global network on ȳ
alone, SoftPlus), read as a *score* to maximise and squashed by a sigmoid so that it regresses an
oracle value in [0, 1] such as soft F1 (Eq. 11). The parts are SPEN's own modules.

To reuse the SPEN inference code, the model also speaks the energy contract (prediction minimises
`energy`): energy(ȳ) = -v(x, ȳ). Eq. 8 ascends d v / d ȳ with v the sigmoid output (§3.2 puts the
sigmoid inside v; the authors' released code differentiates the sigmoid too), so a step is
σ'(s)·∂s/∂ȳ: steps shrink where the network is confident. `ascend="score"` follows the
pre-sigmoid score instead (same maximiser, larger steps), offered for experiments.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import nn

from dsp import interfaces as I
from dsp.errors import DspError
from dsp.models.spen import SpenFeatures
from dsp.schema import Size


class DeepValueNetwork(I.Model):
    """Feature net F(x) + local score + global score on ȳ; see the module docstring."""

    parts = ("feature_net", "local_score", "global_score")  # the children a training stage may name
    outputs = frozenset({I.MULTILABEL})
    provides = frozenset({I.ENERGY, I.VALUE, I.LOCAL, I.LOCAL_LOGITS})
    y_parts = ("global_score",)

    def __init__(self, num_labels: Size, feature_net: nn.Module, local_score: Callable[..., nn.Module],
                 global_score: Callable[..., nn.Module] | None = None, ascend: Literal["value", "score"] = "value"):
        """`local_score` and `global_score` are factories (Hydra `_partial_` nodes) that get the
        sizes wired in here, like SPEN's local and global energies."""
        super().__init__()
        if ascend not in ("value", "score"):
            raise DspError(f"model.ascend={ascend!r}: choose 'value' (Eq. 8) or 'score'")
        width = feature_net.out_features
        self.feature_net = feature_net
        self.local_score = local_score(in_features=width, num_labels=num_labels)
        self.global_score = None if global_score is None else global_score(num_labels=num_labels, num_features=width)
        self.ascend = ascend

    def features(self, x: torch.Tensor, lengths=None) -> SpenFeatures:
        f = self.feature_net(x)  # [B, f]
        return SpenFeatures(f, self.local_score(f))  # logits [B, L]

    def score(self, y: torch.Tensor, feats: SpenFeatures) -> torch.Tensor:
        """The pre-sigmoid value s(x, ȳ) [B]: the logit the cross-entropy of Eq. 11 works on."""
        s = (y * feats.logits).sum(-1)  # [B]
        if self.global_score is not None:
            s = s + self.global_score(y, feats.features)
        return s

    def value(self, y: torch.Tensor, feats: SpenFeatures) -> torch.Tensor:
        """v(x, ȳ) = σ(s) [B] in [0, 1]: the predicted oracle value (e.g. soft F1) of ȳ."""
        return torch.sigmoid(self.score(y, feats))

    def energy(self, y: torch.Tensor, feats: SpenFeatures) -> torch.Tensor:
        """-v [B] (or -s with ascend="score"): minimising it is the gradient ascent of Eq. 8."""
        return -(self.value(y, feats) if self.ascend == "value" else self.score(y, feats))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """v(x, ȳ) [B] in one call."""
        return self.value(y, self.features(x))

    def local_probs(self, feats: SpenFeatures) -> torch.Tensor:
        """σ(b_iᵀF(x)) [B, L], for inference.init=local (the paper starts from ȳ = 0 instead)."""
        return torch.sigmoid(feats.logits)

    def local_logits(self, feats: SpenFeatures) -> torch.Tensor:
        return feats.logits  # [B, L]
