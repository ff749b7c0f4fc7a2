"""The compatibility matrix: every shipped data family × model × inference × objective either trains
two steps on tiny data or is refused when the config is composed, in one line — no cell crashes.

Cells that would run the same code are trained once: a routine that is never called (an unstructured
model with an objective that needs no inference) counts as one cell, and routines that differ from
another only in settings (dvn_ascent and dvn_seg_ascent are projected descent) are trained as it. By
default the test trains a covering set, in which every model meets every objective and every
inference routine it fits on each data family; DSP_FULL_MATRIX=1 trains them all.
scripts/compat_matrix.py publishes the same matrix (docs/MATRIX.md).
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import ListConfig

from conftest import write_mulan, write_ocr
from fixtures_images import tiny_denoise_overrides, tiny_images_overrides, write_image_folder
from fixtures_text import write_conll
from test_any_sequences_images import write_pairs
from test_formats import tiny_overrides
from test_word50 import write_word50_sources
from dsp.cli.common import config_dir
from dsp.cli.train import train
from dsp.compat import Part, _objective_needs, check_config, matrix, shipped_options

SAME_CODE_AS = {"dvn_ascent": "projected", "dvn_seg_ascent": "projected"}  # GradientInference, projected
# Families that only read another file format (or another column) into the outputs and inputs of a
# family trained in full (synthetic, ocr, conll2000, horses32): trained once per model, their loader
# is what is new.
ONCE_PER_MODEL = ("bibtex", "npz", "csv", "hdf5", "hdf5_sequences", "hdf5_masks", "conll", "masks")


@lru_cache(maxsize=None)
def _rows():
    return matrix()


def _covering(cells: list[tuple[str, str, str, str]]) -> list[tuple[str, str, str, str]]:
    """A subset in which every (data, model, objective) and every (data, model, inference) of `cells`
    trains at least once: every pair of parts meets, at a fraction of the product's cost."""
    chosen, seen = [], set()
    for cell in cells:
        data, model, inference, objective = cell
        keys = {("objective", data, model, objective), ("inference", data, model, inference)}
        if not keys <= seen:
            chosen.append(cell)
            seen |= keys
    return chosen


def _trained_cells() -> list[tuple[str, str, str, str]]:
    cells, once = set(), set()
    fits = {r[:4] for r in _rows() if r[4] is None}
    for data, model, inference, objective in sorted(fits):
        model_part = Part.of_node("model", shipped_options("model")[model], model)
        objective_part = Part.of_node("objective", shipped_options("objective")[objective], objective)
        if not (model_part.structured or _objective_needs(objective_part)[1]):
            inference = "*"  # never called: one cell for every routine
        if (data, model, SAME_CODE_AS.get(inference), objective) in fits:
            inference = SAME_CODE_AS[inference]  # trained as that cell
        if data in ONCE_PER_MODEL:
            if (data, model) in once:
                continue
            once.add((data, model))
        cells.add((data, model, inference, objective))
    return sorted(cells)


def test_every_cell_is_decided_in_one_line():
    rows = _rows()
    families = {r[0] for r in rows}
    assert {"synthetic", "bibtex", "ocr", "conll2000", "word50", "horses32", "denoise_horses"} <= families
    refused = [r for r in rows if r[4] is not None]
    assert refused and len(refused) < len(rows)
    for *_, reason in refused:
        assert "\n" not in reason and "=" in reason, reason
    verdict = {r[:4]: r[4] for r in rows}
    # the combinations a new user once hit mid-run are decided before anything runs ...
    assert "returns a relaxed output" in verdict["ocr", "chain_crf", "chain", "value"]
    assert "multilabel outputs" in verdict["ocr", "spen", "mirror", "ssvm"]
    assert "keeps the graph" in verdict["synthetic", "spen", "mirror", "unrolled"]
    assert "smooth_energy" in verdict["synthetic", "spen_synthetic", "unrolled_gd", "unrolled"]
    assert "reads image sequences" in verdict["conll2000", "chain_crf", "chain", "crf_nll"]
    # ... and those the papers imply fit: unrolled CRFs and MRFs, value networks on sequences,
    # a SPEN over label sequences
    for cell in (("ocr", "chain_crf", "unrolled_gd", "unrolled"), ("word50", "mrf", "unrolled_gd", "unrolled"),
                 ("ocr", "chain_crf", "mirror", "value"), ("ocr", "spen_sequence", "mirror", "ssvm"),
                 ("synthetic", "spen", "mirror", "value"), ("synthetic", "spen", "unrolled_gd", "unrolled"),
                 ("ocr", "chain_crf", "chain", "crf_nll")):
        assert verdict[cell] is None, (cell, verdict[cell])


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """One folder of tiny data files for the whole module (each family written on first use)."""
    return tmp_path_factory.mktemp("tiny_data")


