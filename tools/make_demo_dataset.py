#!/usr/bin/env python3
"""Build the small real-photo demo dataset shipped in ``shitu/demo_data/grocery``.

The dataset is a 20-product subset of the Grocery Store Dataset (Klasson, Zhang and
Kjellström, WACV 2019, MIT licence) written in PaddleX ShiTuRecDataset format::

    grocery/
      images/<NN_Name>/<original file name>.jpg
      train.txt      "<relative path> <label>" lines (6 photos per product)
      gallery.txt    catalogue ("iconic") picture + 1 photo per product
      query.txt      3 photos per product
      label.txt      line i = product folder name of label i
      LICENSE        verbatim copy of the source licence
      README.md      credit, selection, splits, how to regenerate

Usage (from the repository root)::

    python tools/make_demo_dataset.py            # writes shitu/demo_data/grocery
    python tools/make_demo_dataset.py --output /tmp/grocery_check

The output is deterministic: the same arguments (and the same Pillow build) give
byte-identical files.  Everything is sorted, the photo choice uses ``random.Random``
seeded from ``--seed`` and the product folder name, images are re-encoded with fixed
JPEG settings and without any metadata (no EXIF, no ICC profile, no comments).

The dataset is written into a temporary sibling directory and renamed into place at
the end, so an interrupted run never leaves a half-written dataset behind.  An
existing output directory is only replaced with ``--force``.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageCms, ImageOps

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT / ".." / "shared" / "data" / "grocery"
DEFAULT_OUTPUT = REPO_ROOT / "shitu" / "demo_data" / "grocery"

# The 20 products: (source folder under photos/ and iconic/, category, look-alike
# group or "").  Fine-grained look-alikes are included on purpose so that the demo
# exercises what retrieval has to tell apart: three apple varieties, three Arla
# "Sommarmjölk" cartons that differ mainly in colour and a small badge, two orange
# Tropicana cartons, lemon vs lime and red vs yellow bell pepper.
PRODUCTS: tuple[tuple[str, str, str], ...] = (
    ("00_Golden-Delicious", "fruit", "apple varieties"),
    ("01_Granny-Smith", "fruit", "apple varieties"),
    ("04_Royal-Gala", "fruit", "apple varieties"),
    ("06_Banana", "fruit", ""),
    ("08_Lemon", "fruit", "lemon vs lime"),
    ("09_Lime", "fruit", "lemon vs lime"),
    ("16_Orange", "fruit", ""),
    ("36_Tropicana-Juice-Smooth", "packaged: juice", "Tropicana orange juices"),
    ("37_Tropicana-Mandarin-Morning", "packaged: juice", "Tropicana orange juices"),
    ("39_Arla-Lactose-Medium-Fat-Milk", "packaged: milk", "Arla Sommarmjölk milks"),
    ("40_Arla-Medium-Fat-Milk", "packaged: milk", "Arla Sommarmjölk milks"),
    ("41_Arla-Standard-Milk", "packaged: milk", "Arla Sommarmjölk milks"),
    ("45_Oatly-Oat-Milk", "packaged: oat milk", ""),
    ("49_Alpro-Blueberry-Soyghurt", "packaged: soyghurt", ""),
    ("57_Yoggi-Strawberry-Yoghurt", "packaged: yoghurt", ""),
    ("62_Carrots", "vegetable", ""),
    ("63_Cucumber", "vegetable", ""),
    ("68_Yellow-Onion", "vegetable", ""),
    ("71_Red-Bell-Pepper", "vegetable", "bell peppers"),
    ("72_Yellow-Bell-Pepper", "vegetable", "bell peppers"),
)

N_TRAIN = 6
N_GALLERY_PHOTOS = 1
N_QUERY = 3
N_PHOTOS = N_TRAIN + N_GALLERY_PHOTOS + N_QUERY
MAX_TOTAL_BYTES = 5 * 1000 * 1000

SOURCE_CREDIT = """\
the Grocery Store Dataset by Marcus Klasson, Cheng Zhang and Hedvig Kjellström,
"A Hierarchical Grocery Store Image Dataset with Visual and Semantic Labels", WACV 2019
(public repository marcusklasson/GroceryStoreDataset). MIT licence: see LICENSE beside \
this file."""


@dataclass(frozen=True)
class Item:
    """One output image: where it comes from, where it goes, its label."""

    src: Path
    rel: str  # path relative to the dataset root, with "/" separators
    label: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help="Grocery Store photo folder (photos/, iconic/, classes.csv, LICENSE)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="dataset folder to write")
    parser.add_argument("--seed", type=int, default=0, help="photo selection seed")
    parser.add_argument("--max-side", type=int, default=224, help="longest image side in pixels")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    if args.max_side < 1:
        parser.error("--max-side must be >= 1")
    if not 1 <= args.quality <= 95:
        parser.error("--quality must be in 1..95")
    return args


def check_source(source: Path) -> None:
    missing = [p for p in (source / "photos", source / "iconic", source / "LICENSE") if not p.exists()]
    if missing:
        raise SystemExit(
            f"error: {source} does not look like the grocery source folder; "
            f"missing: {', '.join(str(p) for p in missing)}"
        )


def list_jpegs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise SystemExit(f"error: missing folder {folder}")
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".jpg"),
        key=lambda p: p.name,
    )


def plan_splits(source: Path, seed: int) -> dict[str, list[Item]]:
    """Choose the images of every product and assign them to the three lists."""
    folders = sorted(name for name, _, _ in PRODUCTS)
    if len(set(folders)) != len(folders):
        raise SystemExit("error: duplicate product in PRODUCTS")
    splits: dict[str, list[Item]] = {"train": [], "gallery": [], "query": []}
    for label, folder in enumerate(folders):
        iconic = list_jpegs(source / "iconic" / folder)
        if len(iconic) != 1:
            raise SystemExit(f"error: expected one iconic picture in iconic/{folder}, found {len(iconic)}")
        photos = list_jpegs(source / "photos" / folder)
        if len(photos) < N_PHOTOS:
            raise SystemExit(f"error: photos/{folder} has {len(photos)} photos, need {N_PHOTOS}")
        # One RNG per product, seeded from the seed and the folder name (str seeds
        # are hashed with SHA-512, stable across runs and Python versions), so the
        # choice for one product does not depend on which other products are used.
        rng = random.Random(f"{seed}:{folder}")
        chosen = rng.sample(photos, N_PHOTOS)

        def item(src: Path, _folder: str = folder, _label: int = label) -> Item:
            return Item(src=src, rel=f"images/{_folder}/{src.name}", label=_label)

        splits["train"] += [item(p) for p in chosen[:N_TRAIN]]
        splits["gallery"] += [item(iconic[0])]
        splits["gallery"] += [item(p) for p in chosen[N_TRAIN:-N_QUERY]]
        splits["query"] += [item(p) for p in chosen[-N_QUERY:]]
    for items in splits.values():
        items.sort(key=lambda it: it.rel)
    all_rels = [it.rel for items in splits.values() for it in items]
    if len(all_rels) != len(set(all_rels)):
        raise SystemExit("error: an image was assigned to two lists")
    return splits


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def convert_image(src: Path, max_side: int, quality: int) -> bytes:
    """Load, orient, convert to sRGB, downscale and re-encode one picture."""
    with Image.open(src) as im:
        im.load()
        icc = im.info.get("icc_profile")
        im = ImageOps.exif_transpose(im)
        if icc:
            # Some catalogue pictures are Adobe RGB: convert the pixels to sRGB
            # before the profile is dropped, so the colours stay right.
            src_profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            im = ImageCms.profileToProfile(
                im.convert("RGB"),
                src_profile,
                _SRGB,
                renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                outputMode="RGB",
            )
        im = im.convert("RGB")
    w, h = im.size
    if max(w, h) > max_side:
        scale = max_side / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS)
    # A fresh image carries no info dict at all: nothing but pixels is written.
    clean = Image.frombytes("RGB", im.size, im.tobytes())
    buf = io.BytesIO()
    clean.save(
        buf,
        format="JPEG",
        quality=quality,
        optimize=True,
        progressive=False,
        subsampling=2,  # 4:2:0
    )
    return buf.getvalue()


README_TEMPLATE = """\
# Grocery demo dataset (real photos, ShiTuRecDataset format)

