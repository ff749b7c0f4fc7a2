"""Exact recursions in float32 under mixed precision (trainer.precision=bf16|fp16).

Autocast runs matrix products (and much else) in bfloat16 or float16 to save time and memory, which
suits networks but not the recursions of inference: bfloat16 keeps 8 bits of mantissa (about 3
decimal digits), float16 11 bits and a range that ends at 65504. Where that breaks a routine, the
routine is decorated with `full_precision`: autocast is switched off inside it and its half-precision
floating inputs (tensors, or tensors inside dataclasses, lists and tuples, e.g. a model's features or
MRFPotentials) are cast to float32, so it computes exactly what it computes in an fp32 run given the
same inputs. Gradients flow back through the casts to the half-precision network outputs.

Decorated (and why):
  chain.sequence_score, log_partition, marginals, viterbi   a sum over T positions of scores of
      magnitude ~10 loses whole units in bfloat16; the forward algorithm's exp-space matrix
      products (and the log Z - s(y) difference of the likelihood) would carry that error
  mean_field.mean_field_marginals                      repeated softmax of accumulated messages
  cg.potts_solve, gcrf_solve                           conjugate gradients: residual norms to 1e-5
      and λ_eff - λ_max(AAᵀ), the system's smallest eigenvalue, a difference of large numbers
  message_passing: sweep, scores, beliefs, dual, labels' scores, MessagePassing   message updates
      are differences of log-sum-exps; messages are stored and reused across epochs
  gradient.GradientInference.__call__                  ȳ, its mirror-descent iterate and momentum,
      and the convergence tests (rel_tol 1e-4 is finer than bfloat16's resolution)

Without autocast and with float32 (or float64) inputs the decorator only checks and calls through.
"""
from __future__ import annotations

import dataclasses
import functools
from contextlib import ExitStack

import torch

_HALF = (torch.float16, torch.bfloat16)
_DEVICE_TYPES = ("cpu", "cuda")


def _autocast_on() -> list[str]:
    return [d for d in _DEVICE_TYPES if torch.is_autocast_enabled(d)]


def _has_half(value, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype in _HALF
    if depth > 3:
        return False
    if isinstance(value, (list, tuple)):
        return any(_has_half(v, depth + 1) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_has_half(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value))
    return False


def to_float32(value, depth: int = 0):
    """`value` with its float16/bfloat16 tensors cast to float32 (others, and the object itself when
    nothing changes, kept)."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _HALF else value
    if depth > 3 or not _has_half(value, depth):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v, depth + 1) for v in value)
    return dataclasses.replace(value, **{f.name: to_float32(getattr(value, f.name), depth + 1)
                                         for f in dataclasses.fields(value) if f.init})


def full_precision(fn):
    """Run `fn` without autocast, its half-precision inputs cast to float32 (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        on = _autocast_on()
        if not on and not any(_has_half(a) for a in args) and not any(_has_half(v) for v in kwargs.values()):
            return fn(*args, **kwargs)
        with ExitStack() as stack:
            for device_type in on:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*(to_float32(a) for a in args), **{k: to_float32(v) for k, v in kwargs.items()})

    return wrapper
