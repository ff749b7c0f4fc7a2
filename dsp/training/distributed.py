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

Without torchrun, the ranks can come from a job scheduler that starts one process per task, each
running the whole dsp-train command (hydra/launcher=slurm_ddp, or submitit_local with
tasks_per_node > 1; `srun dsp-train ...` in an sbatch script too). When RANK / WORLD_SIZE are
not set, `scheduler_ranks` reads them from submitit's JobEnvironment (Slurm or local executor) or
from an srun step's SLURM_* variables: RANK = the task's global rank, WORLD_SIZE = the number of
tasks, LOCAL_RANK = its rank on its node, MASTER_ADDR = the job's first host (127.0.0.1 on one
node), MASTER_PORT = a port in [20000, 60000] drawn from the job id (submitit's own rule, so jobs
sharing a node do not collide); a MASTER_ADDR / MASTER_PORT already set is kept. A task that sees
one GPU only (Slurm's --gpus-per-task binds each task to its own) uses cuda:0.

BatchNorm (trainer.sync_batchnorm: auto | true | false): with BatchNorm each rank would normalise
its slice by the slice's own statistics and keep running statistics of its slices alone, so ddp
would train another network than one process. `prepare` (before training) swaps the model's
BatchNorm layers for dsp.nn.sync_batchnorm.SyncBatchNorm, whose statistics are the global batch's
on any backend, when the setting is true, or auto and the model has BatchNorm (one process needs
nothing: its batch is the global batch).
"""
from __future__ import annotations

import os
import random
import re
import socket

import torch
import torch.distributed as tdist

from dsp.errors import DspError
from dsp.nn import sync_batchnorm as syncbn


class Single:
    """strategy=single: one process; every collective is the identity, so the trainer takes the
    same step path with or without ranks (its slice is the whole batch, weighted by nothing)."""

    enabled, rank, world_size = False, 0, 1
    sync_batchnorm: bool | str = "auto"  # trainer.sync_batchnorm (validated by setup)

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

    def prepare(self, model: torch.nn.Module, train_size: int | None = None, batch_sizes=()) -> int:
        """Before training (see Distributed.prepare): one process's batch is the global batch, so
        its BatchNorm layers stay as they are. Returns the number of layers synchronised: 0."""
        return 0

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
            # one device per rank: cuda:LOCAL_RANK, or the one device a task was given (Slurm's
            # --gpus-per-task shows every task its own GPU alone, as cuda:0)
            count = torch.cuda.device_count()
            self.device = torch.device("cuda", self.local_rank if self.local_rank < count or count != 1 else 0)
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

    def prepare(self, model: torch.nn.Module, train_size: int | None = None, batch_sizes=()) -> int:
        """Before training: with trainer.sync_batchnorm true, or auto and BatchNorm in the model, its
        BatchNorm layers become dsp.nn.sync_batchnorm.SyncBatchNorm in place (the same Parameter
        objects, so parameter lists built already still hold them; the same state_dict keys).
        Every rank must then take part in every training step: an epoch whose last batch of
        `train_size` examples leaves a rank without any is refused. Returns the number of layers."""
        layers = syncbn.batchnorm_layers(model)
        if self.sync_batchnorm is False or not layers or self.world_size < 2:
            return 0
        for b in dict.fromkeys(int(b) for b in batch_sizes):
            last = train_size % b if train_size else 0
            if 0 < last < self.world_size:
                raise DspError(
                    f"trainer.sync_batchnorm={_setting_name(self.sync_batchnorm)}: the last batch of each epoch holds "
                    f"{last} of the {train_size} training examples (batch size {b}), fewer than the {self.world_size} "
                    f"ranks, and a rank without examples would leave the others waiting in BatchNorm's all-reduce; "
                    f"choose a batch size that leaves 0 or at least {self.world_size}, or trainer.sync_batchnorm=false")
        syncbn.convert(model)
        if self.is_main:
            print(f"ddp: {len(layers)} BatchNorm layer(s) normalise by the statistics of the global batch of all "
                  f"{self.world_size} ranks (trainer.sync_batchnorm={_setting_name(self.sync_batchnorm)})")
        return len(layers)

    def close(self) -> None:
        if self._owned and tdist.is_initialized():
            tdist.destroy_process_group()


def sync_batchnorm_setting(value) -> bool | str:
    """trainer.sync_batchnorm as True, False or "auto"; DspError for anything else."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[text]
    raise DspError(f"trainer.sync_batchnorm={value!r}: choose auto (on under trainer.strategy=ddp when the model "
                   f"has BatchNorm), true or false")


def _setting_name(value) -> str:
    return value if isinstance(value, str) else str(value).lower()


# ------------------------------------------------------------------------------ scheduler ranks
def scheduler_ranks() -> dict | None:
    """The ranks of a job whose tasks a scheduler started, one process each: RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT as strings, and `source` (what said
    so), for a submitit job (SUBMITIT_EXECUTOR: its JobEnvironment, Slurm or local) or an srun
    step (SLURM_STEP_NUM_TASKS, SLURM_PROCID, ...); None elsewhere."""
    env = os.environ
    executor = env.get("SUBMITIT_EXECUTOR")
    if executor:
        try:
            import submitit

            job = submitit.JobEnvironment()
        except (ImportError, RuntimeError, KeyError):
            job = None
        if job is not None:
            return _ranks(env, job.global_rank, job.num_tasks, job.local_rank, job.num_nodes, list(job.hostnames),
                          str(job.job_id), f"submitit {executor} job {job.job_id}")
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        hosts = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "")
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or max(len(hosts), 1))
        job_id = env.get("SLURM_JOB_ID", "0")
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        return _ranks(env, int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]),
                      int(env.get("SLURM_LOCALID", 0)), nodes, hosts, job_id, f"Slurm job {job_id}")
    return None


