"""dsp: config-driven deep structured prediction (SPENs, deep value networks, CRFs, MRFs)."""

__version__ = "0.1.0"


def load_run(run_dir, ckpt="best", device="cpu", overrides=None, trust=()):
    """Load a trained run folder from Python, without Hydra (see `dsp.build.load_run`). The config
    stored in its checkpoint builds dsp's parts, torch.nn and torch.optim only; name the modules of
    your own parts in `trust` (e.g. trust=["my_pkg"])."""
    from dsp.build import load_run as _load_run

    return _load_run(run_dir, ckpt=ckpt, device=device, overrides=overrides, trust=trust)
