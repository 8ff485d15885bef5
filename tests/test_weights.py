"""Paddle weight files read without Paddle (shitu.weights), on real files Paddle wrote.

The fixtures in tests/fixtures/paddle/ were produced by tests/parity/paddle_reference.py --tiny (Paddle 3.3.1 +
PaddleClas 2.6.0; the legacy .pdmodel exports by Paddle 3.0.0): tiny PP-ShiTuV2_rec (PPLCNetV2 ShiTu at scale
0.0625, real depths) and CLIP ViT base/large (embed 16, depth 2) RecModels with every parameter randomised,
their .pdparams (+ the same state as .npz), PIR (inference.json) and legacy (inference.pdmodel) exports, the
inputs and Paddle's features. manifest.json records how.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from shitu import ShituError
from shitu.weights import load_inference_model, load_pdparams, load_pdparams_name_table, read_pdiparams
from shitu.weights.paddle_inference import VarInfo
from shitu.weights.structure import op_kind, structured_names, used_parameters

FIXTURES = Path(__file__).parent / "fixtures" / "paddle"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
REC = "PP-ShiTuV2_rec"
VIT_BASE = "PP-ShiTuV2_rec_CLIP_vit_base"
VIT_LARGE = "PP-ShiTuV2_rec_CLIP_vit_large"
MODELS = [REC, VIT_BASE, VIT_LARGE]
EXPORTS = ["inference", "inference_legacy"]


def pdparams(name: str) -> Path:
    return FIXTURES / name / f"{name}.pdparams"


def fuse_rep_blocks(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PaddleClas' RepDepthwiseSeparable.re_parameterize() in numpy: fold each dw_conv_list branch's BN
    (eps 1e-5), zero-pad the kernels to the largest and sum into dw_conv.weight/bias."""
    out = dict(state)
    prefixes = sorted({k.split("dw_conv_list.")[0] for k in state if ".dw_conv_list." in k})
    for prefix in prefixes:
        size = state[prefix + "dw_conv.weight"].shape[-1]
        kernel = np.zeros(state[prefix + "dw_conv.weight"].shape, np.float64)
        bias = np.zeros(kernel.shape[0], np.float64)
        j = 0
        while f"{prefix}dw_conv_list.{j}.conv.weight" in state:
            b = f"{prefix}dw_conv_list.{j}."
            w = state[b + "conv.weight"].astype(np.float64)
            std = np.sqrt(state[b + "bn._variance"].astype(np.float64) + 1e-5)
            t = state[b + "bn.weight"] / std
            pad = (size - w.shape[-1]) // 2
            kernel += np.pad(w * t[:, None, None, None], ((0, 0), (0, 0), (pad, pad), (pad, pad)))
            bias += state[b + "bn.bias"] - state[b + "bn._mean"] * t
            j += 1
        out[prefix + "dw_conv.weight"] = kernel
        out[prefix + "dw_conv.bias"] = bias
    return out


# ---------------------------------------------------------------------------------------------- .pdparams


@pytest.mark.parametrize("name", MODELS)
def test_pdparams_matches_npz(name):
    state = load_pdparams(pdparams(name))
    reference = np.load(FIXTURES / name / f"{name}.npz")
    assert list(state) == list(reference.keys())  # same keys, same (registration) order
    for key, value in state.items():
        assert value.dtype == np.float32 and value.shape == reference[key].shape, key
        np.testing.assert_array_equal(value, reference[key], err_msg=key)
    assert len(state) == MANIFEST["models"][name]["num_keys"]


