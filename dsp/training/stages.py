"""Training stages as data: each stage names its objective, the modules it trains and its
optimiser settings; anything a stage leaves out comes from the trainer config.

SPEN §A.4 is three stages: local pretraining of features + local energy, the global energy alone
with those clamped, then everything with a small learning rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from dsp.instantiate import instantiate
from dsp.errors import DspError

STAGE_KEYS = {
    "objective", "train", "predict", "optimizer", "lr", "momentum", "weight_decay",
    "max_epochs", "patience", "batch_size", "lr_factor", "lr_patience", "lr_schedule",
}
LR_SCHEDULES = ("plateau", "cosine")
PREDICT_MODES = ("inference", "local")  # the full model, or its local (unary) term alone


def check_predict_mode(model: torch.nn.Module, mode: str, key: str) -> None:
    """Refuse a prediction mode `mode` given as `key` that is unknown, or "local" for a model
    without a local term of its own (the segmentation value network: σ(0) = 0.5 everywhere)."""
    if mode not in PREDICT_MODES:
        raise DspError(f"{key}={mode!r}: choose {' or '.join(PREDICT_MODES)}")
    if mode == "local" and not model.has_local_term:
        raise DspError(f"{key}=local: {type(model).__name__} has no local term of its own (it only scores x "
                       "together with y); predict with inference")


@dataclass
class Stage:
    name: str
    objective: object
    train: list[str] | str
    predict: str
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    max_epochs: int
    patience: int
    batch_size: int
    lr_factor: float
    lr_patience: int
    lr_schedule: str = "plateau"

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Freeze everything the stage does not train; return the trained parameters.

        train: all trains every parameter of the model (model.parameters(), so also one registered
        directly on the model itself, e.g. a user's `self.temperature = nn.Parameter(...)`); a list
        names parts (model_parts: child modules or parameters registered directly on the model)."""
        if self.train == "all":
            model.requires_grad_(True)
            return list(model.parameters())
        names = set(self.train)
        for n, child in model.named_children():
            child.requires_grad_(n in names)
        for n, p in model.named_parameters(recurse=False):
            p.requires_grad_(n in names)
        out, seen = [], set()
        for n in self.train:  # the stage's order (a parameter shared by two parts only once)
            for p in part_parameters(model, n):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def frozen_children(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The child modules the stage clamps (they run in eval mode: no dropout, fixed statistics)."""
        if self.train == "all":
            return []
        return [child for n, child in model.named_children() if n not in self.train]

    def make_scheduler(self, optimizer: torch.optim.Optimizer, min_delta: float = 0.0):
        """plateau: ×lr_factor after lr_patience epochs without validation progress (step(metric));
        cosine: from lr down to 0 over the stage's max_epochs (step() once an epoch), for
        fixed-length training where no held-out metric should steer the rate."""
        if self.lr_schedule == "cosine":
            # Closed form in the epoch (not CosineAnnealingLR, whose checkpoint carries its length):
            # a run resumed with more epochs stretches the rest of the curve instead of climbing back.
            epochs = self.max_epochs
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs)))
        plateau = {"threshold": min_delta, "threshold_mode": "abs"} if min_delta > 0 else {}
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=self.lr_factor, patience=self.lr_patience, **plateau
        )

    def load_scheduler(self, scheduler, state: dict) -> None:
        """Resume: the checkpoint's schedule must be this stage's (their states do not convert)."""
        saved = "cosine" if "lr_lambdas" in state else "plateau"
        if saved != self.lr_schedule:
            raise DspError(f"stage {self.name!r}: the checkpoint was trained with lr_schedule={saved}, this run "
                           f"asks for {self.lr_schedule}; resume with trainer.lr_schedule={saved} "
                           f"(or start a new run folder)")
        scheduler.load_state_dict(state)

    def step_scheduler(self, scheduler, metric: float) -> None:
        if self.lr_schedule == "cosine":
            scheduler.step()
        else:
            scheduler.step(metric)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        raise DspError(f"stage {self.name!r}: optimizer={self.optimizer!r}, choose sgd, adam or adamw")


def model_parts(model: torch.nn.Module) -> list[str]:
    """The names a stage's `train` may list: the model's child modules and the parameters
    registered directly on the model itself."""
    return [n for n, _ in model.named_children()] + [n for n, _ in model.named_parameters(recurse=False)]


def part_parameters(model: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The parameters of part `name` of model_parts(model)."""
    direct = dict(model.named_parameters(recurse=False))
    if name in direct:
        return [direct[name]]
    return list(getattr(model, name).parameters())


def auto_batch_size(num_train: int | None) -> int:
    """trainer.batch_size=auto: 64, or for a small training set the power of two near N/16 (at least
    8), so that an epoch is about 16 steps: early stopping, the learning-rate schedule and their
    patience are counted in epochs, and 300 examples in batches of 64 would give them 5 steps each."""
    if not num_train:
        return 64
    return max(8, min(64, 2 ** math.floor(math.log2(max(num_train, 16) / 16))))


def build_stages(trainer_cfg: DictConfig, main_objective, model: torch.nn.Module,
                 num_train: int | None = None) -> list[Stage]:
    """The training stages of trainer_cfg; `num_train` (training examples) sizes batch_size=auto."""
    # A stage set to null is switched off (e.g. trainer.stages.local=null).
    stages_cfg = {k: v for k, v in (trainer_cfg.stages or {}).items() if v is not None}
    if not stages_cfg:
        raise DspError("trainer.stages is empty: give at least one stage")
    parts = set(model_parts(model))
    out = []
    for name, spec in stages_cfg.items():
        unknown = set(spec) - STAGE_KEYS
        if unknown:
            raise DspError(f"trainer.stages.{name}: unknown key(s) {sorted(unknown)}; known: {sorted(STAGE_KEYS)}")
        get = lambda key: spec.get(key) if spec.get(key) is not None else trainer_cfg.get(key)  # noqa: E731
        obj_cfg = spec.get("objective", "main")
        objective = main_objective if obj_cfg in (None, "main") else instantiate(obj_cfg, f"trainer.stages.{name}.objective")
        train = spec.get("train")
        train = "all" if train is None else train
        if isinstance(train, str) and train != "all":
            raise DspError(f"trainer.stages.{name}.train={train!r}: give all or a list of the model's parts, "
                           f"e.g. [{train}]")
        train = train if train == "all" else [str(t) for t in train]
        if not train:
            raise DspError(f"trainer.stages.{name}.train is empty: name the parts it trains, or all")
        if train != "all":
            missing = [t for t in train if t not in parts]
            if missing:
                raise DspError(
                    f"trainer.stages.{name}.train names {missing}, which the model does not have; "
                    f"the model's parts (child modules and parameters of its own) are {sorted(parts)}"
                )
        predict = spec.get("predict") or "inference"
        check_predict_mode(model, predict, f"trainer.stages.{name}.predict")
        schedule = str(get("lr_schedule") or "plateau")
        if schedule not in LR_SCHEDULES:
            where = f"trainer.stages.{name}.lr_schedule" if spec.get("lr_schedule") is not None else "trainer.lr_schedule"
            raise DspError(f"{where}={schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
        max_epochs = spec.get("max_epochs") or trainer_cfg.stage_epochs
        if trainer_cfg.max_epochs is not None:  # the run-wide cap reviewers use for quick checks
            max_epochs = min(max_epochs, trainer_cfg.max_epochs)
        out.append(Stage(
            name=name, objective=objective, train=train, predict=predict,
            optimizer=get("optimizer"), lr=float(get("lr")), momentum=float(get("momentum")),
            weight_decay=float(get("weight_decay")), max_epochs=int(max_epochs),
            patience=int(get("patience")),
            batch_size=auto_batch_size(num_train) if get("batch_size") == "auto" else int(get("batch_size")),
            lr_factor=float(get("lr_factor")), lr_patience=int(get("lr_patience")), lr_schedule=schedule,
        ))
    return out
