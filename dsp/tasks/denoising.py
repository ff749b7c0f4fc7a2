"""The image-denoising output space (End-to-end SPENs §6.1): clean grayscale images y [N, h, w].

Training batches are cut here, not in the data: each batch takes a uniformly random crop inside
training image (packed, unpadded) and adds fresh Gaussian noise σ, so the model sees new
crops and new noise every epoch (the paper's "random 96×128 crops"). Validation and test pairs
come with fixed noise from dsp.data.denoise.

Predictions are intensities [N, h, w]: the inference routine's y (e.g. unrolled gradient descent
on the energy), or the local term alone in mode="local". Metrics: psnr (dB, per image, averaged;
predictions clamped to [0, 1]) and mse (of the clamped predictions, on the [0, 1] scale).
"""
from __future__ import annotations

import numpy as np
import torch

from dsp import metrics as M
from dsp import interfaces as I
from dsp.errors import DspError
from dsp.nn.modes import eval_mode

GUTTER = 2  # white pixels between the tiles of figures()


def random_crops(pixels: torch.Tensor, offsets: torch.Tensor, sizes: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """One uniformly random crop float32 [B, ch, cw] in [0, 1] inside each of B packed images.

    pixels uint8 [P] holds the images row-major one after another; image b starts at offsets[b]
    and is sizes[b] = (h, w) with h >= ch and w >= cw. Offsets come from the global torch RNG on
    the pixels' device; one gather serves the whole batch.
    """
    ch, cw = crop
    dev = pixels.device
    offsets, sizes = offsets.to(dev), sizes.to(dev)
    room = (sizes - torch.tensor([ch, cw], device=dev) + 1).clamp_min(1)  # [B, 2] valid offsets
    corner = (torch.rand(offsets.shape[0], 2, device=dev) * room).long().minimum(room - 1)  # [B, 2]
    rows = corner[:, 0, None] + torch.arange(ch, device=dev)  # [B, ch]
    cols = corner[:, 1, None] + torch.arange(cw, device=dev)  # [B, cw]
    flat = offsets[:, None, None] + rows[:, :, None] * sizes[:, 1, None, None] + cols[:, None, :]  # [B, ch, cw]
    return pixels[flat].float() / 255


def _to_uint8(img: torch.Tensor) -> torch.Tensor:
    return (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


class DenoisingTask(I.Task):
    output = I.IMAGE

    main_metric = "psnr"

    def __init__(self, crop=(96, 128), sigma: float = 25 / 255, pixels: torch.Tensor | None = None):
        self.crop = (int(crop[0]), int(crop[1]))
        self.sigma = float(sigma)
        self.pixels = pixels  # uint8 [P]: the packed training images (dsp.data.denoise)

    def batch(self, x, y, index=None):
        """Training only: image offsets x [B] and sizes y [B, 2] -> (noisy, clean) [B, ch, cw]."""
        if self.pixels is None:
            raise DspError("this denoising task was built without its training pixels; use dsp.tasks.task_for(data)")
        if self.pixels.device != x.device:  # moved once, to wherever the trainer keeps the splits
            self.pixels = self.pixels.to(x.device)
        clean = random_crops(self.pixels, x, y, self.crop)  # [B, ch, cw]
        return clean + self.sigma * torch.randn_like(clean), clean

    def predict(self, model, inference, x, y, batch_size: int, mode: str):
        """Denoised images [N, h, w] for noisy x [N, h, w], and the mean inference iterations per batch."""
        if not y.is_floating_point():
            raise DspError("the denoising train split holds whole clean images (offsets and sizes), not "
                           "(noisy, clean) pairs; evaluate split=val or split=test")
        outs, iters = [], []
        local = self.predicts_locally(model, mode)
        with eval_mode(model):
            for start in range(0, x.shape[0], batch_size):
                with torch.no_grad():
                    feats = model.features(x[start : start + batch_size])
                    if local:
                        outs.append(model.local_probs(feats))  # [B, h, w]
                        iters.append(0.0)
                if not local:
                    # Not under no_grad: gradient-based inference needs autograd for ∂E/∂y and
                    # sets its own grad mode.
                    result = inference(model, feats)
                    outs.append(result.y.detach())  # [B, h, w]
                    iters.append(float(result.iterations))
        return torch.cat(outs), sum(iters) / max(1, len(iters))

    def calibrate(self, out, y, setting):
        return None  # nothing to tune (trainer.threshold does not apply)

    def evaluate(self, out, y, state=None) -> dict[str, float]:
        mse = (out.detach().double().clamp(0, 1) - y.double()).pow(2).mean().item()
        return {"psnr": M.psnr(out, y), "mse": mse}

    def arrays(self, out, y, state=None, x=None) -> dict[str, np.ndarray]:
        arrays = {
            "pred": out.detach().clamp(0, 1).cpu().numpy().astype(np.float32),  # [N, H, W]
            "target": y.detach().cpu().numpy().astype(np.float32),  # [N, H, W]
        }
        if x is not None:  # the noisy input, clamped to [0, 1] for storage and viewing
            arrays["noisy"] = x.detach().clamp(0, 1).cpu().numpy().astype(np.float32)  # [N, H, W]
        return arrays

    def figures(self, out, y, x) -> dict[str, np.ndarray]:
        """{"denoising": uint8 [3h + 2g, k·w + (k-1)·g]}: up to k=4 examples in columns, rows noisy /
        prediction / clean, separated by a g=2 pixel white gutter."""
        k = min(4, out.shape[0])
        h, w = out.shape[-2:]
        tiles = torch.stack([x[:k], out[:k], y[:k]])  # [3, k, h, w]
        grid = torch.full((3 * h + 2 * GUTTER, k * w + (k - 1) * GUTTER), 255, dtype=torch.uint8)
        for r in range(3):  # 3 rows × k columns of small copies: loops over tiles, not pixels
            for c in range(k):
                top, left = r * (h + GUTTER), c * (w + GUTTER)
                grid[top : top + h, left : left + w] = _to_uint8(tiles[r, c]).cpu()
        return {"denoising": grid.numpy()}