def test_pdparams_keys_and_layouts():
    rec = load_pdparams(pdparams(REC))
    assert len(rec) == 287  # the real depths: the train-form key count of the spec (§1)
    assert rec["backbone.stem.0.conv.weight"].shape == (8, 3, 3, 3)  # OIHW
    assert rec["backbone.stages.2.1.dw_conv_list.2.conv.weight"].shape == (32, 1, 1, 1)
    assert "backbone.stages.3.0.dw_conv_list.2.conv.weight" in rec  # ShiTu: stride 1, so 3 branches
    assert "backbone.stages.2.0.dw_conv_list.2.conv.weight" not in rec  # stride 2: no 1×1 branch
    assert rec["backbone.last_conv.bias"].shape == (16,)
    assert rec["head.fc.weight"].shape == (16, 10)  # Linear is [in, out]
    assert all(rec[k].min() > 0 for k in rec if k.endswith("_variance"))
    vit = load_pdparams(pdparams(VIT_BASE))
    assert vit["backbone.proj"].shape == (16, 16) and vit["head.weight"].shape == (16, 10)
    assert vit["backbone.pos_embed"].shape == (1, 10, 16)  # 3×3 patches + cls


def test_name_table_is_the_one_paddle_saved():
    for name in MODELS:
        assert load_pdparams_name_table(pdparams(name)) == MANIFEST["models"][name]["structured_to_parameter_name"]


def _write_pickle(path: Path, obj, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def test_plain_pickles_paddle_may_write(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    for protocol in (2, 3, 4):  # protocol 2 spells bytes as _codecs.encode(..., "latin1")
        file = _write_pickle(tmp_path / f"p{protocol}.pdparams", OrderedDict(w=a, b=a[0]), protocol)
        state = load_pdparams(file)
        assert list(state) == ["w", "b"]
        np.testing.assert_array_equal(state["w"], a)
    # a Tensor pickled outside a state dict: (name, ndarray) through builtins.tuple
    file = _write_pickle(tmp_path / "t.pdparams", {"w": ("linear_0.w_0", a), "StructuredToParameterName@@": {"w": "x"}})
    np.testing.assert_array_equal(load_pdparams(file)["w"], a)
    assert load_pdparams_name_table(file) == {"w": "x"}
    # arrays over 1 GiB are split into slices under protocol 2/3 ("UnpackBigParamInfor@@")
    big = {
        "w@@.0": a.ravel()[:4],
        "w@@.1": a.ravel()[4:],
        "UnpackBigParamInfor@@": {"w": {"OriginShape": (2, 3), "slices": ["w@@.0", "w@@.1"]}},
    }
    np.testing.assert_array_equal(load_pdparams(_write_pickle(tmp_path / "big.pdparams", big, 2))["w"], a)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalExploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


@pytest.mark.parametrize("exploit", [_Exploit, _EvalExploit])
def test_hostile_pickle_is_refused(tmp_path, exploit):
    marker = tmp_path / "pwned"
    file = _write_pickle(tmp_path / "evil.pdparams", {"backbone.w": np.zeros(2), "x": exploit(marker)})
    with pytest.raises(ShituError, match="refusing to load") as info:
        load_pdparams(file)
    message = str(info.value)
    assert str(file) in message and "a pickle that would run code" in message
    assert ("system" in message) if exploit is _Exploit else ("builtins.eval" in message)
    assert not marker.exists()


def test_hostile_info_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    target = tmp_path / "model"
    target.mkdir()
    for f in (FIXTURES / REC / "inference_legacy").iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    _write_pickle(target / "inference.pdiparams.info", {"x": _Exploit(marker)})
    with pytest.raises(ShituError, match="refusing to load"):
        load_inference_model(target)
    assert not marker.exists()


def test_not_a_state_dict(tmp_path):
    with pytest.raises(ShituError, match="holds a int, not an array"):
        load_pdparams(_write_pickle(tmp_path / "a.pdparams", {"w": 3}))
    with pytest.raises(ShituError, match="holds a list"):
        load_pdparams(_write_pickle(tmp_path / "b.pdparams", [np.zeros(2)]))
    with pytest.raises(ShituError, match="array of Python objects"):
        load_pdparams(_write_pickle(tmp_path / "c.pdparams", {"w": np.array([{}, 1], dtype=object)}))
    with pytest.raises(ShituError, match="does not exist"):
        load_pdparams(tmp_path / "missing.pdparams")
    (tmp_path / "empty.pdparams").write_bytes(b"")
    with pytest.raises(ShituError, match="empty"):
        load_pdparams(tmp_path / "empty.pdparams")


@pytest.mark.parametrize("fraction", [0.0001, 0.01, 0.3, 0.5, 0.9, 0.9999])
def test_truncated_pdparams(tmp_path, fraction):
    data = pdparams(REC).read_bytes()
    file = tmp_path / "cut.pdparams"
    file.write_bytes(data[: max(1, int(len(data) * fraction))])
    with pytest.raises(ShituError) as info:
        load_pdparams(file)
    assert str(file) in str(info.value)


def test_garbage_pdparams(tmp_path):
    file = tmp_path / "garbage.pdparams"
    file.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ShituError, match=re.escape(str(file))):
        load_pdparams(file)


# ------------------------------------------------------------------------------------------ inference models


@pytest.mark.parametrize("export", EXPORTS)
@pytest.mark.parametrize("name", MODELS)
def test_inference_params_equal_pdparams(name, export):
    model = load_inference_model(FIXTURES / name / export)
    assert model.format == ("pir" if export == "inference" else "legacy")
    assert list(model.params) == sorted(model.params)  # save_combine wrote them sorted by name
    train = load_pdparams(pdparams(name))
    exported = fuse_rep_blocks(train) if name == REC else train
    if export == "inference":
        # the exporting process is the one that saved the .pdparams: its name table is valid here
        table = load_pdparams_name_table(pdparams(name))
        static_to_key = {static: key for key, static in table.items()}
    else:  # a fresh process wrote this one; it left the names in inference.pdiparams.info
        static_to_key = {s: k.removeprefix("base_model.") for s, k in model.structured_names.items()}
    for static, value in model.params.items():
        key = static_to_key[static]
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, exported[key], rtol=2e-6, atol=2e-6, err_msg=f"{static} = {key}")
        assert model.vars[static].shape == value.shape


