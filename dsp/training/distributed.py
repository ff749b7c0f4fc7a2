"""Data parallel training (trainer.strategy=ddp), launched with torchrun:

    torchrun --nproc_per_node=N -m dsp.cli.train ... trainer.strategy=ddp

Every rank holds the whole model, the whole dataset and the same epoch permutation; each global
batch `perm[start:start+batch_size]` (trainer batch size = the global batch) is split into N
nearly equal contiguous slices (torch.tensor_split) and rank r trains on slice r.

The model is not wrapped in torch's DistributedDataParallel: objectives call arbitrary model
methods (features, unaries, local_probs, ...) rather than forward(), so DDP's hooks would not
sync. Instead, after loss.backward(), the trained parameters' gradients are SUM-all-reduced in
one flattened bucket before clipping and the optimiser step. Each rank's loss is first weighted by
(its slice size / global batch size), so for a loss that is a mean over the batch the summed
gradient is the gradient of the global batch's mean, also for the last, uneven batch: training
matches single-process training with the same global batch size up to floating-point summation
order. (One process takes the same step path with Single, whose reduce_step is the identity; a
slice that is the whole batch is not weighted at all, so nothing changes there by even one ulp.) The bucket also carries the weighted loss (the global loss, logged and checked for
divergence on every rank alike), per-parameter "has a gradient" flags (a parameter without a
gradient on every rank stays None, as in one process) and the SIGTERM flag (all ranks stop at the
same step). Rank 0's parameters and buffers are broadcast at start and whenever rank 0 reloads
best.pt.

Per-example state of the objective (the blended MRF's MessageStore) is kept identical on every
rank: after each step the rows of the global batch are summed over ranks with each rank
contributing only its own slice's freshly updated rows (the others zeroed), so every rank reads
the freshest messages, exactly as one process would, and rank 0's checkpoints hold all of them.

Validation runs on every rank (the full validation set), but the metrics and threshold of rank 0
are broadcast, so early stopping and the LR schedule decide alike. Only rank 0 writes checkpoints,
TensorBoard, metrics.json and prints. Resume reads last.pt on every rank: the run folder must be
on a filesystem all ranks see. RNG: rank r > 0 is reseeded from (seed, r) so dropout masks differ
between ranks; checkpoints keep every rank's RNG state (`rng_ranks`) for an exact resume with the
same number of ranks. Backend: nccl on CUDA (device cuda:LOCAL_RANK), gloo on CPU.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist

from dsp.errors import DspError


class Single:
    """strategy=single: one process; every collective is the identity, so the trainer takes the
    same step path with or without ranks (its slice is the whole batch, weighted by nothing)."""

    enabled, rank, world_size = False, 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        return 0, n

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj):
        return obj

    def all_gather_object(self, obj) -> list:
        return [obj]

    def broadcast_module(self, module: torch.nn.Module) -> None:
        pass

    def reduce_step(self, params: list, loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
        """The gradients are the batch's already: (the loss, stop) as they are."""
        return loss.item(), bool(stop)

    def stop_now(self, agreed: bool, requested: bool) -> bool:
        """Whether to stop after this step: one process follows its own SIGTERM flag as it is now
        (`agreed`, the flag reduce_step saw, is older)."""
        return bool(requested)

    def sync_store(self, store, index: torch.Tensor, lo: int, hi: int) -> None:
        pass

    def close(self) -> None:
        pass


