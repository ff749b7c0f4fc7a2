"""BatchNorm over the global batch of data parallel training, on any backend (trainer.sync_batchnorm).

Under trainer.strategy=ddp every rank sees only its slice of the global batch, so plain BatchNorm
normalises each slice by its own statistics and updates its running statistics from them: the
ranks then train another network than one process would, and rank 0's checkpoint keeps rank 0's
statistics only. torch.nn.SyncBatchNorm fixes that on CUDA alone (it raises for CPU input, so not
under gloo). `SyncBatchNorm` here works wherever torch.distributed does:

- In training mode with an initialised process group of more than one rank, every rank sums per
  channel its slice's values and squares (accumulated in float64) and counts them; one
  autograd-aware all-reduce (torch.distributed.nn.functional.all_reduce) adds the three up, and the
  global mean and biased variance normalise every rank's slice. Slices of any sizes are weighted by
  their counts, so the output is nn.BatchNorm's on the concatenated batch. In backward the
  all-reduce adds every rank's gradient with respect to the sums, so the parameter gradients that
  dsp's ddp then sums over ranks are the global batch's too.
- The running statistics are updated as one process over the global batch updates them: the
  unbiased variance uses the global count, momentum (or momentum=None's cumulative average) and
  num_batches_tracked alike, so they stay identical on every rank.
- Otherwise (eval mode, no process group, one rank) it is nn.BatchNorm's own forward.

Each synchronised forward is one collective (and its backward another): every rank must run the
same train-mode forward passes through the converted layers, in the same order. Objectives that
call the network a fixed number of times per step do; a rank with no examples in a step, or a loop
of data-dependent length in train mode, would leave the other ranks waiting.

`convert(module)` swaps every BatchNorm1d/2d/3d (and torch's SyncBatchNorm) for this class keeping
the very Parameter and buffer tensors, so optimisers and parameter lists built before still train
them and the state_dict keys are unchanged: checkpoints load into either form.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# The layers convert() replaces, with the input dimensions each accepts (None: any from 2 up).
_SOURCES = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,), nn.SyncBatchNorm: None}


def _world_size(group) -> int:
    dist = torch.distributed
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics are those of the batch of all ranks (see the module
    docstring); `input_dims` are the input dimensions the replaced layer accepted."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, input_dims: tuple[int, ...] | None = None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        self.input_dims = tuple(input_dims) if input_dims else None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        allowed = self.input_dims or ()
        if (allowed and input.dim() not in allowed) or input.dim() < 2:
            want = " or ".join(f"{d}D" for d in allowed) if allowed else "at least 2D"
            raise ValueError(f"expected {want} input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or _world_size(self.process_group) < 2:
            return super().forward(input)
        self._check_input_dim(input)
        c = self.num_features
        dims = [0, *range(2, input.dim())]
        acc = torch.float64 if input.device.type in ("cpu", "cuda") else torch.float32
        compute = torch.promote_types(input.dtype, self.weight.dtype if self.weight is not None else torch.float32)
        x = input.to(compute)  # (bf16 / fp16 activations under autocast: squared in float32)
        per_channel = input.numel() // max(input.shape[1], 1)
        local = torch.cat([x.sum(dims, dtype=acc), torch.square(x).sum(dims, dtype=acc),
                           torch.full((1,), per_channel, dtype=acc, device=input.device)])
        from torch.distributed.nn.functional import all_reduce  # (autograd-aware: backward sums too)

        total = all_reduce(local, group=self.process_group) if self.process_group is not None else all_reduce(local)
        n = total[2 * c:].detach()  # [1] values per channel in the global batch
        mean = total[:c] / n  # [C]
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0.0)  # [C] biased, as normalisation uses

        if self.track_running_stats:  # nn.BatchNorm's update, from the global batch's statistics
            factor = 0.0 if self.momentum is None else self.momentum
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1.0 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1.0 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)

        shape = [1, c] + [1] * (input.dim() - 2)
        scale = torch.rsqrt(var + self.eps).to(compute)
        if self.weight is not None:
            scale = scale * self.weight.to(compute)
        out = (x - mean.to(compute).view(shape)) * scale.view(shape)
        if self.bias is not None:
            out = out + self.bias.to(compute).view(shape)
        return out.to(input.dtype)


def batchnorm_layers(module: nn.Module) -> list[nn.Module]:
    """The layers of `module` that convert() would replace (each once)."""
    return [m for m in module.modules() if type(m) in _SOURCES]


def convert(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (and torch.nn.SyncBatchNorm) inside `module`, in place, by a
    SyncBatchNorm holding the same Parameter and buffer objects and training flag; returns the
    module (a new one if `module` itself is such a layer). A layer reachable under several names
    becomes one SyncBatchNorm."""
    done: dict[int, nn.Module] = {}

    def swap(m: nn.Module) -> nn.Module:
        if id(m) in done:
            return done[id(m)]
        if type(m) in _SOURCES:
            new = SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                process_group, input_dims=_SOURCES[type(m)], device="meta")
            for name in ("weight", "bias"):  # the very Parameters (or None when not affine)
                new._parameters[name] = m._parameters.get(name)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                new._buffers[name] = m._buffers.get(name)
            new.train(m.training)
            if hasattr(m, "qconfig"):
                new.qconfig = m.qconfig
        else:
            new = m
            for name, child in list(m._modules.items()):
                if child is not None:
                    m._modules[name] = swap(child)
        done[id(m)] = new
        return new

    return swap(module)