@pytest.mark.parametrize(
    ("name", "export"),
    [(n, e) for n in MODELS for e in EXPORTS] + [(REC, "inference_unfused"), (REC, "inference_paddle30")],
)
def test_structured_state(name, export):
    folder = FIXTURES / name / export
    model = load_inference_model(folder)
    state = model.structured_state()
    train = load_pdparams(pdparams(name))
    if name == REC and export != "inference_unfused":
        expected = {k for k in train if ".dw_conv_list." not in k and not k.startswith("head.")}
        reference = fuse_rep_blocks(train)
    elif name == REC:
        rep = {k.split("dw_conv_list.")[0] for k in train if ".dw_conv_list." in k}
        expected = {
            k for k in train if not k.startswith("head.") and not any(k.startswith(p + "dw_conv.") for p in rep)
        }
        reference = train
    else:
        expected = {k for k in train if not k.startswith("head.")}
        reference = train
    assert set(state) == expected
    for key, value in state.items():
        np.testing.assert_allclose(value, reference[key], rtol=2e-6, atol=2e-6, err_msg=key)
    if model.structured_names:  # legacy exports also carry Paddle's own names: the two must agree
        info = {k.removeprefix("base_model."): s for s, k in model.structured_names.items() if s in model.params}
        assert structured_names(model) == info


