"""Build an open-set training dataset from the Grocery Store photos: train on the products that are *not* in
shitu's bundled demo set, and evaluate on the demo set's gallery and query lists (20 other products).

    python tools/make_grocery_openset.py GROCERY_DIR OUTPUT_DIR

``GROCERY_DIR`` holds ``photos/NN_Name/*.jpg`` (the dataset's train and val photos). ``OUTPUT_DIR`` gets copies
(hard links where possible) of the training products' photos under ``photos/`` and of the demo set's images under
``images/`` (``shitu check`` refuses images that resolve outside the dataset root), and the ShiTuRecDataset lists;
labels are the original fine-grained class ids, so train and evaluation products never share a label.
This is the dataset ``shitu/demo_data/grocery_start`` (the demo's starting weights) was trained on.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "shitu" / "demo_data" / "grocery"


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def fine_id(folder: str) -> int:
    return int(folder.split("_", 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grocery", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    photos = args.grocery.resolve() / "photos"
    demo_folders = [line.strip() for line in (DEMO / "label.txt").read_text().splitlines() if line.strip()]
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    for name, source in (("photos", photos), ("images", DEMO / "images")):
        if not (out / name).exists():
            skip = shutil.ignore_patterns(*demo_folders) if name == "photos" else None
            shutil.copytree(source, out / name, copy_function=_link_or_copy, ignore=skip)
    train_lines = []
    for folder in sorted(p.name for p in photos.iterdir() if p.is_dir()):
        if folder in demo_folders:
            continue
        for image in sorted((photos / folder).glob("*.jpg")):
            train_lines.append(f"photos/{folder}/{image.name} {fine_id(folder)}")
    (out / "train.txt").write_text("\n".join(train_lines) + "\n")
    for split in ("gallery", "query"):
        lines = []
        for line in (DEMO / f"{split}.txt").read_text().splitlines():
            path, label = line.rsplit(" ", 1)
            lines.append(f"{path} {fine_id(demo_folders[int(label)])}")
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n")
    trained = len({line.rsplit(" ", 1)[1] for line in train_lines})
    print(f"{out}: {len(train_lines)} train photos of {trained} products; evaluation on the demo's 20 products")


if __name__ == "__main__":
    main()
