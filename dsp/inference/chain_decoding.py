"""Prediction for chain CRFs: Viterbi MAP, per-position argmax of exact or mean-field marginals,
or argmax of the unaries alone. `method: auto` takes the decoding that matches the training
objective (MAP for likelihood and SSVM, marginals for the cross-entropies), so switching
`objective=` switches prediction too.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch

from dsp import interfaces as I
from dsp.errors import DspError
from dsp.inference import chain
from dsp.inference.gradient import InferenceResult
from dsp.inference.mean_field import mean_field_marginals
from dsp.schema import Count

Method = Literal["viterbi", "marginals", "mean_field", "unary"]
METHODS = get_args(Method)


class ChainDecoding(I.Inference):
    outputs = frozenset({I.SEQUENCE})
    needs = frozenset({I.CHAIN_POTENTIALS})

    def __init__(self, method: Literal["auto"] | Method = "auto", mean_field_sweeps: Count = 5):
        if method not in METHODS + ("auto",):
            raise DspError(f"inference.method={method!r}: choose one of auto, {', '.join(METHODS)}")
        self.method, self.sweeps = method, mean_field_sweeps

    def match(self, objective) -> None:
        """Resolve method=auto from the objective's `prediction` (called once the run is built)."""
        if self.method == "auto":
            self.method = objective.prediction if objective.prediction in METHODS else "viterbi"
            if self.method == "mean_field":  # the sweeps the objective trained with
                self.sweeps = objective.sweeps

    def __call__(self, model, feats, lengths=None) -> InferenceResult:
        u, w, lengths = feats.unary, feats.pairwise, feats.lengths
        method = "viterbi" if self.method == "auto" else self.method
        iterations = 1
        with torch.no_grad():
            if method == "viterbi":
                labels, score = chain.viterbi(u, w, lengths)
            else:
                if method == "marginals":
                    q = chain.marginals(u, w, lengths)
                elif method == "mean_field":
                    q, iterations = mean_field_marginals(u, w, lengths, sweeps=self.sweeps), self.sweeps
                else:
                    q = u
                labels = q.argmax(-1).masked_fill(~chain.mask_from_lengths(lengths, u.shape[1]), -1)  # [B, T]
                score = chain.sequence_score(labels, u, w, lengths)
        done = torch.ones(u.shape[0], dtype=torch.bool, device=u.device)
        return InferenceResult(labels, iterations, done, score)