def test_legacy_and_pir_programs_agree():
    for name in MODELS:
        pir = load_inference_model(FIXTURES / name / "inference")
        legacy = load_inference_model(FIXTURES / name / "inference_legacy")
        kinds = [op_kind(op) for op in pir.ops if op_kind(op) not in ("data", "full", "full_int_array", "combine")]
        legacy_kinds = [op_kind(op) for op in legacy.ops if op_kind(op) not in ("feed", "fill_constant")]
        # same compute ops in the same order, up to how shapes are built
        compute = {"conv2d", "depthwise_conv2d", "batch_norm", "layer_norm", "matmul", "gelu", "softmax", "dropout"}
        assert [k for k in kinds if k in compute] == [k for k in legacy_kinds if k in compute]
        for info in legacy.vars.values():
            assert isinstance(info, VarInfo) and info.dtype == "float32"
        a, b = pir.structured_state(), legacy.structured_state()
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_rec_program_contents():
    """What PaddleClas' export of PP-ShiTuV2_rec leaves in the program (documented in the report)."""
    for export, dropout_p in (("inference", "p"), ("inference_legacy", None)):
        model = load_inference_model(FIXTURES / REC / export)
        kinds = [op_kind(op) for op in model.ops]
        # BatchNorm is kept as ops, not folded: stem 1+2, stages 0/1 4×2, stage 2 6×2 (pw_conv_1/2),
        # stage 3 2×1 (the fused dw convs have a bias instead), BNNeck 1
        assert kinds.count("batch_norm") == 3 + 8 + 12 + 2 + 1
        assert "scale" not in kinds  # the eval-time ×0.8 is *not* a scale op ...
        (dropout,) = [op for op in model.ops if op_kind(op) == "dropout"]  # ... but a dropout op in test mode
        assert dropout.attrs["is_test"] is True
        mode = dropout.attrs.get("mode", dropout.attrs.get("dropout_implementation"))
        assert mode == "downgrade_in_infer"
        if dropout_p is None:
            assert dropout.attrs["dropout_prob"] == pytest.approx(0.2)
        else:  # PIR: p is an input produced by a `full` op
            (p_value,) = dropout.inputs["p"]
            (full,) = [op for op in model.ops if op.outputs.get("out") == [p_value]]
            assert full.attrs["value"] == pytest.approx(0.2)
        assert model.feed_names == ["x"] and len(model.fetch_names) == 1
        first_conv = next(op for op in model.ops if op_kind(op) == "conv2d")
        (flt,) = [n for slot, n in first_conv.inputs.items() if slot.lower() == "filter"]
        assert model.params[flt[0]].shape == (8, 3, 3, 3)
        assert first_conv.attrs["strides"] == [2, 2] and first_conv.attrs["paddings"] == [1, 1]


def test_vit_program_contents():
    for name in (VIT_BASE, VIT_LARGE):
        for export in EXPORTS:
            model = load_inference_model(FIXTURES / name / export)
            gelus = [op for op in model.ops if op_kind(op) == "gelu"]
            assert len(gelus) == 2 and all(op.attrs["approximate"] is False for op in gelus)  # exact erf GELU
            norms = [op for op in model.ops if op_kind(op) == "layer_norm"]
            assert len(norms) == 2 * 2 + 2 and all(op.attrs["epsilon"] == pytest.approx(1e-5) for op in norms)
            assert sum(op_kind(op) == "scale" for op in model.ops) == 2  # attention's head_dim ** -0.5


def test_load_paths_and_pairing(tmp_path):
    folder = FIXTURES / REC / "inference"
    by_folder = load_inference_model(folder)
    for path in (folder / "inference.json", folder / "inference.pdiparams"):
        again = load_inference_model(path)
        assert again.params.keys() == by_folder.params.keys()
    # a folder with both formats: the PIR program wins (as in PaddleX 3)
    both = tmp_path / "both"
    both.mkdir()
    for f in [*(FIXTURES / REC / "inference").iterdir(), FIXTURES / REC / "inference_legacy" / "inference.pdmodel"]:
        (both / f.name).write_bytes(f.read_bytes())
    assert load_inference_model(both).format == "pir"
    # a parameters file from another model does not fit the program
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "inference.json").write_bytes((folder / "inference.json").read_bytes())
    (wrong / "inference.pdiparams").write_bytes(
        (FIXTURES / VIT_BASE / "inference" / "inference.pdiparams").read_bytes()
    )
    with pytest.raises(ShituError, match=r"inference\.pdiparams"):
        load_inference_model(wrong)
    with pytest.raises(ShituError, match="no inference model here"):
        load_inference_model(tmp_path)
    with pytest.raises(ShituError, match="not found"):
        load_inference_model(tmp_path / "nope")


