"""trainer.compile: torch.compile the model's networks and energies, falling back to eager where it
cannot.

dsp's objectives call model methods (features(), energy(), score(), ...) rather than one forward(),
so the whole model is not one compilable function. What is compiled is the forward of each of the
model's parts (its child modules with parameters: the feature network, the local and global energy
networks, a CRF's unary network, ...), which is where the time goes; the model's own methods, the
inference routines and the objectives stay eager Python around them. Attached learned inference
(model.inference) is left eager.

A part is compiled by giving the instance a subclass of its own class whose forward calls the
compiled forward: parameter names, state dicts, isinstance checks and deep copies (the weight
average of trainer.ema_decay) are unchanged, and the copy calls the same compiled code with its own
weights.

Failures fall back, with one warning line naming the part and the cause:
  - no C++ compiler on PATH (torch's CPU code generation, inductor, needs one): nothing is
    compiled;
  - the first call (or a later recompilation) of a compiled forward raises: that part and every
    other compiled part go back to eager and the call is repeated eagerly;
  - a training step's backward raises while compiled (e.g. a double backward through a compiled
    graph, which AOTAutograd does not support: the unrolled objectives of dp*, foe* and
    e2e_spen_bibtex): the trainer calls `revert(err)` and repeats the step eagerly.
An error that eager execution raises as well is then raised as usual.

trainer.compile takes true (the inductor backend), false, or the name of a torch.compile
backend for debugging: aot_eager (capture and autograd, no code generation) or eager (capture only).
"""
from __future__ import annotations

import os
import shutil
import sys

import torch

from dsp.errors import DspError

BACKENDS = ("inductor", "aot_eager", "eager")


def check_compile(value):
    """trainer.compile as a backend name or None (off); a one-line DspError naming the key otherwise."""
    if value is False or value is None:
        return None
    if value is True:
        return "inductor"
    if isinstance(value, str) and value in BACKENDS:
        return value
    raise DspError(f"trainer.compile={value!r}: give true, false, or a torch.compile backend "
                   f"({', '.join(BACKENDS)})")


def _warn(message: str) -> None:
    print(f"warning: trainer.compile: {message}", file=sys.stderr, flush=True)


def _quiet(message: str) -> None:  # ddp ranks > 0: rank 0 says it
    pass


def _cxx_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= 160 else line[:157] + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _allow_recompiles(limit: int = 32) -> None:
    """A part's forward legitimately meets several variants (training and no-grad, train and eval mode,
    autocast on and off, a dynamic batch size, the weight average's copy), each its own compilation:
    raise dynamo's per-function limit (8) so that none of them falls back to eager with a log warning."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # (the older name)
        current = getattr(dynamo_config, name, None)
        if isinstance(current, int):
            setattr(dynamo_config, name, max(current, limit))
            return


class Compiled:
    """The compiled parts of one model (`parts`: their names), and the switch back to eager."""

    def __init__(self, model: torch.nn.Module, value, device: torch.device, verbose: bool = True):
        self.backend = check_compile(value)
        self._warn = _warn if verbose else _quiet
        self.parts: list[str] = []
        self._modules: list[tuple[torch.nn.Module, type]] = []
        self.failed: str | None = None
        if self.backend is None:
            return
        if self.backend == "inductor" and torch.device(device).type == "cpu" and _cxx_compiler() is None:
            self.failed = "no C++ compiler (g++, c++ or clang++; or $CXX) on PATH"
            self._warn(f"{self.failed}, which torch.compile needs for the CPU; training eagerly")
            return
        _allow_recompiles()
        for name, child in model.named_children():
            if name == "inference" or not any(True for _ in child.parameters()):
                continue
            if type(child).forward is torch.nn.Module.forward:  # (no forward of its own: nothing to compile)
                continue
            self._compile(child)
            self.parts.append(name)

    @property
    def active(self) -> bool:
        return bool(self._modules) and self.failed is None

    def _compile(self, module: torch.nn.Module) -> None:
        eager_cls = type(module)
        compiled = torch.compile(eager_cls.forward, backend=self.backend)
        owner = self

        def forward(self_, *args, **kwargs):
            if owner.failed is None:
                try:
                    return compiled(self_, *args, **kwargs)
                except DspError:
                    raise
                except Exception as err:  # noqa: BLE001 -- whatever compilation raised: retry eagerly
                    owner.revert(err, f"{eager_cls.__name__}.forward")
            return eager_cls.forward(self_, *args, **kwargs)

        cls = type(eager_cls.__name__, (eager_cls,), {
            "forward": forward, "__module__": eager_cls.__module__, "__qualname__": eager_cls.__qualname__,
            "__doc__": eager_cls.__doc__, "_dsp_eager_class": eager_cls})
        module.__class__ = cls
        self._modules.append((module, eager_cls))

    def revert(self, err: BaseException, where: str = "a training step") -> bool:
        """Back to eager for good (one warning line); False when nothing was compiled (the error is
        not compile's: the caller re-raises it)."""
        if not self.active:
            return False
        self.failed = _first_line(err)
        for module, eager_cls in self._modules:
            module.__class__ = eager_cls
        self._warn(f"{where} failed under torch.compile ({self.failed}); running {', '.join(self.parts)} eagerly")
        return True
