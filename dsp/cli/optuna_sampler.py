"""The Optuna presets' sampler (conf/hparams_search/optuna.yaml): TPE whose seed moves on with the study.

A seeded sampler draws the same points every time it starts, so a study continued from its storage
(hydra.sweeper.storage=sqlite:///<first sweep>/optuna.db) with the preset's fixed seed would re-draw
exactly the parameters of its first trials, and spend its budget re-running them. ContinuedTPESampler
takes TPESampler's settings; when it draws its first trial it offsets the seed by that trial's number,
i.e. by the number of trials the study already holds (finished, failed or left running alike). A new
study (trial 0) draws what TPESampler(seed=seed) draws; the same storage state gives the same draws,
so a continued study is as reproducible as a fresh one. seed=null stays unseeded.

It offsets the seed lazily, at the first trial, rather than counting the stored trials when it is
built: Hydra builds the sampler before the sweeper opens (or creates) the study, and the first trial's
number is the count of what was there, read from the study the sweeper actually uses.
"""
from __future__ import annotations

import logging

from optuna.samplers import BaseSampler, TPESampler

log = logging.getLogger(__name__)


class ContinuedTPESampler(BaseSampler):
    """optuna.samplers.TPESampler(seed=seed + <trials already in the study>, **settings)."""

    def __init__(self, seed: int | None = None, **settings) -> None:
        self.seed, self.settings = seed, settings
        self.offset: int | None = None  # the trials the study held at the first draw (None: nothing drawn yet)
        self._settled = False  # the seed is chosen: at the first draw, or by reseed_rng
        self._sampler = TPESampler(seed=seed, **settings)  # built now, so that a bad setting fails at once

    def _for(self, trial) -> BaseSampler:
        if not self._settled:
            self._settled, self.offset = True, trial.number
            if self.offset and self.seed is not None:
                self._sampler = TPESampler(seed=self.seed + self.offset, **self.settings)
                log.info(f"continuing a study of {self.offset} trials: TPE seed {self.seed} + {self.offset}")
        return self._sampler

    # BaseSampler's interface, handed to the TPE sampler (before_trial: Optuna 3, after_trial: 2.x and 3)
    def before_trial(self, study, trial) -> None:
        sampler = self._for(trial)
        if hasattr(sampler, "before_trial"):
            sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._for(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:  # a fresh random seed (optimize(n_jobs>1)): kept, not replaced at the first draw
        self._settled = True
        self._sampler.reseed_rng()