def test_paddle30_export_keeps_unused_parameters():
    """Paddle 3.0 (PIR version 1, what PaddleX 3.0 exported with) also saves the parameters the fused program
    never reads: the stale dw_conv_list branches. They are read (the file order needs them) but not named."""
    model = load_inference_model(FIXTURES / REC / "inference_paddle30")
    newer = load_inference_model(FIXTURES / REC / "inference")
    assert model.format == "pir" and model.version == 1 and newer.version == 4
    unused = set(model.params) - used_parameters(model)
    train = load_pdparams(pdparams(REC))
    branch_values = sum(v.size for k, v in train.items() if ".dw_conv_list." in k)
    assert unused and sum(model.params[n].size for n in unused) == branch_values
    assert model.structured_state().keys() == newer.structured_state().keys()


def test_pdiparams_order_is_sorted_names():
    """Reading the tensors in program order instead of name order fails the shape check."""
    model = load_inference_model(FIXTURES / REC / "inference")
    file = FIXTURES / REC / "inference" / "inference.pdiparams"
    program_order = []
    for op in model.ops:
        for names in op.inputs.values():
            program_order += [n for n in names if n in model.params and n not in program_order]
    assert program_order != sorted(program_order)
    with pytest.raises(ShituError, match="but the program declares"):
        read_pdiparams(file, program_order, expected=model.vars)
    assert read_pdiparams(file, sorted(program_order), expected=model.vars).keys() == model.params.keys()


def _copy_export(tmp_path: Path, name: str, export: str) -> Path:
    target = tmp_path / export
    target.mkdir()
    for f in (FIXTURES / name / export).iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.2, 0.5, 0.99, 0.99999])
@pytest.mark.parametrize("export", EXPORTS)
def test_truncated_pdiparams(tmp_path, export, fraction):
    target = _copy_export(tmp_path, REC, export)
    file = target / "inference.pdiparams"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ShituError, match=r"inference\.pdiparams") as info:
        load_inference_model(target)
    assert "truncated" in str(info.value) or "tensors" in str(info.value)


def test_extra_bytes_and_corrupt_header_in_pdiparams(tmp_path):
    target = _copy_export(tmp_path, VIT_BASE, "inference")
    file = target / "inference.pdiparams"
    data = file.read_bytes()
    file.write_bytes(data + b"\0")
    with pytest.raises(ShituError, match="more than the"):
        load_inference_model(target)
    file.write_bytes(struct.pack("<I", 7) + data[4:])  # bad stream version
    with pytest.raises(ShituError, match="version 7"):
        load_inference_model(target)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.95])
@pytest.mark.parametrize("export", EXPORTS)
def test_truncated_program(tmp_path, export, fraction):
    target = _copy_export(tmp_path, REC, export)
    program = target / ("inference.json" if export == "inference" else "inference.pdmodel")
    data = program.read_bytes()
    program.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ShituError) as info:
        load_inference_model(target)
    assert "inference." in str(info.value)


def test_garbage_programs(tmp_path):
    target = _copy_export(tmp_path, REC, "inference_legacy")
    (target / "inference.pdmodel").write_bytes(np.random.default_rng(1).bytes(2048))
    with pytest.raises(ShituError, match=r"inference\.pdmodel"):
        load_inference_model(target)
    target = _copy_export(tmp_path, REC, "inference")
    (target / "inference.json").write_text('{"base_code": {"magic": "pir"}, "program": {"regions": [{}]}}')
    with pytest.raises(ShituError, match=r"inference\.json"):
        load_inference_model(target)
    (target / "inference.json").write_text('{"base_code": {"magic": "onnx"}}')
    with pytest.raises(ShituError, match="not a PIR program"):
        load_inference_model(target)


# ------------------------------------------------------------------------- the fixtures through the JAX models


def test_fixture_features_are_consistent():
    for name in MODELS:
        feats = np.load(FIXTURES / name / "features.npy")
        inputs = np.load(FIXTURES / name / "inputs.npy")
        assert inputs.dtype == np.float32 and inputs.shape == tuple(MANIFEST["models"][name]["input_shape"])
        for other in sorted((FIXTURES / name).glob("features_inference*.npy")):
            np.testing.assert_allclose(np.load(other), feats, rtol=1e-4, atol=1e-3, err_msg=other.name)


