"""The training loop: stages, optimiser and schedule, validation with threshold tuning, early
stopping, crash-safe checkpoints, resume, logging (dsp.training.loggers) and progress.

Run folder (the contract other tools rely on):
    checkpoints/last.pt   every epoch        checkpoints/best.pt   on validation improvement
    tb/                   TensorBoard (logger=tensorboard, the default; logger=csv: scalars.csv)
    metrics.json          final "<split>/<metric>" numbers
    environment.json      one record per start (fresh or resumed) of where it ran (dsp.training.provenance)
last.pt is also written when a stage starts and, on SIGTERM, in the middle of an epoch
(`epoch_offset` examples into epoch `epoch + 1`); its predecessor is kept as last.prev.pt. Resuming
from it replays exactly what the uninterrupted run would have done: the model, optimiser, schedule,
counters and RNG states are restored and every epoch's shuffle is a function of (seed, stage, epoch).
best.pt holds the best validation epoch of the current stage, where the model the stage starts
from (epoch 0) counts too; each stage ends by restoring it (early stopping), so after the last stage
best.pt is the model that is evaluated.
trainer.strategy=ddp (torchrun, dsp.training.distributed): each rank trains on its slice of every
batch and gradients are all-reduced explicitly; only rank 0 writes the run folder and prints. One
process takes the same step path (Single: every collective is the identity).
Early stopping, the weight average (trainer.ema_decay) and online scaling (trainer.online_scaling)
are hooks (dsp.training.hooks) called at fixed points of the loop.
Every scalar is logged against the global step (train/* every trainer.log_every steps; val/*, lr and
`epoch` at the step each epoch ends); a resume continues that axis. trainer.precision runs each
training step's forward pass and loss under autocast (dsp.training.precision; validation and
evaluation stay float32), trainer.compile compiles the model's parts (dsp.training.compiling).
Progress: tqdm bars on a terminal; when stderr is not one (a Slurm log), one line per epoch.
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import closing
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dsp.errors import DspError
from dsp.seed import set_seed
from dsp.tasks import takes_rows, task_for
from dsp.training import run_folder
from dsp.training.checkpoint import (RESUME_KEYS, load_checkpoint, load_latest, refuse_used_run_dir, rng_state,
                                     save_checkpoint, set_rng_state, write_json)
from dsp.training.compiling import Compiled
from dsp.training.config_checks import check_trainer
from dsp.training.distributed import Single
from dsp.training.ema import WeightAverage
from dsp.training.hooks import EarlyStopping, Hook, Verdict
from dsp.training.loggers import DEFAULT as DEFAULT_LOGGER, Logger, check_logger, make_logger
from dsp.training.precision import Precision
from dsp.training.preemption import Preempted, StopRequest, after_step
from dsp.training.provenance import append_environment
from dsp.training.scaling import OnlineScaling
from dsp.training.stages import Stage
from dsp.training.warm_start import warm_start


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DspError(f"trainer.device={name} but no CUDA device is available; use trainer.device=auto or cpu")
    return torch.device(name)


def _keeps_state(objective) -> bool:
    return objective.checkpoint_state


def _per_rank(objective) -> bool:
    """State that differs between ranks under trainer.strategy=ddp (a replay ring of the tuples this
    rank generated), as opposed to state kept equal on every rank (the MRF's message store)."""
    return objective.checkpoint_state and objective.per_rank_state


def _to_cpu(tree):
    """A state tree with its tensors on the CPU, for gathering across ranks as a pickled object."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    return tree


def peak_memory_mb(device: torch.device) -> dict:
    """Peak resident memory of this process (and peak CUDA allocation on a GPU), in MiB."""
    import resource

    out = {"train/peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["train/peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def _hparam_value(value):
    """A setting as TensorBoard's hparams take it (int, float, str, bool), or None to leave it out."""
    if isinstance(value, (int, float, str, bool)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str, bool)) for v in value):
        return str(list(value))  # e.g. hidden=[400, 400], a stage's train=[global_energy]
    return None


