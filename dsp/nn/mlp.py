"""Plain fully connected building blocks shared by every model family."""
from __future__ import annotations

from typing import Annotated, Sequence

import torch
from torch import nn

from dsp import interfaces as I

from dsp.errors import DspError
from dsp.schema import Check, Rate, Size
from dsp.nn.smooth import SoftAbs

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,  # slope 0.01 below zero: a unit never stops passing gradient
    "softabs": SoftAbs,
    "hardtanh": nn.Hardtanh,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    """`name` or `name:temperature` for the smooth ones (softplus:25 is (1/25)·log(1 + e^{25x}),
    a ReLU that stays twice differentiable, as unrolled inference needs)."""
    base, _, temp = name.lower().partition(":")
    if base not in ACTIVATIONS:
        raise DspError(f"unknown activation {name!r}: choose one of {', '.join(ACTIVATIONS)} "
                       f"(softplus and softabs take a temperature, e.g. softplus:25)")
    if not temp:
        return ACTIVATIONS[base]()
    if base not in ("softplus", "softabs"):
        raise DspError(f"activation {name!r}: only softplus and softabs take a temperature")
    try:
        beta = float(temp)
    except ValueError:
        beta = -1.0
    if beta <= 0:
        raise DspError(f"activation {name!r}: the temperature after ':' must be a positive number")
    return ACTIVATIONS[base](beta=beta)


def _activation_problem(name) -> str | None:
    """What to give instead of an activation name make_activation refuses (a setting's check)."""
    try:
        make_activation(name)
    except DspError:
        return (f"choose one of {', '.join(ACTIVATIONS)} (softplus and softabs take a positive temperature, "
                f"e.g. softplus:25)")
    return None


# An activation setting: a name make_activation knows, checked at start-up.
Activation = Annotated[str, Check(_activation_problem)]


class MLP(nn.Module):
    """x -> g(W_k ... g(W_1 x)): every hidden layer is followed by the activation.

    `hidden=[]` is the identity (a linear feature network for a linear local energy).
    `out_features` adds a final affine layer without activation.
    """

    inputs = frozenset({I.VECTORS})  # what dsp.compat matches against the data's input kind

    def __init__(
        self,
        in_features: Size,
        hidden: Sequence[Size] = (),
        out_features: Size | None = None,
        activation: Activation = "relu",
        dropout: Rate = 0.0,
        input_dropout: Rate = 0.0,
        flatten: bool = False,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()] if flatten else []  # images [N, H, W] -> [N, H·W]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), make_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        if out_features is not None:
            layers.append(nn.Linear(width, out_features))
            width = out_features
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
