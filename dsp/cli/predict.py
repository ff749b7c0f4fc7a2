"""dsp-predict run_dir=DIR input=PATH out=PATH [ckpt=best] [trust=[my_pkg]] [batch_size=1024] [device=auto]
[overwrite=true]: a trained run's predictions for new, unlabelled inputs.

The inputs are read and preprocessed as the run's training data was (dsp.data.inputs), then
predicted as dsp-eval predicts (the checkpoint's prediction mode, multi-label threshold and crop
protocol; dsp.build.LoadedRun.predict). What each kind of run reads and writes:

  multi-label   input: .arff (with or without the label attributes), .npz (x [N, D]), .csv (a header
                row; the run's label columns are dropped if present), .h5 (/x).
                out .npz: labels uint8 [N, L] (0/1 at the run's stored threshold), scores float32
                [N, L], label_names, threshold. out .csv: a header row, then per example the 0/1
                columns named by the labels and score_<label> columns.
                With data.standardize=true the training split's statistics are recomputed from the
                run's training files (its stored data config), which must be present.
  sequences     image sequences (OCR-like runs): input .npz or .h5 with x [N, T, ...] and optional
                lengths [N]. Text (data=conll2000 runs): a CoNLL-format file of `word POS` or `word POS tag`
                lines (the tag is ignored), encoded with the run's training vocabulary (its training
                files must be present).
                out .npz: tags int64 [N, T] (-1 after each end), lengths [N], label_names (id -> tag).
                out .txt / .conll / .tsv: one line per token, `word POS tag` for
                text and `position tag` for image sequences, a blank line between sequences.
  masks         input: a folder of images (or one image), resized as the run's data loader does.
                out .npz: masks uint8 [N, H, W], scores float32 [N, H, W], names (the image stems).
                out without a suffix: a folder of PNG masks (0/255), one per image, named by its stem.

Denoising runs are refused. Every file is written atomically (a temporary file renamed into place);
an existing out is not replaced unless overwrite=true.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from dsp.build import load_run
from dsp.cli.common import config_dir, user_errors
from dsp.cli.evaluate import _trust, save_npz, save_png
from dsp.data.inputs import read_images, read_sequence_arrays, read_token_sentences, read_vectors
from dsp.data.mulan import read_label_names
from dsp.errors import DspError
from dsp.training.checkpoint import _atomic
from dsp.training.trainer import resolve_device

TEXT = (".txt", ".conll", ".tsv")
OUTPUTS = {"multilabel": (".npz", ".csv"), "sequence": (".npz", *TEXT), "tokens": (".npz", *TEXT),
           "mask": (".npz", "")}
KINDS = {"multilabel": "multi-label", "sequence": "sequence", "tokens": "sequence (text)", "mask": "mask"}


def _check_out(out: Path, family: str, overwrite: bool, names=None) -> None:
    """Refuse an out whose suffix the run's kind cannot write, or that already holds results."""
    suffix = out.suffix.lower()
    allowed = OUTPUTS[family]
    if suffix not in allowed:
        shown = ", ".join(f"{s}" if s else "a folder (no suffix)" for s in allowed)
        raise DspError(f"out={out}: a {KINDS[family]} run writes {shown}")
    if overwrite:
        return
    if suffix == "" and family == "mask":
        held = [out / f"{n}.png" for n in (names or []) if (out / f"{n}.png").exists()]
        if out.exists() and not out.is_dir():
            raise DspError(f"out={out} is a file; give a folder for the PNG masks")
        if held:
            raise DspError(f"{held[0]} exists; write elsewhere (out=<a new folder>) or replace it with overwrite=true")
    elif out.exists():
        raise DspError(f"out={out} exists; write elsewhere or replace it with overwrite=true")


