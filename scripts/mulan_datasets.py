"""The Mulan datasets the generic defaults are measured on: name -> data.* overrides (paths under
$DSP_DATA_DIR/mulan), shared by scripts/mulan_defaults.py and scripts/sklearn_reference.py."""
from __future__ import annotations

import os

FILES = {
    "birds": ("birds/birds-train.arff", "birds/birds-test.arff", "birds/birds.xml"),
    "flags": ("flags/flags-train.arff", "flags/flags-test.arff", "flags/flags.xml"),
    "corel5k": ("corel5k/Corel5k-train-sparse.arff", "corel5k/Corel5k-test-sparse.arff", "corel5k/Corel5k.xml"),
    "tmc2007": ("tmc2007/tmc2007-500-train.arff", "tmc2007/tmc2007-500-test.arff", "tmc2007/tmc2007-500.xml"),
    "bibtex": ("bibtex/bibtex-train.arff", "bibtex/bibtex-test.arff", "bibtex/bibtex.xml"),
    "delicious": ("delicious/delicious-train.arff", "delicious/delicious-test.arff", "delicious/delicious.xml"),
}


def data_overrides(name: str, root: str | None = None) -> list[str]:
    """The generic command's data arguments for one dataset."""
    root = os.path.join(root or os.environ.get("DSP_DATA_DIR", "../shared/data"), "mulan")
    train, test, xml = (os.path.join(root, f) for f in FILES[name])
    return ["data=mulan", f"data.train={train}", f"data.test={test}", f"data.labels_xml={xml}"]
