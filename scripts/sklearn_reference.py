"""Binary-relevance logistic regression with scikit-learn, on dsp's own splits of a Mulan dataset:
the reference model=linear is compared with (pip install scikit-learn; not a dsp dependency).

One LogisticRegression per label on standardised features, C in {0.01, 0.1, 1} and one decision
threshold chosen together on the validation split (example F1), then refit on nothing else:
test example F1 and Hamming loss of the chosen pair. A label constant in training predicts its
constant. Usage: DSP_DATA_DIR=../shared/data python scripts/sklearn_reference.py birds flags ...
"""
from __future__ import annotations

import sys
import time

import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from mulan_datasets import FILES, data_overrides  # noqa: E402


def fit_predict(x, y, xs, c):
    from sklearn.linear_model import LogisticRegression

    out = [np.zeros((len(a), y.shape[1])) for a in xs]
    for j in range(y.shape[1]):
        col = y[:, j]
        if col.min() == col.max():
            for o in out:
                o[:, j] = col[0]
            continue
        clf = LogisticRegression(C=c, max_iter=2000).fit(x, col)
        for o, a in zip(out, xs):
            o[:, j] = clf.predict_proba(a)[:, 1]
    return out


def main(names):
    from sklearn.preprocessing import StandardScaler

    from dsp import metrics as M
    from dsp.instantiate import instantiate
    import torch

    base = OmegaConf.load("conf/data/mulan.yaml")
    for name in names:
        t0 = time.time()
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist([o.removeprefix("data.") for o in data_overrides(name)[1:]]))
        cfg.cache_dir = None
        cfg.standardize = False
        data = instantiate(cfg, "data")
        (xtr, ytr), (xva, yva), (xte, yte) = (tuple(t.numpy() for t in data.split(s).tensors)
                                              for s in ("train", "val", "test"))
        scaler = StandardScaler().fit(xtr)
        xtr, xva, xte = (scaler.transform(a) for a in (xtr, xva, xte))
        best = (-1.0, None, None, None)
        for c in (0.01, 0.1, 1.0):
            pva, pte = fit_predict(xtr, ytr, (xva, xte), c)
            for t in [round(0.05 * i, 2) for i in range(1, 20)]:
                f1 = M.example_f1(torch.from_numpy(pva >= t), torch.from_numpy(yva))
                if f1 > best[0]:
                    best = (f1, c, t, pte)
        f1v, c, t, pte = best
        pred, target = torch.from_numpy(pte >= t), torch.from_numpy(yte)
        print(f"{name:10s} C={c:<5} threshold={t:<5} val F1 {f1v:6.2f}  test F1 {M.example_f1(pred, target):6.2f}  "
              f"Hamming {M.hamming(pred, target):6.3f}  {time.time() - t0:6.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(FILES))
