"""Feature preprocessing fitted on the training split: missing values filled, features standardised.

The fitted statistics travel with the data (`MultiLabelSplits.input_transform`) into every
checkpoint, so dsp-eval and dsp-predict apply exactly what training applied, without the training
files at hand.

`standardize`:
  auto   shift and scale every feature that is not 0/1 on the training split by its training mean
         and standard deviation; 0/1 features (bags of words, one-hot nominal values) stay as they
         are, so sparse binary data keeps its zeros (the default: dense audio or image features
         whose scales differ by orders of magnitude otherwise need a per-dataset learning rate)
  true   every feature (the DVN authors' released code)
  false  none
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import TensorDataset

from dsp.errors import DspError

Standardize = bool | Literal["auto"]


def check_standardize(value, key: str = "data.standardize") -> None:
    if value not in (True, False, "auto") or isinstance(value, (int, float)) and not isinstance(value, bool):
        raise DspError(f"{key}={value!r}: choose auto (non-binary features), true (every feature) or false")


@dataclass
class InputTransform:
    """x -> (fill NaN with the training mean, then (x - shift) / scale), per feature."""

    fill: torch.Tensor | None  # [D] training means for missing (NaN) features; None: none were missing
    shift: torch.Tensor  # [D]
    scale: torch.Tensor  # [D], > 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fill is not None:
            x = torch.where(torch.isnan(x), self.fill.to(x), x)
        return (x - self.shift.to(x)) / self.scale.to(x)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"shift": self.shift, "scale": self.scale}
        return state if self.fill is None else {**state, "fill": self.fill}

    @classmethod
    def from_state(cls, state: dict) -> "InputTransform":
        try:
            shift, scale = torch.as_tensor(state["shift"]).float(), torch.as_tensor(state["scale"]).float()
            fill = torch.as_tensor(state["fill"]).float() if state.get("fill") is not None else None
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise DspError(f"the checkpoint's input_transform is damaged ({err!r}); retrain or restore the file")
        if shift.dim() != 1 or shift.shape != scale.shape or (fill is not None and fill.shape != shift.shape) \
                or not bool((scale > 0).all()):
            raise DspError("the checkpoint's input_transform is damaged (shapes or scales); retrain or restore the file")
        return cls(fill, shift, scale)


def fit_input_transform(x: torch.Tensor, standardize: Standardize) -> InputTransform | None:
    """The transform fitted on training features x [N, D]; None when it would change nothing."""
    check_standardize(standardize)
    missing = torch.isnan(x)
    fill = torch.nan_to_num(torch.nanmean(x, 0), nan=0.0) if missing.any() else None  # [D]
    if fill is not None:
        x = torch.where(missing, fill, x)
    d = x.shape[1]
    shift, scale = torch.zeros(d), torch.ones(d)
    if standardize:
        mean, std = x.mean(0), x.std(0, unbiased=False)  # population std, as scikit-learn's StandardScaler
        # A feature constant on train is only centred: dividing by ~0 would multiply a value it takes
        # elsewhere (a word never seen in training) by a million.
        std = torch.where(std > 0, std, torch.ones_like(std))
        chosen = torch.ones(d, dtype=torch.bool)
        if standardize == "auto":
            chosen = ~((x == 0) | (x == 1)).all(0)  # [D]: leave 0/1 features alone
        shift, scale = torch.where(chosen, mean, shift), torch.where(chosen, std, scale)
    if fill is None and not shift.any() and bool((scale == 1).all()):
        return None
    return InputTransform(fill, shift.float(), scale.float())


def transformed(transform: InputTransform | None, *datasets: TensorDataset) -> tuple[TensorDataset, ...]:
    """The datasets with their features (first tensor) transformed; labels unchanged."""
    if transform is None:
        return datasets
    return tuple(TensorDataset(transform(d.tensors[0]), *d.tensors[1:]) for d in datasets)
