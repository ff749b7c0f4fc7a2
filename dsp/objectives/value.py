"""Deep value network training (Gygli et al. 2017, Algorithm 1 with batches, §3.2-3.3).

Every step, each example of the batch gets one tuple source, drawn with probability proportional
to `sources`; the source generates an output ȳ, the oracle scores it, v* = v*(ȳ, y), and the value
network regresses v(x, ȳ) onto v*:

    ce:  -v* log v - (1 - v*) log(1 - v)     (Eq. 11, on the pre-sigmoid score for stability)
    l2:  (v - v*)²

Sources (§3.3):
    ground_truth  ȳ = y, v* = 1: the positive examples.
    inference     ȳ from the inference routine passed to `loss` (train=True): gradient ascent on v
                  from ȳ = 0 with the current weights, so v is accurate where test-time inference
                  goes. trajectory="random" stops it after a random number of steps (one per
                  batch) to cover the whole path, not just its end.
    adversarial   a few projected gradient steps that *increase* the value loss w.r.t. ȳ (through
                  v and the oracle v*), from ȳ = y or ȳ = 0 (a coin per example, as the released
                  code starts its adversarial search): outputs the network misjudges most. Each
                  step moves the largest free coordinate by `adversarial_lr` (an ℓ∞-normalised
                  step, so its size does not depend on the scale of the loss).
    stratified    a simple multi-label version of stratified sampling from p(ȳ) ∝ exp(v*/τ)
                  (Norouzi et al. 2016): each of `stratified_candidates` candidates flips k bits
                  of y, k uniform in 1..stratified_max_flips (strata by number of flips, uniform
                  within a stratum); one candidate per example is resampled ∝ exp(v*/τ).

Replay (objective.replay_size, replay_batch; DVN §3.2's experience replay buffer): every step's
fresh tuples go into a ring of the last replay_size tuples, and replay_batch tuples drawn from it
join the regression beside the fresh ones. Replayed tuples cost no inference, so a step can
regress many tuples for the price of a few fresh (expensive) ones, as the paper's queue of tuples
inferred with "slightly older" weights does.

Generated ȳ are detached: gradients reach the model parameters only through v(x, ȳ). The
features F(x) are computed once per batch and reused by every source and the loss.

generate_in="eval" (default) runs the sources with the model in eval mode, so that inference tuples
come from the same deterministic ascent that predicts at test time; in train mode every ascent
step would see a fresh dropout mask (the segmentation value network has dropout on its first fully
connected layer), and the network would learn to score a noisier trajectory than the one it is
used on. generate_in="train" keeps the model as the trainer set it.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Literal, TypedDict

import torch
import torch.nn.functional as F

from dsp import interfaces as I
from dsp.errors import DspError
from dsp.inference.gradient import project_simplex
from dsp.objectives.replay import ReplayBuffer
from dsp.objectives.unrolled import one_hot_targets
from dsp.tasks.oracles import default_oracle, oracle_fn
from dsp.nn.modes import eval_mode
from dsp.schema import Count, NonNegative, Positive, Size

SOURCES = ("ground_truth", "inference", "adversarial", "stratified")


class Sources(TypedDict, total=False):
    """objective.sources: each tuple source's weight (0 switches it off)."""

    ground_truth: NonNegative
    inference: NonNegative
    adversarial: NonNegative
    stratified: NonNegative