def _write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _multilabel_csv(result: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    names = result["label_names"]
    writer.writerow([*names, *(f"score_{n}" for n in names)])
    for labels, scores in zip(result["labels"].tolist(), result["scores"].tolist()):
        writer.writerow([*labels, *(f"{s:.6g}" for s in scores)])
    return buf.getvalue()


def _sequence_text(result: dict, sentences=None) -> str:
    lines = []
    for i, tags in enumerate(result["tag_names"]):
        for j, tag in enumerate(tags):
            lines.append(" ".join([*sentences[i][j], tag]) if sentences is not None else f"{j + 1} {tag}")
        lines.append("")
    return "\n".join(lines) + "\n"


def _label_names(data: DictConfig) -> list[str] | None:
    """The label columns' names as the run's data config gives them (to drop them from an input)."""
    if data.get("labels_xml") and Path(str(data.labels_xml)).is_file():
        return read_label_names(data.labels_xml)
    if data.get("labels"):
        return [str(n) for n in data.labels]
    return None


def predict_file(run_dir, input, out, ckpt: str = "best", device="cpu", batch_size: int = 1024, trust=(),
                 overwrite: bool = False) -> dict:
    """Predict a run's outputs for the inputs in `input` and write them to `out` (module docstring);
    returns what LoadedRun.predict returned."""
    run = load_run(run_dir, ckpt=ckpt, device=device, trust=trust)
    family = run.family
    input, out = Path(str(input)), Path(str(out))
    _check_out(out, family, overwrite)
    data, dims = run.config.data, run.config.dims
    sentences, stems = None, None
    if family == "multilabel":
        x = read_vectors(input, int(dims.num_features), int(dims.num_labels), _label_names(data),
                         str(data.get("label_position", "end")))
        result = run.predict(x, batch_size=batch_size)
    elif family == "sequence":
        x, lengths = read_sequence_arrays(input)
        result = run.predict(x, lengths=lengths, batch_size=batch_size)
    elif family == "tokens":
        sentences = read_token_sentences(input)
        result = run.predict(sentences, batch_size=batch_size)
    else:
        size = data.get("size")
        if size is None:  # (data=hdf5_masks: the size of its images)
            trained = run._training_data("images are resized to the size the run was trained on")
            h, w = trained.split("train").tensors[0].shape[-2:]
            if h != w:
                raise DspError(f"the run was trained on {h}×{w} images; dsp-predict reads image files at a square "
                               f"size only: predict from arrays with dsp.load_run(...).predict(x)")
            size = int(h)
        grayscale = bool(data.get("grayscale", False)) or int(dims.num_features) == 1
        x, stems = read_images(input, int(size), grayscale, bool(data.get("jpeg_draft", False)))
        _check_out(out, family, overwrite, stems)
        result = run.predict(x, batch_size=batch_size)
    suffix = out.suffix.lower()
    if suffix == ".npz":
        arrays = {k: np.asarray(v) for k, v in result.items() if k != "tag_names"}
        if stems is not None:
            arrays["names"] = np.array(stems)
        save_npz(arrays, out)
    elif family == "multilabel":
        _write_text(out, _multilabel_csv(result))
    elif family == "mask":
        for stem, mask in zip(stems, result["masks"]):
            save_png((mask * 255).astype(np.uint8), out / f"{stem}.png")
    else:
        _write_text(out, _sequence_text(result, sentences))
    return result


@user_errors
def _main(cfg: DictConfig) -> None:
    for key in ("run_dir", "input", "out"):
        if OmegaConf.is_missing(cfg, key):
            raise DspError(f"pass {key}=...: dsp-predict run_dir=<a dsp-train run folder> input=<file of new "
                           f"inputs> out=<file for the predictions>")
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise DspError(f"batch_size={cfg.batch_size!r}: give a whole number of at least 1")
    result = predict_file(cfg.run_dir, cfg.input, cfg.out, str(cfg.ckpt), resolve_device(str(cfg.device)),
                          cfg.batch_size, _trust(cfg.get("trust")), bool(cfg.get("overwrite")))
    first = next(iter(result.values()))
    print(f"{cfg.run_dir} ({cfg.ckpt}.pt): predictions for {len(first)} inputs of {cfg.input} -> {cfg.out}")


def main() -> None:
    hydra.main(config_path=config_dir(), config_name="predict", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()
