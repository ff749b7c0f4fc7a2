"""Where a value network's segmentation errors come from: the value or the search.

For each crop with truth y* and prediction ŷ (the configured ascent from its start, rounded at 0.5),
compare the network's own values of the two masks:

- exact: ŷ = y*;
- value error: v(x, ŷ) ≥ v(x, y*) with ŷ ≠ y*: the network ranks a wrong mask at least as high as
  the truth, so no better inference can fix it (more or better training can);
- search error: v(x, y*) > v(x, ŷ): the network prefers the truth, but the ascent did not reach it
  (more steps, another rate, restarts or joint inference can help).

It also reports the ascent started from the truth itself (is y* a fixed point of inference?) and how
well v(x, ŷ) predicts the true IoU of ŷ (calibration on the network's own outputs).
"""
from __future__ import annotations

import torch

from dsp.tasks.oracles import soft_iou
from dsp.tasks.segmentation import decode
from dsp.nn.modes import eval_mode


@torch.no_grad()
def _values(model, y: torch.Tensor, feats) -> torch.Tensor:
    return model.value(y, feats)


def value_diagnosis(model, inference, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> dict[str, float | int]:
    """Diagnose inputs x [N, C, h, w] with truths y [N, h, w] ∈ {0, 1} at the model's input size.
    Percentages of crops (exact, value_error, search_error; they sum to 100) and means of values
    and IoUs in percent."""
    rows = {k: [] for k in ("iou", "v_truth", "v_pred", "exact", "value_error", "search_error", "iou_from_truth")}
    with eval_mode(model):
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size].float()
            with torch.no_grad():
                feats = model.features(xb)
            pred = decode(inference(model, feats).y.view_as(yb)).float()  # [B, h, w]
            from_truth = decode(inference(model, feats, y0=yb).y.view_as(yb)).float()  # does y* stay?
            v_truth, v_pred = _values(model, yb, feats), _values(model, pred, feats)  # [B], [B]
            exact = (pred == yb).flatten(1).all(1)  # [B]
            rows["iou"].append(soft_iou(pred, yb))
            rows["v_truth"].append(v_truth)
            rows["v_pred"].append(v_pred)
            rows["exact"].append(exact)
            rows["value_error"].append(~exact & (v_pred >= v_truth))
            rows["search_error"].append(~exact & (v_pred < v_truth))
            rows["iou_from_truth"].append(soft_iou(from_truth, yb))
    r = {k: torch.cat(v).double() for k, v in rows.items()}
    return {
        "crops": x.shape[0],
        "mean_iou": 100 * r["iou"].mean().item(),
        "exact": 100 * r["exact"].mean().item(),
        "value_error": 100 * r["value_error"].mean().item(),
        "search_error": 100 * r["search_error"].mean().item(),
        "v_truth": 100 * r["v_truth"].mean().item(),
        "v_pred": 100 * r["v_pred"].mean().item(),
        "v_pred_abs_error": 100 * (r["v_pred"] - r["iou"]).abs().mean().item(),
        "iou_from_truth": 100 * r["iou_from_truth"].mean().item(),
    }