@pytest.mark.parametrize("name", [VIT_BASE, VIT_LARGE])
def test_jax_vit_reproduces_paddle_features(name):
    pytest.importorskip("flax")
    from flax import nnx

    from shitu.models import vit

    arch = MANIFEST["models"][name]["arch"]
    build = vit.build_clip_vit_base if name == VIT_BASE else vit.build_clip_vit_large
    model = build(
        10,
        rngs=nnx.Rngs(0),
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        patch_size=arch["patch_size"],
        img_size=arch["input_size"],
        output_dim=arch["output_dim"],
        embedding_size=arch["embedding_size"],
    )
    x = np.load(FIXTURES / name / "inputs.npy").transpose(0, 2, 3, 1)
    expected = np.load(FIXTURES / name / "features.npy")
    for state in (
        load_pdparams(pdparams(name)),
        load_inference_model(FIXTURES / name / "inference").structured_state(),
    ):
        report = vit.import_paddle_state(model, state)
        assert not report.skipped and not report.unused
        model.eval()
        np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-4, atol=1e-5)


def test_jax_pplcnetv2_reproduces_paddle_features():
    pytest.importorskip("flax")
    from flax import nnx

    from shitu.models import pplcnetv2

    arch = MANIFEST["models"][REC]["arch"]
    x = np.load(FIXTURES / REC / "inputs.npy").transpose(0, 2, 3, 1)
    expected = np.load(FIXTURES / REC / "features.npy")
    scale = float(np.abs(expected).max())
    train = load_pdparams(pdparams(REC))
    model = pplcnetv2.build_pp_shituv2_rec(
        10, rngs=nnx.Rngs(0), scale=arch["scale"], embedding_size=arch["class_expand"]
    )
    pplcnetv2.import_paddle_state(model, train)
    model.eval()
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-4, atol=1e-5 * scale)
    # the exported (re-parameterized) program; it has no training head, so lend it the checkpoint's
    deploy = pplcnetv2.build_pp_shituv2_rec(
        10, rngs=nnx.Rngs(0), scale=arch["scale"], embedding_size=arch["class_expand"], deploy=True
    )
    state = load_inference_model(FIXTURES / REC / "inference").structured_state()
    pplcnetv2.import_paddle_state(deploy, {**state, "head.fc.weight": train["head.fc.weight"]})
    deploy.eval()
    np.testing.assert_allclose(np.asarray(deploy(x)), expected, rtol=1e-4, atol=1e-5 * scale)


# ------------------------------------------------------------------ full-size artifacts (nox -s slow, optional)

FULL = Path(__file__).resolve().parents[1] / ".work" / "parity"


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_full_size_artifacts(name):
    """The full-size models written by `paddle_reference.py --out .work/parity` (not committed): both exports
    name every parameter, and the JAX model fed from the exported program reproduces Paddle's features."""
    folder = FULL / name
    if not (folder / "inference").is_dir():
        pytest.skip(f"no full-size artifacts in {folder} (run tests/parity/paddle_reference.py)")
    pytest.importorskip("flax")
    from flax import nnx

    from shitu.models import pplcnetv2, vit

    fused = folder / f"{name}_fused.pdparams"
    reference = load_pdparams(fused if fused.is_file() else folder / f"{name}.pdparams")
    x = np.load(folder / "inputs.npy").transpose(0, 2, 3, 1)
    expected = np.load(folder / "features.npy")
    for export in ("inference", "inference_legacy"):
        if not (folder / export).is_dir():
            continue
        state = load_inference_model(folder / export).structured_state()
        for key, value in state.items():
            np.testing.assert_array_equal(value, reference[key], err_msg=key)
    state = load_inference_model(folder / "inference").structured_state()
    head = {k: v for k, v in reference.items() if k.startswith("head.")}
    if name == REC:
        model = pplcnetv2.build_pp_shituv2_rec(10, rngs=nnx.Rngs(0), deploy=True)
        pplcnetv2.import_paddle_state(model, {**state, **head})
    else:
        build = vit.build_clip_vit_base if name == VIT_BASE else vit.build_clip_vit_large
        model = build(10, rngs=nnx.Rngs(0))
        vit.import_paddle_state(model, state)
    model.eval()
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-3, atol=1e-4 * scale)
