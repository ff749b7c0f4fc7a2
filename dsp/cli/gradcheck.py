"""dsp-gradcheck [model=NAME] [experiment=NAME] [any dsp-train override] [gradcheck.KEY=...]:
compare autograd's gradient of the configured objective with central finite differences.

It composes conf/gradcheck.yaml from the same config groups as dsp-train, and searches the same
folders: `--config-dir DIR` and `hydra.searchpath=[file:///DIR]` add a folder of your own config
group options (e.g. DIR/model/my_model.yaml for model=my_model) after the shipped ones.
Exit status 0: every error <= gradcheck.tol; 1: some error above it; 2: a configuration or data error.

`model=NAME` alone also selects that model family's data, inference and objective (and trainer
where the staged one does not fit; conf/gradcheck.yaml, `model_defaults`), unless the command line names them or an experiment=.
The check itself is dsp.gradcheck (also usable from Python), whose description --help prints below.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from dsp import gradcheck as engine
from dsp.compat import check_config
from dsp.cli.common import config_dir, user_errors
from dsp.errors import DspError

GROUPS = ("paths", "data", "model", "inference", "objective", "trainer", "experiment")
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")  # as hydra.main (dsp-train) spells it


# ------------------------------------------------------------------------------ command line
def _key(arg: str) -> str:
    """The config key an override sets: `+data.x=1` -> data.x, `~objective` -> objective."""
    return arg.split("=", 1)[0].lstrip("+~")


def split_config_dir(args: list[str]) -> tuple[str | None, list[str]]:
    """(the folder of `--config-dir DIR` / `--config-dir=DIR` / `-cd DIR`, or None; the overrides).
    Other flags are refused: dsp-gradcheck has no --cfg, --multirun, ..."""
    folder, rest, items = None, [], iter(args)
    for arg in items:
        flag, eq, value = arg.partition("=")
        if flag not in CONFIG_DIR_FLAGS:
            rest.append(arg)
            continue
        folder = value if eq else next(items, None)
        if not folder:
            raise DspError(f"{flag} needs a folder")
    flags = [a for a in rest if a.startswith("-")]
    if flags:
        raise DspError(f"dsp-gradcheck takes key=value overrides only, not {' '.join(flags)}")
    if folder is not None and not os.path.isdir(folder):
        raise DspError(f"--config-dir {folder}: there is no such folder")
    return folder, rest


def with_model_defaults(args: list[str], table) -> tuple[list[str], list[str]]:
    """Append the per-model defaults of `table` (conf/gradcheck.yaml model_defaults) for a
    `model=NAME` on the command line; returns (all overrides, the ones added). Nothing is added
    with experiment= (a preset chooses its own groups) or for a group the user set."""
    keys = [_key(a) for a in args]
    models = _models(args)
    if not models or "experiment" in keys:
        return list(args), []
    entry = (table or {}).get(models[-1])
    if entry is None:
        return list(args), []
    given = set(keys)
    added = [f"{group}={option}" for group, option in entry.items() if group != "overrides" and group not in given]
    for item in entry.get("overrides") or []:
        key = _key(str(item))
        # not where the user set the key, or re-chose its group (objective=X may not have the key;
        # the model group is the one the entry is for)
        group = key.split(".", 1)[0]
        if key not in given and (group == "model" or group not in given):
            added.append(str(item))
    return list(args) + added, added


def _models(args: list[str]) -> list[str]:
    """The options of `model=NAME` overrides, in order."""
    return [a.split("=", 1)[1].strip("'\"") for a in args if _key(a) == "model" and "=" in a]


def load_model_defaults():
    # The primary config is always the shipped one: --config-dir and hydra.searchpath folders come
    # after it in Hydra's search path, so they add group options but cannot replace gradcheck.yaml.
    return OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "gradcheck.yaml")).get("model_defaults") or {}


# ------------------------------------------------------------------------------ composition
@contextlib.contextmanager
def _hydra(user_dir: str | None):
    """Hydra initialised with dsp-train's search path: the shipped configs, then --config-dir (the
    compose API's initialize_config_dir has no place for it); hydra.searchpath overrides are
    appended by Hydra itself while composing."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    search_path = create_config_search_path(config_dir())
    if user_dir is not None:  # where hydra.main puts it (hydra/_internal/utils.py, run_hydra)
        search_path.prepend(provider="command-line", path=f"file://{os.path.abspath(user_dir)}",
                            anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    try:
        Hydra.create_main_hydra2(task_name="dsp-gradcheck", config_search_path=search_path)
        yield
    finally:
        GlobalHydra.instance().clear()


def _config_error(err, args: list[str], added: list[str], user_dir: str | None) -> DspError:
    """One line for Hydra's composition error; a model=NAME that is nowhere gets the known ones."""
    from hydra.errors import MissingConfigException

    models = _models(args)
    if isinstance(err, MissingConfigException) and models and err.missing_cfg_file == f"model/{models[-1]}":
        extra = user_dir is not None or any(_key(a) == "hydra.searchpath" for a in args)
        where = " (nor in the folders of --config-dir, hydra.searchpath)" if extra else ""
        return DspError(f"model={models[-1]}: there is no conf/model/{models[-1]}.yaml{where}; "
                        f"known models: {', '.join(sorted(err.options or []))}")
    message = str(err).split("\nConfig search path:")[0].rstrip()
    hint = f" (added for this model: {' '.join(added)})" if added else ""
    return DspError(f"bad configuration: {message}{hint}")


def compose_config(args: list[str], user_dir: str | None = None) -> tuple[DictConfig, dict, list[str]]:
    """Compose conf/gradcheck.yaml with the command-line overrides (plus per-model defaults), with
    `user_dir` (--config-dir) searched as dsp-train does; returns (config without the hydra node,
    the group choices, the overrides added)."""
    from hydra import compose
    from hydra.errors import HydraException

    args, added = with_model_defaults(args, load_model_defaults())
    try:
        with _hydra(user_dir):
            cfg = compose("gradcheck", overrides=args, return_hydra_config=True)
    except HydraException as err:
        raise _config_error(err, args, added, user_dir) from None
    choices = {g: cfg.hydra.runtime.choices.get(g) for g in GROUPS}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices, added


# ------------------------------------------------------------------------------------- output
def print_report(report: engine.Report, header: str) -> None:
    print(header)
    if report.frozen:
        calls = ", ".join(f"{name} ×{k}" for name, k in report.frozen.items())
        print(f"held fixed (recorded once, replayed under perturbation): {calls}")
    for note in report.notes:
        print(f"note: {note}")
    print(f"loss {report.loss:.6g} ({report.evaluations} evaluations, {report.seconds:.1f} s); relative error "
          f"= |autograd - finite difference| / max(|autograd|, |finite difference|, {report.floor:.1e})")
    _print_table(report)
    _print_kinks(report)
    rel, name = report.worst
    verdict = "OK" if report.ok else "FAIL"
    skipped = f", {report.kinks} entries at kinks skipped" if report.kinks else ""
    if report.kinks and not report.ok:
        print("hint: this loss has kinks (ReLU inputs or max-pool ties at or near θ); failures next to them "
              "say nothing about autograd. gradcheck.jitter=0.01 checks at a nearby point instead")
    print(f"worst relative error {rel:.2e} ({name}), tolerance {report.tol:.1e}{skipped}: {verdict}")


def _print_table(report: engine.Report) -> None:
    width = max([len("parameter")] + [len(c.name) for c in report.checks])
    shapes = [str(list(c.shape)) for c in report.checks]
    swidth = max([len("shape")] + [len(s) for s in shapes])
    print(f"  {'parameter':<{width}}  {'shape':<{swidth}}  checked  max rel err  max abs err  status")
    for c, shape in zip(report.checks, shapes):
        rel, diff, entry = c.worst
        status = "FAIL" if rel > report.tol else ("OK" if c.entries else "KINKS ONLY")
        notes = ([f"{len(c.kinks)} at a kink, skipped"] if c.kinks else []) + (
            [f"{c.smaller_steps(report.eps)} needed a smaller step"] if c.smaller_steps(report.eps) else [])
        note = f"  ({'; '.join(notes)})" if notes else ""
        print(f"  {c.name:<{width}}  {shape:<{swidth}}  {len(c.entries):7d}  {rel:11.2e}  {diff:11.2e}  {status}{note}")
        if status == "FAIL":
            where, a, n, _, step = entry
            print(f"  {'':<{width}}    worst entry {list(where)}: autograd {a:.8g}, "
                  f"finite difference {n:.8g} (step {step:g})")


def _print_kinks(report: engine.Report) -> None:
    kinks = [(c.name, *kink) for c in report.checks for kink in c.kinks]
    for name, where, a, left, right in kinks[:3]:
        print(f"kink: {name} {list(where)} is not differentiable here (one-sided slopes {left:.6g} left, "
              f"{right:.6g} right, the same at a 10x step; autograd {a:.6g}): not counted, another entry "
              f"was checked instead")
    if len(kinks) > 3:
        print(f"kink: ... and {len(kinks) - 3} more entries at kinks")


# ------------------------------------------------------------------------------- entry point
@user_errors
def run(args: list[str]) -> int:
    user_dir, overrides = split_config_dir(args)
    cfg, choices, added = compose_config(overrides, user_dir)
    gc = cfg.gradcheck
    groups = " ".join(f"{g}={choices[g]}" for g in ("model", "data", "inference", "objective") if choices.get(g))
    extra = f" experiment={choices['experiment']}" if choices.get("experiment") else ""
    stage = f" stage={gc.stage}" if gc.get("stage") else ""
    check_config(cfg, {g: c for g, c in choices.items() if c})  # named as typed, before the data loads
    report = engine.gradcheck(cfg)
    header = (f"gradcheck: {groups}{extra}{stage} ({report.examples} examples, float64, "
              f"eps {float(gc.eps):g}, {int(gc.params_per_tensor)} entries per tensor)")
    if added:
        header += f"\nmodel defaults added: {' '.join(added)}"
    print_report(report, header)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        print(engine.__doc__)
        sys.exit(0)
    sys.exit(run(args))


if __name__ == "__main__":
    main()
