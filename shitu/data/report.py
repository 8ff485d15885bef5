"""Pictures for ``check``: sample images with their label drawn on, and the split histogram."""

from __future__ import annotations

from pathlib import Path

from shitu.fileio import atomic_open


def draw_labelled_sample(source: Path, label: str, target: Path) -> None:
    """Save ``source`` (EXIF-rotated, RGB) to ``target`` with ``label`` drawn top-left: white text on a red
    box at (3, 3), the font 5% of the width, shrunk towards 2% until the text fits (as PaddleX)."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    with Image.open(source) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    width = image.width
    draw = ImageDraw.Draw(image)
    font = None
    for fraction in (0.05, 0.04, 0.03, 0.02):
        font = ImageFont.load_default(size=max(8, int(width * fraction)))
        left, top, right, bottom = draw.textbbox((3, 3), label, font=font)
        if right + 3 <= width:
            break
    left, top, right, bottom = draw.textbbox((3, 3), label, font=font)
    draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(255, 0, 0))
    draw.text((3, 3), label, fill=(255, 255, 255), font=font)
    fmt = "PNG" if target.suffix.lower() == ".png" else "JPEG"
    with atomic_open(target, "wb") as handle:
        image.save(handle, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def draw_histogram(counts: dict[str, tuple[int, int]], target: Path, dpi: int = 300) -> None:
    """Grouped bar chart of (images, classes) per split, saved as PNG (PaddleX's histogram.png)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    splits = list(counts)
    images = [counts[s][0] for s in splits]
    classes = [counts[s][1] for s in splits]
    figure = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = range(len(splits))
    width = 0.35
    bars_images = axes.bar([p - width / 2 for p in positions], images, width, label="Num Images")
    bars_classes = axes.bar([p + width / 2 for p in positions], classes, width, label="Num Classes")
    axes.bar_label(bars_images, padding=2, fontsize=8)
    axes.bar_label(bars_classes, padding=2, fontsize=8)
    axes.set_xticks(list(positions), splits)
    axes.set_xlabel("Split")
    axes.set_ylabel("Count")
    axes.set_title("Images and classes per split")
    axes.legend()
    axes.margins(y=0.12)
    figure.tight_layout()
    with atomic_open(target, "wb") as handle:
        figure.savefig(handle, format="png", dpi=dpi)
