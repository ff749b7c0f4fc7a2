"""A tiny rgb/ + figure_ground/ folder (no ../shared/data): a bright ellipse on a noisy background.
write_plain_images() writes a plain folder of grayscale images (denoising).

Like the Weizmann horses, images are JPEG and masks are greyscale JPEG of another size than their
image, so loading has to resize both and threshold the masks. `tiny_images_overrides(root)` gives
the Hydra overrides that run a horses preset on such a folder in seconds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_image_folder(root: Path, n: int = 8, size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    """Write root/rgb/imgNNN.jpg (size = (width, height)) and root/figure_ground/imgNNN.jpg (half
    that size) with an ellipse of random centre and radii; returns root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "rgb").mkdir(parents=True, exist_ok=True)
    (root / "figure_ground").mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]  # [2, h, w] in [0, 1)
    for k in range(1, n + 1):
        cy, cx = rng.uniform(0.35, 0.65, 2)
        ry, rx = rng.uniform(0.2, 0.3, 2)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0  # [h, w]
        img = rng.normal(0.25, 0.08, (h, w, 3))
        img[inside] = rng.normal(0.8, 0.08, (int(inside.sum()), 3)) * np.array([1.0, 0.7, 0.4])
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(root / "rgb" / f"img{k:03d}.jpg", quality=95)
        mask = Image.fromarray(inside.astype(np.uint8) * 255).resize((w // 2, h // 2), Image.NEAREST)
        mask.save(root / "figure_ground" / f"img{k:03d}.jpg", quality=90)
    return root


def tiny_images_overrides(root: Path, n: int = 8) -> list[str]:
    """Hydra overrides that train a horses preset on write_image_folder(root, n) in seconds (at the
    presets' 32×32, so the DVN presets' 24×24 crops fit)."""
    return [
        f"data.root={root}", "data.size=32", f"data.train=[1,{n - 2}]", f"data.val=[{n - 3},{n - 2}]",
        f"data.test=[{n - 1},{n}]", "model.unary.base_width=4", "model.unary.depth=2",
        "trainer.max_epochs=1", "trainer.progress=false", "trainer.batch_size=4",
    ]


def write_plain_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0, ext: str = "png") -> Path:
    """Write folder/imgNNN.<ext> (NNN from 001), one grayscale image per (height, width) in sizes, of
    random values in [20, 255]: never 0, so a zero in a crop reveals padding. Returns folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k, (h, w) in enumerate(sizes, start=1):
        img = rng.integers(20, 256, (h, w), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"img{k:03d}.{ext}")
    return folder


def tiny_denoise_overrides(root: Path) -> list[str]:
    """Hydra overrides that train a denoising preset on six tiny images under root/rgb in seconds."""
    write_plain_images(root / "rgb", [(12, 16), (10, 14), (14, 12), (12, 18), (11, 15), (12, 16)])
    return [
        f"data.root={root}", "data.crop=[8,12]", "data.train=[1,4]", "data.val=[3,4]", "data.test=[5,6]",
        "trainer.max_epochs=1", "trainer.progress=false", "trainer.batch_size=2",
    ]
