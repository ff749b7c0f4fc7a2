"""Write a PNG grid of generated Word50 words (one word per row, label underneath) for the docs.

    DSP_DATA_DIR=../shared/data python scripts/word50_samples.py --out docs/word50_samples.png
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dsp.data.word50 import load_word50
from dsp.cli.common import positive_int, user_errors


@user_errors
def main() -> None:
    data_dir = Path(os.environ.get("DSP_DATA_DIR", "data"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ocr", default=data_dir / "ocr" / "letter.data.gz")
    ap.add_argument("--horses", default=data_dir / "weizmann_horse_db")
    ap.add_argument("--cache-dir", default=None, help="default: $DSP_CACHE_DIR or ~/.cache/dsp")
    ap.add_argument("--split", default="train", choices=("train", "val", "test"))
    ap.add_argument("--rows", type=positive_int, default=8)
    ap.add_argument("--zoom", type=positive_int, default=3)
    ap.add_argument("--out", default="word50_samples.png")
    args = ap.parse_args()

    data = load_word50(args.ocr, args.horses, args.cache_dir)
    x, y = data.split(args.split).tensors
    rows = (x[: args.rows].numpy() * 255).round().astype(np.uint8)  # [R, 5, 28, 28]
    r, length, s, _ = rows.shape
    label_h = 12
    strip = np.concatenate(list(rows.transpose(1, 0, 2, 3)), axis=2)  # [R, 28, 5·28]
    sheet = Image.new("L", (length * s * args.zoom, r * (s * args.zoom + label_h)), 255)
    draw = ImageDraw.Draw(sheet)
    for i in range(r):
        top = i * (s * args.zoom + label_h)
        img = Image.fromarray(strip[i]).resize((length * s * args.zoom, s * args.zoom), Image.NEAREST)
        sheet.paste(img, (0, top))
        draw.text((2, top + s * args.zoom), "".join(data.label_names[k] for k in y[i].tolist()), fill=0)
    sheet.save(args.out)
    print(f"wrote {args.out} ({r} words from the {args.split} split of {data.source or 'memory'})")


if __name__ == "__main__":
    main()
