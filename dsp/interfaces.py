"""The contracts between dsp's parts: what a data set, a model, an inference routine, an objective and
a task provide and need.

Every part declares, as class attributes, the **output kinds** it works on and the **capabilities**
it provides or needs (the tables below). `dsp.compat` reads those declarations from the `_target_`
classes of a config, before any data is loaded or any file written, and refuses a combination that
cannot work, naming the parts, the missing capability and the choices that would fit. A user's own
model, routine, objective or data loader plugs in by subclassing the base class here and declaring
the same attributes (docs/EXTENDING.md).

Shapes: B examples in a batch, L labels, T positions of a sequence, K classes, H×W pixels.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch
from torch import nn

# ------------------------------------------------------------------------------ output kinds
MULTILABEL, SEQUENCE, MASK, IMAGE = "multilabel", "sequence", "mask", "image"
OUTPUT_KINDS = {
    MULTILABEL: "y [B, L] in {0, 1}; relaxed ȳ [B, L] in [0, 1]",
    SEQUENCE: "y [B, T] class ids in 0..K-1, -1 after each sequence's end; relaxed ȳ [B, T, K], rows on the simplex",
    MASK: "binary masks y [B, H, W]; relaxed ȳ [B, H, W] in [0, 1]",
    IMAGE: "real-valued images y [B, H, W] (denoising)",
}

# ------------------------------------------------------------------------------- input kinds
VECTORS, IMAGE_SEQUENCES, TOKEN_SEQUENCES, IMAGES = "vectors", "image sequences", "token sequences", "images"
INPUT_KINDS = {
    VECTORS: "x [B, D] feature vectors",
    IMAGE_SEQUENCES: "x [B, T, ...] one image or feature vector per position",
    TOKEN_SEQUENCES: "x [B, T, F] integer ids per position (word, tag, characters)",
    IMAGES: "x [B, C, H, W] or [B, H, W] images",
}

# -------------------------------------------------------------------------- model capabilities
ENERGY = "energy"
SMOOTH_ENERGY = "smooth_energy"
LOCAL = "local"
LOCAL_LOGITS = "local_logits"
VALUE = "value"
CHAIN_POTENTIALS = "chain_potentials"
REGION_POTENTIALS = "region_potentials"
GAUSSIAN_POTENTIALS = "gaussian_potentials"
SCALABLE_LOCAL = "scalable_local"
MODEL_CAPABILITIES = {
    ENERGY: "energy(ȳ, feats) -> [B]: an energy differentiable in the relaxed output ȳ (gradient and "
            "unrolled inference, the structured SVM)",
    SMOOTH_ENERGY: "an energy twice differentiable in ȳ (its ȳ-parts free of ReLU-like kinks), which unrolled "
                   "learning differentiates through its gradient steps",
    LOCAL: "local_probs(feats) -> a relaxed output from the local term alone (inference init=local, "
           "predict=local, the regression loss)",
    LOCAL_LOGITS: "local_logits(feats): the local term's trainable scores per output variable: logits of "
                  "labels, the values themselves for real-valued outputs (the local losses)",
    VALUE: "score(ȳ, feats) -> [B]: the pre-sigmoid value v = σ(score) of ȳ (the value objective)",
    CHAIN_POTENTIALS: "features(x, lengths) -> ChainPotentials: unary [B, T, K], pairwise [K, K] (exact "
                      "chain inference, the CRF objectives)",
    REGION_POTENTIALS: "features(x) -> MRFPotentials over a region graph, unaries(x) (message passing, "
                       "blended learning)",
    GAUSSIAN_POTENTIALS: "features(x) -> GCRFPotentials (the Gaussian CRF's CG solve)",
    SCALABLE_LOCAL: "a `unary_scale` buffer α multiplying the local term (online and offline scaling)",
}

# ---------------------------------------------------------------------- inference capabilities
RELAXED = "relaxed"
LOSS_AUGMENTED = "loss_augmented"
UNROLLED = "unrolled"
INFERENCE_CAPABILITIES = {
    RELAXED: "returns a relaxed output ȳ in the energy's domain (the value objective's tuples)",
    LOSS_AUGMENTED: "accepts augment=Δ and minimises E(ȳ) - Δ(ȳ) (the structured SVM's loss-augmented inference)",
    UNROLLED: "keeps the graph of every iterate with differentiable=True (end-to-end learning)",
}


# Activations (as config names) whose second derivative is zero or undefined.
KINKED_ACTIVATIONS = ("relu", "relu6", "leaky_relu", "hardtanh", "threshold")


def is_kinked(activation) -> bool:
    """Whether an activation named in a config (e.g. "relu", "softplus:25") has no useful second derivative."""
    return str(activation).split(":")[0].lower() in KINKED_ACTIVATIONS


def describe(capability: str) -> str:
    """One line on what a capability means, for error messages and the published matrix."""
    return {**MODEL_CAPABILITIES, **INFERENCE_CAPABILITIES}.get(capability, capability)


def sequence_lengths(y: torch.Tensor) -> torch.Tensor | None:
    """Each sequence's length [B] for class-id outputs (SEQUENCE: -1 after the end); None for outputs
    of the other kinds, which are floating point."""
    return None if y.is_floating_point() else (y >= 0).sum(-1)


# --------------------------------------------------------------------------------- the parts
class Features(Protocol):
    """What a model's features(x) returns (its own dataclass): computed once per batch and reused
    by every inference step. Objectives that generate outputs per example (the value objective)
    detach it and take rows of it."""

    def detach(self) -> "Features": ...

    def take(self, index: torch.Tensor) -> "Features": ...


class Dataset:
    """A loaded data set: three splits of (x, y) tensors and the sizes a model config reads.

    A data loader (a config's `data._target_`) returns one; its return annotation names the class,
    which tells dsp.compat the output kind before anything is loaded. Besides `split(name)` it has
    `num_features` and `num_labels` (attributes or properties), which a model config reads as
    ${dims.num_features} and ${dims.num_labels}.
    """

    output: str = ""  # one of OUTPUT_KINDS
    input: str = ""  # one of INPUT_KINDS
    dims: frozenset[str] = frozenset({"num_features", "num_labels"})  # the ${dims.*} it fills in
    vocab: dict[str, list[str]] | None = None  # token inputs: index -> token lists (dims.num_<name>)
    stream = False  # read training batches from `source` (an HDF5 file) in a second thread
    source = None

    def split(self, name: str) -> torch.utils.data.TensorDataset:
        raise NotImplementedError


class Model(nn.Module):
    """An energy or score function over structured outputs.

    Required: `features(x, lengths=None)`, computed once per batch and reused by every inference
    step (lengths [B] for sequences, None otherwise), plus the methods of the capabilities in
    `provides`. Everything the trainer and the tools may ask for beyond that has a default here.
    """

    outputs: frozenset[str] = frozenset()  # the output kinds the model predicts
    # The input kinds it reads; None: those its input networks declare (their class attribute
    # `inputs`, e.g. dsp.nn.mlp.MLP reads vectors), or any when none does.
    inputs: frozenset[str] | None = None
    provides: frozenset[str] = frozenset()  # model capabilities (MODEL_CAPABILITIES)
    y_parts: tuple[str, ...] = ()  # children that see ȳ: twice differentiable for unrolled learning
    # Its child modules, which stages may train by name; None: unknown. Checked only on the class
    # that sets it (a subclass may add parts).
    parts: tuple[str, ...] | None = None
    # How ȳ is relaxed: "box" (each entry in [0, 1]), "simplex" (a distribution over the last axis,
    # e.g. the K labels of each position), "real" (unconstrained values, e.g. images).
    relaxation = "box"
    has_local_term = True  # predict=local reads a prediction off the local term alone

    @classmethod
    def outputs_for(cls, config: Mapping[str, Any]) -> frozenset[str]:
        """The output kinds a model built from `config` predicts (read before it is built)."""
        return cls.outputs

    @classmethod
    def capabilities(cls, config: Mapping[str, Any]) -> frozenset[str]:
        """The capabilities a model built from `config` (its YAML node) will have, read before it
        is built: `provides`, and a smooth energy when the parts that see ȳ (y_parts) name no
        ReLU-like activation. A model whose capabilities depend on other settings overrides this."""
        if ENERGY in cls.provides and cls.y_parts and not cls.kinked_parts(config):
            return cls.provides | {SMOOTH_ENERGY}
        return cls.provides

    @classmethod
    def kinked_parts(cls, config: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(part, activation) of the y_parts whose config names an activation without a useful
        second derivative."""
        return [(part, str(node["activation"])) for part in cls.y_parts
                if isinstance(node := config.get(part), Mapping) and is_kinked(node.get("activation", ""))]

    @classmethod
    def parts_for(cls, config: Mapping[str, Any]) -> tuple[str, ...] | None:
        """The parts a model built from `config` has (its class's own `parts`; None: unknown)."""
        return vars(cls).get("parts")

    @classmethod
    def structured(cls, config: Mapping[str, Any]) -> bool:
        """Whether a model built from `config` predicts with an inference routine (False: its
        prediction is read off its local term, as an MLP baseline's)."""
        return True

    @property
    def is_structured(self) -> bool:
        return type(self).structured({})

    def features(self, x: torch.Tensor, lengths: torch.Tensor | None = None):
        raise NotImplementedError

    def has_analytic_gradient(self) -> bool:
        """Whether energy_and_grad(ȳ, feats) -> (E [B], ∂E/∂ȳ) is available in closed form (fast
        gradient inference without autograd), as it is for a SPEN."""
        return False

    def energy_and_grad(self, y: torch.Tensor, feats):
        raise NotImplementedError

    def diagnostics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Scalars logged every epoch (e.g. the CRF's unary / pairwise ratio)."""
        return {}

    def images(self) -> dict[str, torch.Tensor]:
        """[H, W] images in [0, 1] logged every epoch (e.g. learned pairwise tables)."""
        return {}


class Inference:
    """An inference routine: `__call__(model, feats, ...)` returns a result with `.y` (the
    prediction: relaxed or decoded), `.iterations`, `.converged` [B] and `.objective` [B]."""

    outputs: frozenset[str] = frozenset()
    needs: frozenset[str] = frozenset()  # model capabilities
    provides: frozenset[str] = frozenset()  # inference capabilities (INFERENCE_CAPABILITIES)
    learned = False  # has trainable settings (attached to the model as `model.inference`)

    @classmethod
    def needs_for(cls, config: Mapping[str, Any]) -> frozenset[str]:
        """The model capabilities a routine built from `config` needs (e.g. LOCAL only for init=local)."""
        return cls.needs

    def match(self, objective: "Objective") -> None:
        """Follow the objective the model is trained with where the routine has a choice to make."""

    def at_random_step(self) -> "Inference":
        """A copy stopped after a random number of its iterations (the value objective's tuples from
        random points of the trajectory), or self for a routine without iterations to cut."""
        return self


class Objective:
    """A learning objective: `loss(model, inference, x, y[, index]) -> (scalar, logs)`."""

    outputs: frozenset[str] = frozenset()
    needs: frozenset[str] = frozenset()  # model capabilities
    needs_inference: frozenset[str] = frozenset()  # inference capabilities
    prediction = None  # the decoding that matches the objective (chain decoding method=auto)
    second_order = False  # differentiates the energy's gradient in ȳ (needs twice-differentiable y_parts)
    per_example_state = False  # loss() takes index= (ids of the batch's training examples)
    checkpoint_state = False  # state_dict() goes into checkpoints
    per_rank_state = False  # that state differs between ddp ranks (gathered into checkpoints)
    rescores_potentials = False  # loss_on(potentials, y) re-scores cached potentials (fast online scaling)

    @classmethod
    def needs_for(cls, config: Mapping[str, Any]) -> tuple[frozenset[str], frozenset[str]]:
        """(model capabilities, inference capabilities) an objective built from `config` needs."""
        return cls.needs, cls.needs_inference

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def probe(self, model, x, y) -> dict[str, float]:
        """Scalars measured on fixed training examples every trainer.probe_every steps."""
        return {}

    def shared_rows(self):
        """Per-example state kept equal on every ddp rank (a store with `groups` tensors indexed by
        example id and `reserve(size)`), or None."""
        return None


class Task:
    """An output space: how a split is predicted, calibrated, scored and saved."""

    @staticmethod
    def predicts_locally(model: Model, mode: str) -> bool:
        """Prediction from the local term alone: asked for (predict=local), or the only way an
        unstructured model predicts."""
        return mode == "local" or not model.is_structured

    output: str = ""
    main_metric: str = ""
    takes_rows = False  # batch() wants index= (the batch's rows of the training split)

    def batch(self, x, y, index=None):
        return x, y

    def predict(self, model, inference, x, y, batch_size: int, mode: str):
        raise NotImplementedError

    def calibrate(self, out, y, setting):
        return None

    def evaluate(self, out, y, state=None) -> dict[str, float]:
        raise NotImplementedError

    def arrays(self, out, y, state=None, x=None) -> dict:
        raise NotImplementedError

    def figures(self, out, y, x) -> dict:
        """[H, W] images of a validation prediction for TensorBoard (denoising)."""
        return {}

    def inference_figures(self, model, inference, train, shown, batch_size: int, mode: str) -> dict:
        """[H, W, 3] pictures of how inference proceeds (the DVN's trajectories)."""
        return {}