A small real-photo demo set for `shitu`: {n_products} grocery products, {n_images} images.
It is a subset of the Grocery Store photos, resized and re-encoded.

## Source and licence

Source: {credit}
Anything that ships a copy of these pictures must keep that licence text and this credit.

Original repository: https://github.com/marcusklasson/GroceryStoreDataset

```bibtex
@inproceedings{{klasson2019hierarchical,
  title={{A Hierarchical Grocery Store Image Dataset with Visual and Semantic Labels}},
  author={{Klasson, Marcus and Zhang, Cheng and Kjellstr{{\\"o}}m, Hedvig}},
  booktitle={{IEEE Winter Conference on Applications of Computer Vision (WACV)}},
  year={{2019}}
}}
```

The photos come only from the original `train` and `val` splits; none of the
original `test` split is included.

## Selection

Fruit, vegetables and packaged goods, with deliberate fine-grained look-alikes
(three apple varieties, three Arla Sommarmjölk milk cartons, two orange Tropicana
juices, lemon vs lime, red vs yellow bell pepper).
Labels are 0..{last_label} in the order of the sorted product folder names
(`label.txt`: line i = folder name of label i; `NN` in a folder name is the
original fine-grained class id, not the label).

| label | folder | category | look-alike group |
| --- | --- | --- | --- |
{rows}