@lru_cache(maxsize=None)
def _tiny(data: str, tmp_path: Path) -> list[str]:
    """Overrides that load a tiny, self-written copy of each data family in well under a second."""
    if data == "synthetic":
        return ["data.num_train=24", "data.num_val=12", "data.num_test=12"]
    if data == "bibtex":
        tr, te, xml = write_mulan(tmp_path / "mulan", n_train=24, n_test=12)
        return [f"data.train={tr}", f"data.test={te}", f"data.labels_xml={xml}", "data.num_labels=null"]
    if data == "ocr":
        return [f"data.path={write_ocr(tmp_path / 'ocr' / 'letter.data.gz', words_per_fold=3)}"]
    if data == "conll2000":
        train_txt, test_txt = write_conll(tmp_path / "conll", n_train=16, n_test=6)
        return [f"data.train={train_txt}", f"data.test={test_txt}"]
    if data == "word50":
        ocr, horses = write_word50_sources(tmp_path / "w50")
        return [f"data.ocr_path={ocr}", f"data.horses_dir={horses}", f"data.cache_dir={tmp_path / 'cache'}",
                "data.num_words=4", "data.train_size=12", "data.val_size=4", "data.test_size=4"]
    if data == "horses32":
        return [o for o in tiny_images_overrides(write_image_folder(tmp_path / "horses"), n=6)
                if not o.startswith(("model.", "trainer."))]
    if data == "denoise_horses":
        return [o for o in tiny_denoise_overrides(tmp_path / "denoise") if not o.startswith("trainer.")]
    if data in ("npz", "csv", "hdf5", "hdf5_sequences", "hdf5_masks"):
        return tiny_overrides(data, tmp_path / "formats")
    if data == "conll":
        train_txt, test_txt = write_conll(tmp_path / "conll_any", n_train=16, n_test=6)
        return [f"data.train={train_txt}", f"data.test={test_txt}", "data.label_column=1"]  # POS tags
    if data == "masks":
        images, masks = write_pairs(tmp_path / "pairs", n=10)
        return [f"data.images={images}", f"data.masks={masks}", "data.size=32"]
    raise AssertionError(f"no tiny data for the family {data}: add it here")


def _small(cfg) -> list[str]:
    """Overrides that shrink the chosen parts to a few iterations and narrow networks."""
    out = []
    inference, model = cfg.inference, cfg.model
    if "max_iter" in inference:
        out.append("inference.max_iter=3")
    if "steps" in inference:
        out.append("inference.steps=2")
    if "iterations" in inference:
        out.append("inference.iterations=2")
    if "iterations" in cfg.objective:
        out += ["objective.iterations=2", "objective.probe_iterations=2"]
    for key in ("unary", "pairwise"):
        if isinstance(model.get(key), dict) or (model.get(key) is not None and "base_width" in model[key]):
            out += [f"model.{key}.base_width=4", f"model.{key}.depth=2"]
    if "unary_net" in model and "net" in model.unary_net and "hidden" in model.unary_net.net:
        out.append("model.unary_net.net.hidden=" + ("[8]" if isinstance(model.unary_net.net.hidden, ListConfig) else "8"))
    if "unary_net" in model and "word_dim" in model.unary_net:
        out += ["model.unary_net.word_dim=8", "model.unary_net.char_hidden=8", "model.unary_net.hidden=16",
                "model.unary_net.char_layers=1", "model.unary_net.word_layers=1"]
    if "feature_net" in model and model.feature_net.get("hidden"):
        out.append("model.feature_net.hidden=[16]")
    return out


# DSP_FULL_MATRIX=1 trains every fitting cell (about 6 minutes on 2 cores); by default a covering set.
CELLS = _trained_cells() if os.environ.get("DSP_FULL_MATRIX") else _covering(_trained_cells())


@pytest.mark.parametrize("cell", CELLS, ids="-".join)
def test_every_fitting_cell_trains_two_steps(cell, tmp_path, tiny_root):
    data, model, inference, objective = cell
    groups = [f"data={data}", f"model={model}", f"objective={objective}", "trainer=default",
              f"inference={'mirror' if inference == '*' else inference}"]
    quick = ["trainer.max_steps=2", "trainer.max_epochs=1", "trainer.progress=false", "trainer.batch_size=4",
             "trainer.eval_batch_size=8"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[*groups, *_tiny(data, tiny_root)])
        cfg = compose("config", overrides=[*groups, *_tiny(data, tiny_root), *quick, *_small(cfg)])
    check_config(cfg, {"data": data, "model": model, "inference": inference, "objective": objective})
    metrics = train(cfg, tmp_path / "run")
    assert np.isfinite(metrics[f"test/{metrics.monitor}"]) and metrics["train/epochs"] >= 1


def test_the_published_matrix_is_current():
    """docs/MATRIX.md counts what dsp.compat decides today (rerun scripts/compat_matrix.py if not)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "MATRIX.md").read_text()
    total, fitting = map(int, re.search(r"(\d+) combinations, of which (\d+) fit", text).groups())
    rows = _rows()
    assert (total, fitting) == (len(rows), sum(r[4] is None for r in rows)), "run python scripts/compat_matrix.py"
    for data, model, _, objective, reason in rows:
        if reason is None:
            assert f"## data={data}" in text and f"| {model} |" in text and objective in text