def _ranks(env, rank: int, world: int, local: int, nodes: int, hosts: list, job_id: str, source: str) -> dict:
    nodes = max(int(nodes), 1)
    addr = env.get("MASTER_ADDR") or ("127.0.0.1" if nodes == 1 or not hosts else hosts[0])
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
            "LOCAL_WORLD_SIZE": str(max(world // nodes, 1)), "MASTER_ADDR": addr,
            "MASTER_PORT": env.get("MASTER_PORT") or str(job_port(job_id)), "source": source}


def job_port(job_id: str) -> int:
    """MASTER_PORT of a job: drawn in [20000, 60000] from its id, as submitit's
    TorchDistributedEnvironment draws it (string seeds hash the same in every process)."""
    return random.Random(str(job_id)).randint(20000, 60000)


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list: "gpu[01-03,07],cpu5" -> gpu01 gpu02 gpu03 gpu07 cpu5."""
    hosts = []
    for prefix, ranges, suffix in re.findall(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", nodelist):
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for k in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{k:0{len(lo)}d}{suffix}")
    return hosts


def setup(strategy: str | None, device_name: str, sync_batchnorm="auto") -> Single:
    """The ranks of this run: Single() for trainer.strategy=single, Distributed for ddp (under
    torchrun, or a scheduler's tasks: scheduler_ranks); `sync_batchnorm` is checked here, before
    anything loads, and kept for prepare."""
    sync = sync_batchnorm_setting(sync_batchnorm)
    strategy = strategy or "single"
    if strategy not in ("single", "ddp"):
        raise DspError(f"trainer.strategy={strategy!r}: choose single or ddp")
    tasks = None if "WORLD_SIZE" in os.environ and "RANK" in os.environ else scheduler_ranks()
    if strategy == "single":
        if tasks is not None and int(tasks["WORLD_SIZE"]) > 1 and os.environ.get("SUBMITIT_EXECUTOR"):
            raise DspError(f"this {tasks['source']} runs {tasks['WORLD_SIZE']} tasks, each the same run into the same "
                           f"folder: set trainer.strategy=ddp (one rank per task), or hydra.launcher.tasks_per_node=1 "
                           f"and hydra.launcher.nodes=1")
        single = Single()
        single.sync_batchnorm = sync
        return single
    if tasks is not None:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ[key] = tasks[key]  # (what init_process_group reads, and rank checks elsewhere)
        if tasks["RANK"] == "0":
            print(f"ddp: {tasks['WORLD_SIZE']} ranks from the {tasks['source']} (master "
                  f"{tasks['MASTER_ADDR']}:{tasks['MASTER_PORT']}, host {socket.gethostname()})", flush=True)
    elif "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise DspError("trainer.strategy=ddp needs one process per device started by torchrun, e.g. "
                       "torchrun --nproc_per_node=2 -m dsp.cli.train ... trainer.strategy=ddp, or by a job "
                       "scheduler (hydra/launcher=slurm_ddp) (WORLD_SIZE and RANK are not set)")
    dist = Distributed(device_name)
    dist.sync_batchnorm = sync
    return dist
