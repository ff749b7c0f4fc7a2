"""scripts/mask_fidelity.py: the loader's masks against the exact pixel coverage of the originals."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from fixtures_images import write_image_folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import mask_fidelity  # noqa: E402


def test_coverage_mask_by_hand(tmp_path):
    """A 4×4 mask on a 2×2 grid: the blocks hold 3, 1, 2 and 0 foreground pixels of 4, so coverage
    0.75, 0.25, 0.5, 0, foreground where it is at least 1/2."""
    from PIL import Image

    full = np.array([[1, 1, 0, 1], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]], dtype=np.uint8) * 255
    Image.fromarray(full).save(tmp_path / "m.png")
    assert mask_fidelity.coverage_mask(tmp_path / "m.png", 2).tolist() == [[True, False], [True, False]]


def test_full_decoding_is_closer_to_the_coverage_than_draft_decoding(tmp_path):
    root = write_image_folder(tmp_path / "imgs", n=8, size=(160, 120))  # JPEG masks of 80×60
    rows = mask_fidelity.fidelity(root, 12)
    full, draft = rows["full decoding (data.jpeg_draft=false)"], rows["draft decoding (data.jpeg_draft=true)"]
    assert full["mean_iou"] > draft["mean_iou"] and full["mean_iou"] > 95
    assert full["pixels_differing_%"] < draft["pixels_differing_%"]
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "mask_fidelity.py"), "--root", str(root),
                          "--size", "12"], capture_output=True, text=True, check=True).stdout
    assert f"{full['mean_iou']:9.2f}" in out and "draft decoding" in out
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "mask_fidelity.py"), "--root", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "rgb" in bad.stderr


def test_the_warp_paths_agree_without_a_warp_and_the_small_path_blurs(tmp_path):
    root = write_image_folder(tmp_path / "imgs", n=8, size=(160, 120))
    rows = mask_fidelity.warp_paths(root, 12, 4, seed=0)
    assert list(rows) == ["no warp", *(name for name, *_ in mask_fidelity.WARPS)]
    assert rows["no warp"]["masks_iou"] > 95
    for name, *_ in mask_fidelity.WARPS:  # resampling the small image blurs it; the source path keeps detail
        assert rows[name]["sharpness_small"] < rows[name]["sharpness_source"]
