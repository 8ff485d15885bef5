"""The demo dataset that ships inside the package (real grocery photos, MIT licence; see its README)."""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path


def demo_dataset_path() -> Path:
    """Path of the bundled demo ShiTuRecDataset (20 products, 220 photos). Treat it as read-only."""
    resource = files("shitu") / "demo_data" / "grocery"
    with as_file(resource) as path:  # a real folder for an ordinary (unzipped) install
        return Path(path)


def demo_start_weights_path() -> Path:
    """Path of the bundled starting weights of the quick demo: a PP-ShiTuV2_rec bundle (half width, 64 px)
    trained on 61 *other* grocery products than the demo set's (see its README). Treat it as read-only."""
    resource = files("shitu") / "demo_data" / "start_weights"
    with as_file(resource) as path:
        return Path(path)