class Distributed(Single):
    """strategy=ddp under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment)."""

    enabled = True

    def __init__(self, device_name: str):
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if cuda:
            if not torch.cuda.is_available():
                raise DspError(f"trainer.device={device_name} but no CUDA device is available")
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.backend = "nccl" if cuda else "gloo"
        self._owned = not tdist.is_initialized()
        if self._owned:
            # Importing torch._dynamo (the optimisers do, on first use) while a process group exists
            # leaves references to it that destroy_process_group() does not drop (torch 2.14), so
            # gloo's threads outlived close() and were torn down during interpreter exit, where
            # rank 1 sometimes aborted (SIGABRT, "terminate called without an active exception").
            # Imported first, it holds none and close() really ends the group.
            from torch import _dynamo  # noqa: F401

            tdist.init_process_group(self.backend, **({"device_id": self.device} if cuda else {}))

    # --------------------------------------------------------------------------- collectives
    def shard(self, n: int) -> tuple[int, int]:
        """Positions [lo, hi) of this rank's slice of a global batch of n (sizes differ by <= 1)."""
        base, extra = divmod(n, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        tdist.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        tdist.barrier(**({"device_ids": [self.local_rank]} if self.backend == "nccl" else {}))

    def broadcast_object(self, obj):
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers, in place, on every rank."""
        with torch.no_grad():
            for t in module.state_dict(keep_vars=True).values():
                data = t.data if isinstance(t, torch.nn.Parameter) else t
                buf = data.to(self.device)
                tdist.broadcast(buf, src=0)
                if buf is not data:
                    data.copy_(buf)

    def reduce_step(self, params: list, loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
        """SUM-all-reduce the gradients of `params` (from losses already weighted by slice size)
        together with the weighted loss and the stop flag; returns (global loss, any rank stopping)."""
        has = [p.grad is not None for p in params]
        dtype = params[0].dtype if params else torch.float32
        grads = [p.grad.reshape(-1) if h else p.new_zeros(p.numel()) for p, h in zip(params, has)]
        extra = torch.tensor([*map(float, has), float(loss.detach()), float(stop)], device=self.device, dtype=dtype)
        bucket = torch.cat([*(g.to(self.device, dtype) for g in grads), extra])
        tdist.all_reduce(bucket)
        flags, offset = bucket[-extra.numel():], 0
        for i, p in enumerate(params):
            n = p.numel()
            p.grad = bucket[offset: offset + n].view_as(p).to(p.device, p.dtype).clone() if flags[i] > 0 else None
            offset += n
        return float(flags[-2]), bool(flags[-1] > 0)

    def stop_now(self, agreed: bool, requested: bool) -> bool:
        """Every rank follows the flag agreed on in reduce_step, never its own alone: a SIGTERM that
        reached a rank after the reduce is agreed on at the next step."""
        return bool(agreed)

    def sync_store(self, store, index: torch.Tensor, lo: int, hi: int) -> None:
        """Per-example state of the objective (the MRF's MessageStore, or None): grown as one process
        grows it, then the global batch's rows synced (sync_rows)."""
        if store is None or store.groups is None:
            return
        store.reserve(int(index.max()) + 1)
        self.sync_rows(store.groups, index, lo, hi)

    def sync_rows(self, groups: list, index: torch.Tensor, lo: int, hi: int) -> None:
        """Per-example state: rows `index` (the global batch) of every tensor in `groups` become,
        on every rank, the rows each rank wrote for its own slice index[lo:hi] of other ranks'."""
        if not groups:
            return
        mine = torch.zeros(index.shape[0], dtype=torch.bool, device=index.device)
        mine[lo:hi] = True
        for g in groups:
            rows = index.to(g.device)
            buf = g[rows].to(self.device)
            buf[~mine.to(self.device)] = 0
            tdist.all_reduce(buf)
            g[rows] = buf.to(g.device, g.dtype)

    def close(self) -> None:
        if self._owned and tdist.is_initialized():
            tdist.destroy_process_group()


def setup(strategy: str | None, device_name: str) -> Single:
    strategy = strategy or "single"
    if strategy == "single":
        return Single()
    if strategy != "ddp":
        raise DspError(f"trainer.strategy={strategy!r}: choose single or ddp")
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise DspError("trainer.strategy=ddp needs one process per device started by torchrun, e.g. "
                       "torchrun --nproc_per_node=2 -m dsp.cli.train ... trainer.strategy=ddp "
                       "(WORLD_SIZE and RANK are not set)")
    return Distributed(device_name)