## Splits

Per product, {n_photos} photos are drawn with `random.Random` seeded from the seed
({seed}) and the folder name, plus the one catalogue (iconic) picture:

- `train.txt`: {n_train} photos per product ({c_train} lines);
- `gallery.txt`: the iconic picture + {n_gallery} photo per product ({c_gallery} lines);
- `query.txt`: the remaining {n_query} photos per product ({c_query} lines).

No image appears in two lists. Each line is `<relative path> <label>`, sorted by
path; images live in `images/<folder>/<original file name>`.

## Images

RGB, EXIF orientation applied, colour-managed to sRGB, longer side at most
{max_side} px (aspect kept, Lanczos; smaller pictures are not enlarged), JPEG
quality {quality}, optimised Huffman tables, 4:2:0 chroma, no metadata.

## Regenerate

From the repository root, with the source photos in `../shared/data/grocery`:

```sh
{command}
```

It refuses to overwrite an existing folder: add `--force` to replace this one.
`--source` and `--output` choose other locations. The result is byte-identical
for the same arguments and the same Pillow build.
"""


def readme_text(splits: dict[str, list[Item]], seed: int, max_side: int, quality: int) -> str:
    folders = sorted(name for name, _, _ in PRODUCTS)
    meta = {name: (cat, group) for name, cat, group in PRODUCTS}
    rows = []
    for label, folder in enumerate(folders):
        cat, group = meta[folder]
        rows.append(f"| {label} | `{folder}` | {cat} | {group} |")
    command = "python tools/make_demo_dataset.py"
    if seed != 0:
        command += f" --seed {seed}"
    if max_side != 224:
        command += f" --max-side {max_side}"
    if quality != 85:
        command += f" --quality {quality}"
    return README_TEMPLATE.format(
        n_products=len(folders),
        n_images=sum(len(items) for items in splits.values()),
        credit=SOURCE_CREDIT,
        last_label=len(folders) - 1,
        rows="\n".join(rows),
        n_photos=N_PHOTOS,
        seed=seed,
        n_train=N_TRAIN,
        n_gallery=N_GALLERY_PHOTOS,
        n_query=N_QUERY,
        c_train=len(splits["train"]),
        c_gallery=len(splits["gallery"]),
        c_query=len(splits["query"]),
        max_side=max_side,
        quality=quality,
        command=command,
    )


def list_text(items: list[Item]) -> str:
    return "".join(f"{it.rel} {it.label}\n" for it in items)


def write_dataset(
    dest: Path,
    source: Path,
    splits: dict[str, list[Item]],
    seed: int,
    max_side: int,
    quality: int,
) -> None:
    for items in splits.values():
        for it in items:
            out = dest / it.rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(convert_image(it.src, max_side, quality))
    for name, items in splits.items():
        (dest / f"{name}.txt").write_bytes(list_text(items).encode("utf-8"))
    folders = sorted(name for name, _, _ in PRODUCTS)
    (dest / "label.txt").write_bytes("".join(f"{f}\n" for f in folders).encode())
    (dest / "LICENSE").write_bytes((source / "LICENSE").read_bytes())
    readme = readme_text(splits, seed, max_side, quality)
    (dest / "README.md").write_bytes(readme.encode("utf-8"))


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = args.source.resolve()
    output = args.output.resolve()
    check_source(source)
    if output == source or source in output.parents:
        raise SystemExit("error: --output must not be inside --source")
    if output.exists() and not args.force:
        raise SystemExit(f"error: {output} exists; pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise SystemExit(f"error: {output} exists and is not a directory")

    splits = plan_splits(source, args.seed)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    try:
        write_dataset(tmp, source, splits, args.seed, args.max_side, args.quality)
        total = tree_bytes(tmp)
        if total >= MAX_TOTAL_BYTES:
            raise SystemExit(f"error: dataset is {total} bytes, over the {MAX_TOTAL_BYTES} limit")
        if output.exists():
            if not args.force:
                raise SystemExit(f"error: {output} appeared while building")
            os.rename(output, old)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not output.exists():
            os.rename(old, output)  # put the previous dataset back
        raise
    if old.exists():
        shutil.rmtree(old)

    n_images = sum(len(items) for items in splits.values())
    print(f"wrote {output}")
    print(f"products: {len(PRODUCTS)}")
    for name, items in splits.items():
        print(f"{name}.txt: {len(items)} images")
    print(f"images: {n_images}")
    print(f"total bytes: {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