class Trainer:
    def __init__(self, cfg, model, inference, stages: list[Stage], data, run_dir, device, config_dict, seed,
                 dist=None, task=None):
        self.cfg, self.model, self.inference, self.stages = cfg, model.to(device), inference, stages
        # trainer.strategy=ddp (dsp.training.distributed): this rank's part; Single() otherwise
        self.dist = dist if dist is not None else Single()
        self.main = self.dist.is_main
        self.dist.broadcast_module(self.model)
        if not self.main:  # ddp: rank r > 0 draws its own dropout masks
            set_seed(seed + 1_000_003 * self.dist.rank)
        self.data, self.run_dir, self.device = data, Path(run_dir), device
        self.config_dict, self.seed = config_dict, seed
        # where scalars go (checked now: a logger whose package is missing is refused before training)
        config_dict = config_dict if isinstance(config_dict, dict) else {}
        self.logger_spec = check_logger(config_dict["logger"] if "logger" in config_dict else DEFAULT_LOGGER)
        # trainer.precision (autocast in training steps) and trainer.compile (the model's parts)
        self.precision = Precision(cfg.get("precision") or "fp32", device)
        self.compiled = Compiled(self.model, cfg.get("compile", False), device, verbose=self.main)
        self.task = task if task is not None else task_for(data)
        # trainer.monitor=auto: the task's headline metric (example_f1, char_acc, chunk_f1)
        self.monitor = self.task.main_metric if cfg.monitor in (None, "auto") else cfg.monitor
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.splits = {s: tuple(t.to(device) for t in data.split(s).tensors) for s in ("train", "val", "test")}
        self.step = 0
        self.global_epoch = 0
        self.train_seconds = 0.0  # time spent in training steps (validation and probes excluded)
        self._last_val = None  # (out, y, x) of the latest validation, for tasks with figures
        self._probe_batch = None  # the probe's fixed examples, drawn on first use
        self._stop = StopRequest()  # entered by fit(): SIGTERM asks for a stop at the next safe point
        self.target_reached_s = None  # trainer.stop_at: wall time at which validation reached it
        # min_delta: the smallest change of the monitored metric that counts as progress, for the
        # schedule and for early stopping alike (the scaling paper's Appendix B uses 0.1 points).
        self.min_delta = float(cfg.get("min_delta") or 0.0)
        # trainer.ema_decay: validation and checkpoints use a moving average of the weights
        self.ema = WeightAverage(self.model, cfg.ema_decay) if cfg.get("ema_decay") is not None else None
        # the hooks, in calling order (trainer.online_scaling is checked now rather than after the first epoch)
        self.early_stopping = EarlyStopping(self.min_delta, cfg.get("stop_at"))  # (and trainer.stop_at)
        self.hooks: list[Hook] = [self.early_stopping,
                                  *([self.ema] if self.ema is not None else []),
                                  *([OnlineScaling(cfg.online_scaling)] if cfg.get("online_scaling") is not None else [])]

    @property
    def predictor(self) -> torch.nn.Module:
        """The weights that predict: the moving average under trainer.ema_decay, else the live model."""
        return self.ema.module if self.ema is not None else self.model

    def _load_weights(self, weights: dict) -> None:
        """Make `weights` (a best.pt's) the live model (and restart the average from them)."""
        self.model.load_state_dict(weights)
        self._call("on_weights_loaded")

    def _call(self, event: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def _should_stop(self, stage: Stage) -> bool:
        return any(hook.should_stop(self, stage) for hook in self.hooks)

    def _on_validation(self, stage: Stage, epoch: int, current: float) -> Verdict:
        """The hooks' verdicts on a validation, together: best if any says so, the first reason to stop."""
        verdicts = [hook.on_validation(self, stage, epoch, current) for hook in self.hooks]
        verdicts = [v for v in verdicts if v is not None]
        return Verdict(best=any(v.best for v in verdicts), stop=next((v.stop for v in verdicts if v.stop), None))

    # ----------------------------------------------------------------------------------- eval
    def predict(self, split: str, mode: str):
        x, y = self.splits[split]
        # inference with learned parts (model.inference, see dsp.build.attach_inference) is averaged too
        inference = dict(self.predictor.named_children()).get("inference", self.inference)
        out, iters = self.task.predict(self.predictor, inference, x, y, self.cfg.eval_batch_size, mode)
        return out, y, iters

    def validate(self, mode: str):
        out, y, iters = self.predict("val", mode)
        self._last_val = (out, y, self.splits["val"][0])  # for the task's TensorBoard figures
        threshold = self.task.calibrate(out, y, self.cfg.threshold)
        metrics = self.task.evaluate(out, y, threshold)
        if self.monitor not in metrics:
            raise DspError(f"trainer.monitor={self.monitor!r} is not a metric of this task; "
                           f"choose one of {sorted(metrics)} (or auto)")
        return metrics, threshold, iters

    # ---------------------------------------------------------------------------- checkpoints
    def _state(self, stage_index, epoch, threshold, optimizer, scheduler, offset=0):
        """Plain values and tensors only: checkpoints load with torch.load(weights_only=True)."""
        hooks = {}  # the hooks' own entries: early stopping's best_metric and bad_epochs; trainer.ema_decay's
        for hook in self.hooks:  # live weights (train_model) and the average's age (ema_updates)
            hooks.update(hook.checkpoint(self))
        return {
            "model": self.predictor.state_dict(),  # what predicts (dsp-eval, init_from read this)
            **hooks,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "stage_index": stage_index,
            "stage": self.stages[stage_index].name,
            "predict": self.stages[stage_index].predict,
            "epoch": epoch,  # the stage's last completed epoch
            "epoch_offset": offset,  # examples of epoch + 1 already trained on (a SIGTERM checkpoint)
            "global_epoch": self.global_epoch,
            "step": self.step,
            "threshold": threshold,
            # the preprocessing fitted on the training features (filled `?`, standardisation):
            # dsp-predict applies it to new inputs without the training files
            "input_transform": _input_transform(self.data),
            "config": self.config_dict,
            "seed": self.seed,
            # wall clock so far and trainer.stop_at's time to target: a resumed run keeps counting
            "elapsed_s": self.elapsed_s(),
            "target_reached_s": self.target_reached_s,
            "rng": rng_state(),
            **self.precision.state_dict(),  # trainer.precision=fp16: the gradient scaler's scale
            # objectives with state of their own (the MRF's per-example messages; rank 0's under ddp)
            "objectives": {s.name: s.objective.state_dict() for s in self.stages if _keeps_state(s.objective)},
            **(self._rank_states() if self.dist.enabled else {}),
        }

    def _rank_states(self) -> dict:
        """trainer.strategy=ddp: what differs between ranks, gathered in one collective so that rank r
        resumes from its own: every rank's generators (rng_ranks) and the per-rank objective state of
        ranks 1.. (objectives_ranks; rank 0's is in "objectives")."""
        own = {s.name: _to_cpu(s.objective.state_dict()) for s in self.stages if _per_rank(s.objective)}
        ranks = self.dist.all_gather_object((rng_state(), own))
        out = {"rng_ranks": [rng for rng, _ in ranks]}
        if own:
            out["objectives_ranks"] = {name: [objs[name] for _, objs in ranks[1:]] for name in own}
        return out

    def _save(self, state: dict, name: str, **kwargs) -> None:
        if self.main:  # under trainer.strategy=ddp only rank 0 writes
            save_checkpoint(state, self.ckpt_dir / name, **kwargs)

    def _save_last(self, state: dict) -> None:
        """Write last.pt, then stop here if a preemption signal asked for it (this is a safe point)."""
        self._save(state, "last.pt", keep_previous=True)
        if self.dist.any(self._stop.requested):  # every rank stops here if any rank was asked to
            if self.main:  # the next start of this job into this folder continues it (run_folder.continues)
                run_folder.mark_preempted(self.run_dir, self._stop.signal_name, self.step)
            where = (f"{state['epoch_offset']} examples into epoch {state['epoch'] + 1}" if state["epoch_offset"]
                     else f"after epoch {state['epoch']}")
            raise Preempted(
                f"{self._stop.signal_name} received: saved {self.ckpt_dir / 'last.pt'} at stage {state['stage']!r}, "
                f"{where} (step {self.step}); continue with trainer.resume=true hydra.run.dir={self.run_dir}",
                self._stop.signum)

    def _resume_state(self):
        if not self.cfg.resume and not run_folder.continues(self.run_dir):  # (a preempted or requeued run does)
            refuse_used_run_dir(self.run_dir)  # never overwrite a finished or running run
            return None
        latest = load_latest(self.ckpt_dir, map_location=self.device, require=RESUME_KEYS)  # last.pt, or last.prev.pt
        if latest is None:
            if (self.run_dir / "metrics.json").is_file():
                raise DspError(f"{self.run_dir} holds a finished run's metrics.json but no checkpoint to resume "
                               f"from; choose another hydra.run.dir rather than replace its results")
            return None  # nothing to resume yet: start the run
        state, last = latest
        if isinstance(state.get("config"), dict):  # what it continues is what the checkpoint was trained with
            try:
                run_folder.refuse_changed_resume(state["config"], self.config_dict, last)
            except DspError:
                if self.main:  # a sweeper's job is checked only here, after Hydra rewrote .hydra/: put it back
                    run_folder.restore_record(self.run_dir)
                raise
        if state["stage_index"] >= len(self.stages) or state["stage"] != self.stages[state["stage_index"]].name:
            raise DspError(f"{last} was written by stage {state['stage']!r}, which this config's "
                           f"trainer.stages does not have at that position; resume with the run's own config")
        try:  # (trainer.ema_decay: the live weights; the hooks read their own entries at the stage's start)
            self.model.load_state_dict(state.get("train_model", state["model"]))
        except RuntimeError as err:
            raise DspError(f"{last} does not fit the model of this config ({err}); resume with the run's own config") from None
        self.step, self.global_epoch = state["step"], state["global_epoch"]
        self.precision.load_state_dict(state)
        ranks = state.get("rng_ranks")
        set_rng_state(ranks[self.dist.rank] if ranks and len(ranks) == self.dist.world_size else state["rng"])
        for s in self.stages:
            if s.name in state.get("objectives", {}):
                others = state.get("objectives_ranks", {}).get(s.name)
                own = (others[self.dist.rank - 1] if self.dist.rank > 0 and others
                       and len(others) == self.dist.world_size - 1 else state["objectives"][s.name])
                s.objective.load_state_dict(own)
        offset = state.get("epoch_offset", 0)  # absent from checkpoints older than SIGTERM handling
        self.write(f"resuming {self.run_dir} at stage {state['stage']!r}, epoch {state['epoch'] + 1}"
                  + (f", example {offset}" if offset else ""))
        return state

    def write(self, message: str) -> None:
        if self.main:
            tqdm.write(message)

    # ---------------------------------------------------------------------------------- train
    def fit(self) -> dict:
        self.fit_start = time.time()
        check_trainer(self.cfg)  # dsp-train checked already; Trainer is also used from Python
        self._time_spent_reported = False
        self.target_reached_s = None  # trainer.stop_at: wall time at which validation reached it
        resume = self._resume_state()
        if self.main:  # this start is accepted: its .hydra record is the one a refused resume puts back
            run_folder.keep_record(self.run_dir)
        if resume is not None:  # the clock and stop_at's verdict continue from the checkpoint
            self.fit_start -= resume.get("elapsed_s", 0.0)
            self.target_reached_s = resume.get("target_reached_s")
        self.dist.barrier()  # every rank has checked the run folder before rank 0 writes to it
        if self.main:
            append_environment(self.run_dir / "environment.json", self.device)
        # every logger continues the step axis of the checkpoint a resume starts from (dsp.training.loggers)
        writer = (make_logger(self.logger_spec, self.run_dir, resume_step=None if resume is None else resume["step"],
                              params=self.hparams()) if self.main else Logger())
        if resume is None and self.cfg.get("init_from"):  # warm start: weights only (dsp.training.warm_start)
            path, n = warm_start(self.model, self.cfg.init_from, self.cfg.get("init_parts", "all"))
            self.write(f"warm start: {n} weight tensors from {path}")
        first_stage = resume["stage_index"] if resume else 0
        with self._stop, closing(writer):
            if self.target_reached_s is not None:  # resuming a run that already reached stop_at
                self.load_best()
            for i in range(first_stage, len(self.stages)):
                if self.target_reached_s is not None:
                    break  # trainer.stop_at: good enough, skip the remaining stages
                if i > first_stage and self._out_of_budget():
                    break  # max_steps / max_time_s spent: a later stage would only re-validate its baseline
                self._fit_stage(i, writer, resume if i == first_stage else None)
            finished = self._finished_metrics(resume)
            if finished is not None:  # a finished run resumed with nothing left to train: its files stay
                self.write(f"{self.run_dir} is finished (nothing left to train); its metrics.json is kept")
                return finished
            self._stop.stop_at_once(
                f"a preemption signal came after training, before the final evaluation ended: the checkpoints "
                f"are complete; write metrics.json with trainer.resume=true hydra.run.dir={self.run_dir}, or "
                f"evaluate with dsp-eval run_dir={self.run_dir}")
            metrics = None
            if self.main:  # ranks > 0 hold the same model; rank 0 evaluates it and tells them
                metrics, predict_mode = self.final_metrics()
                self._log_inference_figures(writer, predict_mode)
                metrics["train/time_s"] = self.elapsed_s()
                if self.cfg.get("stop_at") is not None:  # time to accuracy (validation reached stop_at)
                    metrics["train/time_to_target_s"] = self.target_reached_s
                metrics["train/epochs"] = self.global_epoch
                metrics.update(peak_memory_mb(self.device))
                writer.hparams(self.hparams(), {k: v for k, v in metrics.items() if v is not None})
            metrics = self.dist.broadcast_object(metrics)
        if self.main:
            write_json(metrics, self.run_dir / "metrics.json")
            run_folder.clear_preempted(self.run_dir)  # finished: a new start here is refused again
        return metrics

    def _finished_metrics(self, resume: dict | None) -> dict | None:
        """The metrics.json of a run that was finished when this resume started and trained no step since."""
        if resume is None or self.step != resume["step"]:
            return None
        try:
            metrics = json.loads((self.run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            return None  # not finished, or its metrics.json is damaged: evaluate again
        return metrics if isinstance(metrics, dict) else None

    def _fit_stage(self, index: int, writer: Logger, resume: dict | None) -> None:
        """The loop of one stage: epochs of optimiser steps, each followed by a validation and the
        checkpoints; early stopping, the weight average and online scaling are hooks (self.hooks)."""
        stage = self.stages[index]
        params = stage.parameters(self.model)
        optimizer = stage.make_optimizer(params)
        scheduler = stage.make_scheduler(optimizer, self.min_delta)
        first_epoch, offset = 1, 0
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            stage.load_scheduler(scheduler, resume["scheduler"])
            threshold, first_epoch, offset = resume["threshold"], resume["epoch"] + 1, resume.get("epoch_offset", 0)
        self._call("on_stage_start", stage, resume)
        if resume is None:
            # The incoming model (epoch 0) is the stage's baseline (for best.pt).
            metrics, threshold, _ = self.validate(stage.predict)
            self._on_validation(stage, 0, metrics[self.monitor])
            state = self._state(index, 0, threshold, optimizer, scheduler)
            self._save(state, "best.pt")
            # last.pt follows into the new stage, so a resume never re-enters a finished stage
            # (whose end reloads best.pt, by now this stage's file).
            self._save_last(state)
        x, y = self.splits["train"]
        # trainer.progress: tqdm bars on a terminal; one line per epoch when stderr is not one (a
        # Slurm log, a pipe), where every refresh of a bar would be a line of its own
        progress = self.cfg.progress and self.main and sys.stderr.isatty()
        lines = self.cfg.progress and self.main and not progress
        epochs = tqdm(range(first_epoch, stage.max_epochs + 1), desc=f"stage {stage.name}",
                      disable=not progress, leave=False, dynamic_ncols=True)
        if stage.batch_size < self.dist.world_size:
            raise DspError(f"stage {stage.name!r}: batch_size={stage.batch_size} is smaller than the "
                           f"{self.dist.world_size} ranks of trainer.strategy=ddp; the batch size is the global batch")
        # Objectives that keep state per training example (blended MRF learning) get the ids.
        by_id = stage.objective.per_example_state
        task_by_id = takes_rows(self.task)
        # trainer.strategy=ddp: per-example state (the MRF's MessageStore) is kept equal on all ranks
        store = stage.objective.shared_rows() if by_id else None
        for epoch in epochs:
            # (a resumed half epoch is finished first: the uninterrupted run did not stop there)
            if not offset and (self._should_stop(stage) or self._out_of_budget()):
                break
            self.model.train()
            for child in stage.frozen_children(self.model):  # clamped parts: fixed feature extractors
                child.eval()
            # One shuffle per (seed, stage, epoch): a resumed run sees the same batches.
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index * 1009 + epoch)
            perm = torch.randperm(x.shape[0], generator=gen).to(self.device)
            batches = tqdm(range(offset, x.shape[0], stage.batch_size), desc=f"epoch {epoch}",
                           disable=not progress, leave=False, dynamic_ncols=True)
            stream = self._stream(perm, stage.batch_size, offset)
            offset = 0
            running, loss_sum, loss_steps, epoch_start = None, 0.0, 0, time.perf_counter()
            for start in batches:
                idx = perm[start : start + stage.batch_size]
                step_start = time.perf_counter()
                # ddp: this rank's slice [lo, hi) of the global batch (all of it in one process)
                lo, hi = self.dist.shard(len(idx))
                mine = idx[lo:hi]
                extra = {"index": mine} if by_id else {}
                rows = {"index": mine} if task_by_id else {}
                if stream is None:
                    xb, yb = x[mine], y[mine]
                else:  # (pinned on CUDA by the reader thread, so the copy is asynchronous)
                    xb, yb = (t[lo:hi].to(self.device, non_blocking=True) for t in next(stream))
                optimizer.zero_grad(set_to_none=True)
                logs, loss = {}, torch.zeros((), device=self.device)
                stop = self._stop.requested  # (ddp: agreed on by all ranks in reduce_step)
                if hi > lo:  # (ddp: a rank may get no example of a short last batch)
                    batch = self.task.batch(xb, yb, **rows)
                    # ddp: weighted by slice size, the summed gradients are the global batch's (one process: not even × 1.0)
                    weight = (hi - lo) / len(idx) if hi - lo < len(idx) else None
                    loss, logs = self._loss_and_backward(stage, optimizer, batch, extra, weight)
                # ddp: gradients summed over ranks, the global loss and whether any rank was asked to stop
                value, stop = self.dist.reduce_step(params, loss, stop)
                self._check_finite(value, stage, epoch)
                self.dist.sync_store(store, idx, lo, hi)
                if self.cfg.grad_clip:
                    self.precision.unscale(optimizer)  # fp16: clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
                self.precision.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
                self._call("on_step_end", stage)
                self.step += 1
                self.train_seconds += time.perf_counter() - step_start
                self._probe(stage, writer)
                running = value if running is None else 0.9 * running + 0.1 * value
                loss_sum, loss_steps = loss_sum + value, loss_steps + 1
                batches.set_postfix(loss=f"{running:.4f}")
                if self.step % self.cfg.log_every == 0:
                    writer.scalar(f"train/loss_{stage.name}", value, self.step)
                    for k, v in logs.items():
                        writer.scalar(f"train/{k}", float(v), self.step)
                after_step(self.step)  # the kill / preemption test hook (dsp.training.preemption)
                if self._out_of_steps():
                    break  # (a SIGTERM now stops after this epoch's validation)
                if self.dist.stop_now(stop, self._stop.requested):  # save this point of the epoch and stop
                    self._save_last(self._state(index, epoch - 1, threshold, optimizer, scheduler,
                                                offset=start + len(idx)))
            self.global_epoch += 1
            self._call("on_epoch_end", stage, writer)
            metrics, threshold, iters = self.validate(stage.predict)
            metrics, threshold = self.dist.broadcast_object((metrics, threshold))  # ddp: decide alike
            current = metrics[self.monitor]
            stage.step_scheduler(scheduler, current)
            verdict = self._on_validation(stage, epoch, current)
            if self.main:
                self._log_epoch(writer, stage, metrics, threshold, iters, optimizer)
            epochs.set_postfix({self.monitor: f"{current:.2f}", "best": f"{self.early_stopping.best:.2f}"})
            if lines:
                loss_text = f"loss {loss_sum / loss_steps:.4f}" if loss_steps else "no steps"
                print(f"stage {stage.name} epoch {epoch}/{stage.max_epochs} (step {self.step}): {loss_text}, "
                      f"val {self.monitor} {current:.2f} (best {self.early_stopping.best:.2f}), "
                      f"{time.perf_counter() - epoch_start:.1f} s", file=sys.stderr, flush=True)
            state = self._state(index, epoch, threshold, optimizer, scheduler)
            if verdict.best:
                self._save(state, "best.pt")
            self._save_last(state)
            if verdict.stop:
                self.write(verdict.stop)
                break
        self._call("on_stage_end", stage)  # early stopping: continue from (and finish with) best.pt

    def load_best(self) -> None:
        """Make the current best.pt the live model (on every ddp rank) and train all of it."""
        if self.main:
            self.model.load_state_dict(load_checkpoint(self.ckpt_dir / "best.pt", map_location=self.device)["model"])
        self.dist.broadcast_module(self.model)  # ddp: rank 0's reloaded weights everywhere
        self._call("on_weights_loaded")  # trainer.ema_decay: the next stage averages from these weights
        self.model.requires_grad_(True)

    def elapsed_s(self) -> float:
        """The run's wall clock so far (validation included, counted across resumes)."""
        return round(time.time() - self.fit_start, 3)

    def _check_finite(self, value: float, stage: Stage, epoch: int) -> None:
        if not math.isfinite(value):
            raise DspError(
                f"training diverged: the loss is {value} at stage {stage.name!r}, epoch {epoch}, "
                f"step {self.step}. Nothing was saved from this epoch; the last good checkpoint "
                f"is {self.ckpt_dir / 'last.pt'}. Lower the learning rate or add weight decay."
            )

    def _loss_and_backward(self, stage: Stage, optimizer, batch, extra: dict, weight: float | None):
        """The objective's loss on a batch under trainer.precision's autocast, and its backward
        (fp16: scaled). trainer.compile: an error while compiled (in the compiled forward or its
        backward, e.g. a double backward) turns compilation off and repeats the step eagerly."""
        while True:
            try:
                with self.precision.autocast():
                    loss, logs = stage.objective.loss(self.model, self.inference, *batch, **extra)
                if weight is not None:
                    loss = loss * weight
                self.precision.backward(loss)
                return loss, logs
            except DspError:
                raise
            except Exception as err:  # noqa: BLE001 -- re-raised unless compilation was the cause
                if not self.compiled.revert(err):
                    raise
                optimizer.zero_grad(set_to_none=True)  # what the failed backward accumulated

    def _stream(self, perm: torch.Tensor, batch_size: int, start: int):
        """data.stream=true (Word50) or trainer.stream=true (any dataset): read this epoch's training
        batches from an HDF5 file in a background thread — the same examples in the same order as
        the in-memory path. Datasets without a file of their own are cached to run_dir/data.h5."""
        if not (self.data.stream or self.cfg.get("stream", False)):
            return None
        from dsp.data.hdf5_stream import PrefetchBatches, cache_to_hdf5

        if self.data.source:
            source = self.data.source
        else:
            source = self.run_dir / "data.h5"
            if not source.is_file() and self.main:
                cache_to_hdf5(self.data, source)
            self.dist.barrier()  # ddp: rank 0 wrote it before the others read it
        return iter(PrefetchBatches(source, "train", perm.cpu(), batch_size, start=start,
                                    pin_memory=self.device.type == "cuda"))

    def _probe(self, stage: Stage, writer: Logger) -> None:
        """trainer.probe_every > 0: every that many steps, log the objective's probe (e.g. the MRF's
        converged training NLL) on the first trainer.probe_size training examples, against the
        training time so far (Chen et al. Fig. 9 plots NLL against time)."""
        every = self.cfg.get("probe_every") or 0
        probe = stage.objective.probe
        if not every or self.step % every or not self.main:
            return
        if self._probe_batch is None:  # drawn once: task.batch may augment, and the probe compares steps
            x, y = (t[: self.cfg.get("probe_size") or 1000] for t in self.splits["train"])
            rows = {"index": torch.arange(x.shape[0], device=x.device)} if takes_rows(self.task) else {}
            self._probe_batch = self.task.batch(x, y, **rows)
        with torch.no_grad():
            values = probe(self.model, *self._probe_batch)
        writer.scalar("time/train_s", self.train_seconds, self.step)
        for k, v in values.items():
            writer.scalar(f"train/{k}", v, self.step)

    def _out_of_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def _out_of_budget(self) -> bool:
        """trainer.max_steps or trainer.max_time_s is spent (checked between epochs)."""
        return self._out_of_steps() or self._out_of_time()

    def _out_of_time(self) -> bool:
        """trainer.max_time_s is spent: the run's wall clock (validation included, counted across
        resumes) has reached it. Checked between epochs, so a run overshoots by at most one epoch and
        its validation; rank 0's clock decides for every ddp rank (their clocks differ slightly)."""
        limit = self.cfg.get("max_time_s")
        if limit is None:
            return False
        spent = self.dist.broadcast_object(time.time() - self.fit_start >= float(limit))
        if spent and not self._time_spent_reported:
            self._time_spent_reported = True
            self.write(f"trainer.max_time_s={limit} spent after {time.time() - self.fit_start:.1f} s; "
                       f"stopping and evaluating best.pt")
        return spent

    def _log_epoch(self, writer, stage, metrics, threshold, iters, optimizer) -> None:
        """After an epoch's validation, at the global step the epoch ended on (the axis of train/*);
        the epoch itself is the scalar `epoch` (epochs so far, counted across stages)."""
        s = self.step
        writer.scalar("epoch", self.global_epoch, s)
        for k, v in metrics.items():
            writer.scalar(f"val/{k}", v, s)
        if threshold is not None:
            writer.scalar("val/threshold", threshold, s)
        writer.scalar("val/inference_iters", iters, s)
        writer.scalar("lr", optimizer.param_groups[0]["lr"], s)
        writer.scalar("time/elapsed_s", time.time() - self.fit_start, s)  # wall clock, validation included
        if self._last_val is not None:  # e.g. denoising: noisy / prediction / clean
            for name, arr in self.task.figures(*self._last_val).items():
                writer.image(f"val/{name}", arr, s, dataformats="HW")
        # e.g. the CRF's unary / pairwise ratio (scaling paper, Fig. 1b)
        x, y = (t[: self.cfg.eval_batch_size] for t in self.splits["train"])
        for k, v in self.model.diagnostics(x, y).items():
            writer.scalar(k, v, s)
        # e.g. the MRF's pairwise tables (Chen et al. Fig. 5, 8), a SPEN's measurements C1 (SPEN Fig. 1)
        for name, img in self.model.images().items():
            writer.image(f"model/{name}", img, s, dataformats="HW")

    def _log_inference_figures(self, writer, predict_mode) -> None:
        """Once, with best.pt loaded: e.g. the DVN's shape prior and inference trajectory (Figure 5, 1)."""
        for name, img in self.task.inference_figures(self.model, self.inference, self.splits["train"], self.splits["val"],
                                 self.cfg.eval_batch_size, predict_mode).items():
            writer.image(f"figures/{name}", img, self.step, dataformats="HWC")

    def final_metrics(self) -> tuple[dict, object]:
        """Reload best.pt and evaluate val and test with its validation-tuned threshold;
        returns (metrics, best.pt's prediction mode)."""
        state = load_checkpoint(self.ckpt_dir / "best.pt", map_location=self.device)
        self._load_weights(state["model"])
        out = {} if state["threshold"] is None else {"val/threshold": state["threshold"]}
        for split in ("val", "test"):
            pred, y, iters = self.predict(split, state["predict"])
            for k, v in self.task.evaluate(pred, y, state["threshold"]).items():
                out[f"{split}/{k}"] = v
            out[f"{split}/inference_iters"] = iters
        return out, state["predict"]

    def hparams(self) -> dict:
        """The run's identity as flat settings: seed, the data's settings (data.*: loader, files,
        sizes) and the sizes read from it (dims.*, examples.<split>), model.*, inference.*,
        objective.* and trainer.*; lists of plain values as their text."""
        flat = {}

        def walk(prefix, node):
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif (value := _hparam_value(node)) is not None:
                flat[prefix] = value

        config = self.config_dict if isinstance(self.config_dict, dict) else {}
        walk("", {k: config.get(k) for k in ("seed", "data", "dims", "model", "inference", "objective", "trainer")})
        flat.setdefault("seed", self.seed)
        for split, tensors in getattr(self, "splits", {}).items():
            flat[f"examples.{split}"] = int(tensors[0].shape[0])
        return flat


def _input_transform(data) -> dict | None:
    transform = getattr(data, "input_transform", None)
    return None if transform is None else {k: v.cpu() for k, v in transform.state_dict().items()}