class ValueObjective(I.Objective):
    outputs = frozenset({I.MULTILABEL, I.MASK, I.SEQUENCE})
    needs = frozenset({I.VALUE})
    checkpoint_state = True  # the replay ring
    per_rank_state = True  # ddp: each rank's replay ring holds the tuples that rank generated

    @classmethod
    def needs_for(cls, config):
        sources = config.get("sources") or {"inference": 1}
        infers = float(sources.get("inference", 0) or 0) > 0
        return cls.needs, frozenset({I.RELAXED}) if infers else frozenset()

    def __init__(
        self,
        sources: Sources | None = None,
        loss: Literal["ce", "l2"] = "ce",
        oracle: Literal["auto", "f1", "iou", "token_accuracy"] = "auto",
        trajectory: Literal["final", "random"] = "final",
        adversarial_steps: Size = 3,
        adversarial_lr: Positive = 0.1,
        stratified_temperature: Positive = 0.05,
        stratified_candidates: Size = 8,
        stratified_max_flips: Size = 10,
        generate_in: Literal["eval", "train"] = "eval",
        replay_size: Count = 0,
        replay_batch: Count = 0,
    ):
        sources = dict(sources if sources is not None else {"ground_truth": 1, "inference": 1, "adversarial": 1})
        unknown = set(sources) - set(SOURCES)
        if unknown:
            raise DspError(f"objective.sources: unknown source(s) {sorted(unknown)}; known: {list(SOURCES)}")
        if any(float(w) < 0 for w in sources.values()) or not any(float(w) > 0 for w in sources.values()):
            raise DspError(f"objective.sources: weights must be >= 0 and at least one > 0, got {sources}")
        if loss not in ("ce", "l2"):
            raise DspError(f"objective.loss={loss!r}: choose 'ce' (Eq. 11) or 'l2'")
        if trajectory not in ("final", "random"):
            raise DspError(f"objective.trajectory={trajectory!r}: choose 'final' or 'random'")
        if adversarial_steps < 1 or stratified_candidates < 1 or stratified_max_flips < 1:
            raise DspError("objective.adversarial_steps, stratified_candidates and stratified_max_flips must be >= 1")
        if generate_in not in ("eval", "train"):
            raise DspError(f"objective.generate_in={generate_in!r}: choose 'eval' (tuples from the test-time "
                           f"ascent, dropout off) or 'train'")
        if stratified_temperature <= 0:
            raise DspError(f"objective.stratified_temperature must be > 0, got {stratified_temperature}")
        self.names = [n for n in SOURCES if float(sources.get(n, 0)) > 0]
        self.weights = torch.tensor([float(sources[n]) for n in self.names])  # [S]
        self.loss_name, self.oracle_name = loss, oracle
        self._oracle = None if oracle == "auto" else oracle_fn(oracle)  # auto: chosen at the first batch
        self.trajectory = trajectory
        self.adversarial_steps, self.adversarial_lr = adversarial_steps, adversarial_lr
        self.tau, self.candidates, self.max_flips = stratified_temperature, stratified_candidates, stratified_max_flips
        self.generate_in = generate_in
        if replay_size < 0 or replay_batch < 0 or (replay_batch > 0) != (replay_size > 0):
            raise DspError(f"objective.replay_size={replay_size} and replay_batch={replay_batch}: both > 0 (a buffer "
                           "of that many tuples, that many replayed per step) or both 0 (no replay)")
        self.replay = ReplayBuffer(replay_size) if replay_size > 0 else None
        self.replay_batch = replay_batch

    # ------------------------------------------------------------------------------- the loss
    def regression(self, score: torch.Tensor, v_star: torch.Tensor) -> torch.Tensor:
        """Per-tuple value loss [B] between v = σ(score) and the oracle v*."""
        if self.loss_name == "ce":
            return F.binary_cross_entropy_with_logits(score, v_star, reduction="none")
        return (torch.sigmoid(score) - v_star) ** 2

    def state_dict(self) -> dict:
        """The replay buffer, saved with the run's checkpoints."""
        return {"replay": self.replay.state_dict()} if self.replay is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.replay is not None:
            self.replay.load_state_dict(state.get("replay", {}))

    def oracle(self, y_bar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """v*(ȳ, y) [B] against the relaxed target (one-hot rows for label sequences)."""
        if self._oracle is None:
            self._oracle = oracle_fn(default_oracle(target))
        return self._oracle(y_bar, target)

    def relaxed(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The target in the relaxed output space: one-hot rows [B, T, K] for label sequences (zero
        past each end), the 0/1 labels or masks themselves otherwise."""
        return y if y.is_floating_point() else one_hot_targets(y, num_classes)[0]

    def loss(self, model, inference, x, y):
        b = y.shape[0]
        if self._oracle is None:  # oracle=auto: the task's own score, fixed at the first batch
            self._oracle = oracle_fn(default_oracle(y))
        replayed = self.replay.sample(self.replay_batch) if self.replay is not None and len(self.replay) else None
        x_all = x if replayed is None else torch.cat([x, replayed[0]])  # fresh, then replayed examples
        y_all = y if replayed is None else torch.cat([y, replayed[2]])
        feats = model.features(x_all, I.sequence_lengths(y_all))  # computed once: the loss needs its graph ...
        fixed = feats.detach()  # ... the tuple generators (fresh examples only) do not
        if replayed is not None:
            fixed = fixed.take(torch.arange(b, device=y.device))
        num_classes = model.local_probs(fixed).shape[-1]
        target = self.relaxed(y, num_classes)  # [B, ...] in the relaxed space
        source = torch.multinomial(self.weights, b, replacement=True).to(y.device)  # [B]
        y_bar = torch.empty_like(target)
        drawn = {}
        with eval_mode(model) if self.generate_in == "eval" else nullcontext():
            for k, name in enumerate(self.names):
                idx = (source == k).nonzero().squeeze(-1)  # [n_k]
                if idx.numel() > 0:
                    drawn[name] = idx
                    y_bar[idx] = getattr(self, f"generate_{name}")(model, inference, fixed.take(idx), target[idx])
        y_bar = y_bar.detach()  # [B, ...]
        if self.replay is not None:
            self.replay.push(x, y_bar, y)  # after sampling: a step never replays its own tuples
        if replayed is not None:
            y_bar = torch.cat([y_bar, replayed[1]])  # [B + R, ...]
            target = self.relaxed(y_all, num_classes)
            drawn["replay"] = torch.arange(b, y_all.shape[0], device=y.device)
        with torch.no_grad():
            v_star = self.oracle(y_bar, target)  # [B (+ R)]
        score = model.score(y_bar, feats)  # [B (+ R)]
        loss = self.regression(score, v_star).mean()
        # How good each source's outputs are: v_star/inference is the training F1 of inference.
        logs = {f"v_star/{name}": v_star[idx].mean() for name, idx in drawn.items()}
        logs.update(v_star=v_star.mean(), value=torch.sigmoid(score.detach()).mean())
        return loss, logs

    # ---------------------------------------------------------------------------- the sources
    def generate_ground_truth(self, model, inference, feats, y):
        return y.clone()

    def generate_inference(self, model, inference, feats, y):
        if inference is None:
            raise DspError("objective.sources.inference > 0 needs an inference routine")
        if self.trajectory == "random":  # a truncated run: a random point of the trajectory
            inference = inference.at_random_step()
        return inference(model, feats, train=True).y.detach()

    def generate_adversarial(self, model, inference, feats, y, start=None):
        """Projected ℓ∞-normalised gradient ascent on the value loss w.r.t. ȳ [n, L] (§3.3),
        from `start` (default: y or 0, a coin per example; for label sequences the uniform
        distribution stands for 0, and each step is projected back onto every position's simplex)."""
        rows = model.relaxation == "simplex"  # one-hot label rows [n, T, K]
        valid = (y.sum(-1, keepdim=True) > 0).to(y.dtype) if rows else None  # [n, T, 1]
        if start is None:
            from_truth = torch.rand(y.shape[0], *([1] * (y.dim() - 1)), device=y.device) < 0.5  # [n, 1]
            blank = valid / y.shape[-1] if rows else torch.zeros_like(y)
            start = torch.where(from_truth, y, blank)
        y_bar = start.detach()
        with torch.enable_grad():
            for _ in range(self.adversarial_steps):
                y_var = y_bar.detach().requires_grad_(True)
                bad = self.regression(model.score(y_var, feats), self.oracle(y_var, y))  # [n]
                (grad,) = torch.autograd.grad(bad.sum(), y_var)  # only ∂/∂ȳ: no parameter gradients
                # Directions that leave the box are cut by the projection anyway; dropping them
                # before normalising lets the free coordinates take the full step.
                grad = grad.masked_fill(((y_bar >= 1) & (grad > 0)) | ((y_bar <= 0) & (grad < 0)), 0.0)
                # per example, over all of its coordinates (labels [n, L] or masks [n, H, W])
                scale = grad.flatten(1).abs().amax(-1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
                y_bar = y_bar + self.adversarial_lr * grad / scale
                y_bar = project_simplex(y_bar) * valid if rows else y_bar.clamp(0.0, 1.0)
        return y_bar.detach()

    def generate_stratified(self, model, inference, feats, y):
        """Flip k random bits of y in `candidates` ways, keep one ∝ exp(v*/τ) -> ȳ [n, L]; label
        sequences relabel k random positions instead."""
        if model.relaxation == "simplex" and y.dim() == 3:
            return self._stratified_sequences(y)
        flat = y.flatten(1)  # [n, L]
        n, size = flat.shape
        k = torch.randint(1, min(self.max_flips, size) + 1, (n, self.candidates, 1), device=y.device)  # [n, K, 1]
        r = torch.rand(n, self.candidates, size, device=y.device)  # [n, K, L]
        flip = r <= r.sort(-1).values.gather(-1, k - 1)  # the k smallest: k bits chosen uniformly
        cand = torch.where(flip, 1 - flat.unsqueeze(1), flat.unsqueeze(1))  # [n, K, L]
        v = self.oracle(cand.flatten(0, 1), flat.repeat_interleave(self.candidates, 0)).view(n, -1)  # [n, K]
        pick = torch.multinomial(torch.softmax(v / self.tau, -1), 1).squeeze(-1)  # [n]
        return cand[torch.arange(n, device=y.device), pick].view_as(y)

    def _stratified_sequences(self, y: torch.Tensor) -> torch.Tensor:
        """One-hot label sequences y [n, T, K] (zero rows past the end): each candidate gives k
        random valid positions a random label; one candidate per example is kept ∝ exp(v*/τ)."""
        n, t, classes = y.shape
        valid = y.sum(-1) > 0  # [n, T]
        k = torch.randint(1, min(self.max_flips, t) + 1, (n, self.candidates, 1), device=y.device)  # [n, C, 1]
        r = torch.rand(n, self.candidates, t, device=y.device).masked_fill(~valid.unsqueeze(1), 2.0)  # [n, C, T]
        chosen = (r <= r.sort(-1).values.gather(-1, k - 1)) & valid.unsqueeze(1)  # k valid positions
        labels = torch.randint(0, classes, (n, self.candidates, t), device=y.device)
        new = torch.nn.functional.one_hot(labels, classes).to(y.dtype)  # [n, C, T, K]
        cand = torch.where(chosen.unsqueeze(-1), new, y.unsqueeze(1))  # [n, C, T, K]
        v = self.oracle(cand.flatten(0, 1), y.repeat_interleave(self.candidates, 0)).view(n, -1)  # [n, C]
        pick = torch.multinomial(torch.softmax(v / self.tau, -1), 1).squeeze(-1)  # [n]
        return cand[torch.arange(n, device=y.device), pick]
