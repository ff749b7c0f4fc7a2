"""trainer.precision: mixed-precision training steps (autocast, and a gradient scaler for fp16).

    fp32   no autocast (the default)
    bf16   the forward pass and the loss of every training step under torch.autocast(bfloat16):
           matrix products and convolutions in bfloat16, parameters, gradients and optimiser
           state in float32. No loss scaling (bfloat16 has float32's range).
    fp16   the same with float16, whose range ends at 65504 and whose small gradients underflow:
           the loss is scaled (torch.amp.GradScaler) before backward, the gradients unscaled
           before clipping and the step, and a step whose gradients overflowed is skipped while
           the scale shrinks. The scaler's state is checkpointed, so a resume continues it.

Only the training step runs under autocast. Validation, the final val/test evaluation, probes,
online scaling and dsp-eval predict in float32: the numbers in metrics.json are what dsp-eval
reproduces from best.pt, and model selection sees the model as it will be used. Inside a training
step the exact recursions of inference run in float32 whatever the setting (dsp.inference.full_precision:
the chain CRF's forward algorithm and Viterbi, mean field, CG, message passing, gradient inference).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from dsp.errors import DspError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(value) -> str:
    """The setting as a name, or a one-line DspError naming trainer.precision."""
    if not isinstance(value, str) or value not in PRECISIONS:
        raise DspError(f"trainer.precision={value!r}: choose {', '.join(PRECISIONS)}")
    return value


def _autocast_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch autocasts `dtype` on `device_type` (older CPU builds warn and disable it)."""
    if not torch.amp.is_autocast_available(device_type):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device_type, dtype=dtype):
                return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == dtype
        except (RuntimeError, ValueError):
            return False


class Precision:
    """What a training step does for trainer.precision on `device`: `autocast()` around the forward
    pass and the loss, `backward(loss)`, `unscale(optimizer)` before clipping and `step(optimizer)`."""

    def __init__(self, name: str, device: torch.device):
        self.name = check_precision(name)
        self.dtype = PRECISIONS[self.name]
        self.device_type = torch.device(device).type
        self.enabled = self.name != "fp32"
        self.scaler = None
        if not self.enabled:
            return
        if self.name == "bf16" and self.device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DspError(f"trainer.precision=bf16: {torch.cuda.get_device_name()} has no bfloat16 support; "
                           f"use trainer.precision=fp16 (or fp32)")
        if not _autocast_works(self.device_type, self.dtype):
            raise DspError(f"trainer.precision={self.name}: torch {torch.__version__} has no {self.dtype} autocast "
                           f"on the {self.device_type} device; use "
                           f"{'bf16 or fp32' if self.name == 'fp16' else 'fp32'} here")
        if self.name == "fp16":
            try:
                self.scaler = torch.amp.GradScaler(self.device_type)
            except (RuntimeError, ValueError, AssertionError) as err:
                raise DspError(f"trainer.precision=fp16: torch {torch.__version__} has no gradient scaler for the "
                               f"{self.device_type} device ({err}); use bf16 or fp32 here") from None

    def autocast(self):
        """The context of a training step's forward pass and loss (nothing under fp32)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """fp16: divide the gradients by the loss scale (before clipping them); otherwise nothing."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step(); fp16: skipped when the gradients overflowed, and the scale updated."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        """The checkpoint's entries (fp16: the scaler's scale and growth counter)."""
        return {} if self.scaler is None else {"grad_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
