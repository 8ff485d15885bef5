"""Parity with PaddleClas on real photos (``nox -s parity``): import Paddle's weights, compare features.

Reads the reference files ``tests/parity/paddle_reference.py --out .work/parity`` writes (PaddleClas'
own models with random weights and BatchNorm statistics, run by PaddlePaddle on grocery photos).
Bounds: max relative error ≤ 1e-5 for PP-ShiTuV2_rec (training form, and our fused form against
Paddle's re-parameterized one), ≤ 1e-4 for the ViTs. Each test prints the error it measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FULL = Path(__file__).resolve().parents[2] / ".work" / "parity"
BOUNDS = {"PP-ShiTuV2_rec": 1e-5, "PP-ShiTuV2_rec_CLIP_vit_base": 1e-4, "PP-ShiTuV2_rec_CLIP_vit_large": 1e-4}

pytestmark = pytest.mark.slow


def _relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _folder(name: str) -> Path:
    folder = FULL / name
    if not (folder / "features.npy").is_file():
        pytest.skip(f"no reference files in {folder} (run tests/parity/paddle_reference.py)")
    return folder


def _imported(name: str, file: Path, **arch):
    from shitu.models.spec import resolve
    from shitu.plugins import get_host
    from shitu.weights.pdparams import load_pdparams

    spec = get_host().model(name)
    model = spec.build(10, **arch)
    report = resolve(spec.paddle_importer)(model, load_pdparams(file))
    assert report.skipped == []
    model.eval()
    return model


@pytest.mark.parametrize("name", list(BOUNDS))
def test_training_checkpoint_import_matches_paddle(name):
    folder = _folder(name)
    model = _imported(name, folder / f"{name}.pdparams")
    inputs = np.load(folder / "inputs.npy").transpose(0, 2, 3, 1)  # NCHW → NHWC
    error = _relative_error(np.asarray(model(inputs)), np.load(folder / "features.npy"))
    print(f"\n{name}: max relative error vs PaddleClas (.pdparams, {len(inputs)} photos) = {error:.2e}")
    assert error <= BOUNDS[name]


def test_fused_form_matches_paddle_fused_form():
    from shitu.models.pplcnetv2 import fuse

    name = "PP-ShiTuV2_rec"
    folder = _folder(name)
    inputs = np.load(folder / "inputs.npy").transpose(0, 2, 3, 1)
    expected = np.load(folder / "features_fused.npy")
    ours_fused = fuse(_imported(name, folder / f"{name}.pdparams"))
    ours_fused.eval()
    error = _relative_error(np.asarray(ours_fused(inputs)), expected)
    print(f"\n{name}: our fuse() vs Paddle's re_parameterize(): max relative error = {error:.2e}")
    assert error <= BOUNDS[name]
    deploy = _imported(name, folder / f"{name}_fused.pdparams", deploy=True)
    error = _relative_error(np.asarray(deploy(inputs)), expected)
    print(f"{name}: Paddle's fused .pdparams into our deploy form: max relative error = {error:.2e}")
    assert error <= BOUNDS[name]
    training = _imported(name, folder / f"{name}.pdparams")
    error = _relative_error(np.asarray(ours_fused(inputs)), np.asarray(training(inputs)))
    print(f"{name}: our fused form vs our training form: max relative error = {error:.2e}")
    assert error <= 1e-5
