"""Produce Paddle reference artifacts for the weight importers and the parity tests.

Run it with the *separate* Paddle environment (never the main one)::

    .venv-paddle/bin/python tests/parity/paddle_reference.py --out .work/parity
    .venv-paddle/bin/python tests/parity/paddle_reference.py --out tests/fixtures/paddle --tiny

For each model it builds PaddleClas' own ``RecModel`` from an ``Arch`` config written from
reference/ppshitu_spec.md (§1, §2, §7), randomises every parameter and BatchNorm running statistic,
and writes into ``OUT/<name>/``:

- ``<name>.pdparams``: ``paddle.save(model.state_dict())`` (train form, with the training head);
- ``<name>_fused.pdparams`` (PP-ShiTuV2_rec only; not kept with ``--tiny``): the state after
  ``RepDepthwiseSeparable.re_parameterize()`` (what PaddleClas' export does); ``features_fused.npy``: the
  forward of that fused model;
- ``<name>.npz`` (``--npz``, on by default with ``--tiny``): the same train-form state as plain numpy arrays;
- ``inference/inference.{json,pdiparams}``: ``paddle.jit.save`` of PaddleClas' ExportModel (head replaced by
  IdentityHead, output ``features``), PIR format (Paddle 3 default);
- ``inference_legacy/inference.{pdmodel,pdiparams,pdiparams.info}``: the same export with
  ``FLAGS_enable_pir_api=0`` in a child process (the flag must be set before Paddle starts) running an older
  Paddle (``--legacy-paddle``, default ``.venv-paddle/paddle300``): Paddle 3.3 can no longer build
  ``sigmoid``/``matmul`` in the legacy IR;
- ``inference_unfused/`` (PP-ShiTuV2_rec only): the PIR export of the train form, before re-parameterization;
- ``inference_paddle30/`` (PP-ShiTuV2_rec only): the PIR export by that older Paddle (3.0, PIR version 1), which
  also saves the parameters the program does not use (the fused model's ``dw_conv_list`` branches);
- ``inputs.npy`` (float32 NCHW, eval preprocessing of spec §4/§8) and ``features.npy`` (``out["features"]``);
- ``features_inference*.npy``: what Paddle Inference computes from the exported files.

A ``manifest.json`` at ``OUT/`` records versions, architectures, files, image paths, shapes and checks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import cv2
import numpy as np

PHOTOS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "grocery" / "photos"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
NUM_CLASSES = 10
DEFAULT_LEGACY_PADDLE = Path(__file__).resolve().parents[2] / ".venv-paddle" / "paddle300"

# ---------------------------------------------------------------------------------------------------------------------
# Architectures. "tiny" variants keep every structural feature of the real ones (PPLCNetV2: non-rep blocks, rep blocks
# with 2 and 3 branches, SE, split_pw, shortcut, the ShiTu upgrades, BNNeck, dropout; ViT: cls token, ln_pre, fused qkv,
# remove_cls_token_in_forward for base, proj, mean over tokens) but with few channels and a small input.
# ---------------------------------------------------------------------------------------------------------------------

MODELS = {
    "PP-ShiTuV2_rec": {
        "family": "pplcnetv2",
        "full": {"scale": 1.0, "depths": [2, 2, 6, 2], "class_expand": 512, "input_size": 224},
        "tiny": {"scale": 0.0625, "depths": [2, 2, 6, 2], "class_expand": 16, "input_size": 40},
    },
    "PP-ShiTuV2_rec_CLIP_vit_base": {
        "family": "clip_vit",
        "backbone": "CLIP_vit_base_patch16_224",
        "full": {
            "embed_dim": 768,
            "depth": 12,
            "num_heads": 12,
            "patch_size": 16,
            "output_dim": 512,
            "embedding_size": 512,
            "input_size": 224,
        },
        "tiny": {
            "embed_dim": 16,
            "depth": 2,
            "num_heads": 2,
            "patch_size": 16,
            "output_dim": 16,
            "embedding_size": 16,
            "input_size": 48,
        },
    },
    "PP-ShiTuV2_rec_CLIP_vit_large": {
        "family": "clip_vit",
        "backbone": "CLIP_vit_large_patch14_224",
        "full": {
            "embed_dim": 1024,
            "depth": 24,
            "num_heads": 16,
            "patch_size": 14,
            "output_dim": 512,
            "embedding_size": 512,
            "input_size": 224,
        },
        "tiny": {
            "embed_dim": 16,
            "depth": 2,
            "num_heads": 2,
            "patch_size": 14,
            "output_dim": 16,
            "embedding_size": 16,
            "input_size": 42,
        },
    },
}


def arch_config(name: str, tiny: bool) -> dict:
    """The PaddleClas ``Arch`` section (as in GeneralRecognitionV2_*.yaml, pretrained off, class_num small)."""
    info = MODELS[name]
    arch = info["tiny" if tiny else "full"]
    if info["family"] == "pplcnetv2":
        feat = arch["class_expand"]
        return {
            "name": "RecModel",
            "infer_output_key": "features",
            "infer_add_softmax": False,
            "Backbone": {
                "name": "PPLCNetV2_base_ShiTu" + ("_tiny" if tiny else ""),
                "pretrained": False,
                "class_expand": feat,
            },
            "BackboneStopLayer": {"name": "flatten"},
            "Neck": {
                "name": "BNNeck",
                "num_features": feat,
                "weight_attr": {"initializer": {"name": "Constant", "value": 1.0}},
                "bias_attr": {"initializer": {"name": "Constant", "value": 0.0}, "learning_rate": 1.0e-20},
            },
            "Head": {
                "name": "FC",
                "embedding_size": feat,
                "class_num": NUM_CLASSES,
                "weight_attr": {"initializer": {"name": "Normal", "std": 0.001}},
                "bias_attr": False,
            },
        }
    backbone = {"name": info["backbone"], "pretrained": False, "return_embed": True, "return_mean_embed": True}
    if tiny:
        backbone["name"] = info["backbone"] + "_tiny"
    emb = arch["embedding_size"]
    return {
        "name": "RecModel",
        "infer_output_key": "features",
        "infer_add_softmax": False,
        "Backbone": backbone,
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "FC", "embedding_size": arch["output_dim"], "class_num": emb},
        "Head": {"name": "ArcMargin", "embedding_size": emb, "class_num": NUM_CLASSES, "margin": 0.2, "scale": 30},
    }


def install_tiny_builders() -> None:
    """Make the tiny variants reachable by name from ``RecModel`` (it ``eval``s the backbone name in
    ``paddleclas.ppcls.arch``) while reusing PaddleClas' own classes and the ShiTu upgrade code."""
    import paddleclas.ppcls.arch as arch_mod
    from paddleclas.ppcls.arch.backbone.legendary_models import pp_lcnet_v2
    from paddleclas.ppcls.arch.backbone.model_zoo import foundation_vit
    from paddleclas.ppcls.arch.backbone.variant_models import pp_lcnetv2_variant

    tiny_lcnet = MODELS["PP-ShiTuV2_rec"]["tiny"]

    def tiny_base(pretrained=False, use_ssld=False, **kwargs):
        return pp_lcnet_v2.PPLCNetV2(scale=tiny_lcnet["scale"], depths=tiny_lcnet["depths"], dropout_prob=0.2, **kwargs)

    def tiny_shitu(**kwargs):
        # PPLCNetV2_base_ShiTu builds its base through this module-level name; swap it for the call only,
        # so the ShiTu upgrades run unchanged on the small base (and full-size builds stay untouched).
        original = pp_lcnetv2_variant.PPLCNetV2_base
        pp_lcnetv2_variant.PPLCNetV2_base = tiny_base
        try:
            return pp_lcnetv2_variant.PPLCNetV2_base_ShiTu(**kwargs)
        finally:
            pp_lcnetv2_variant.PPLCNetV2_base = original

    arch_mod.PPLCNetV2_base_ShiTu_tiny = tiny_shitu

    for name in ("PP-ShiTuV2_rec_CLIP_vit_base", "PP-ShiTuV2_rec_CLIP_vit_large"):
        info = MODELS[name]
        cfg = info["tiny"]

        def make(pretrained=False, use_ssld=False, _model_name=info["backbone"], _cfg=cfg, **kwargs):
            return foundation_vit.VisionTransformer(
                model_name=_model_name,  # selects the CLIP "diff" table, e.g. remove_cls_token_in_forward (base)
                img_size=_cfg["input_size"],
                patch_size=_cfg["patch_size"],
                embed_dim=_cfg["embed_dim"],
                depth=_cfg["depth"],
                num_heads=_cfg["num_heads"],
                output_dim=_cfg["output_dim"],
                mlp_ratio=4,
                qkv_bias=True,
                epsilon=1e-5,
                **kwargs,
            )

        setattr(arch_mod, info["backbone"] + "_tiny", make)


def set_vit_globals(name: str) -> None:
    """foundation_vit keeps the model variant in *module globals* (``_model_size``/``_model_diff``) that
    ``forward`` reads at call time: building another CLIP model changes the behaviour of the first one.
    Re-assert the right values before every forward/export (models are processed one after another anyway)."""
    info = MODELS[name]
    if info["family"] != "clip_vit":
        return
    from paddleclas.ppcls.arch.backbone.model_zoo import foundation_vit

    foundation_vit._model_size = "_".join(info["backbone"].split("_")[1:])
    foundation_vit._model_diff = foundation_vit._CLIP_diff


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def select_photos(n: int, seed: int) -> list[Path]:
    photos = sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(photos), size=n, replace=False)
    return [photos[i] for i in sorted(picks)]


def preprocess(path: Path, size: int) -> np.ndarray:
    """Eval transforms (spec §4/§8): cv2 decode → RGB → cv2.resize(size×size, INTER_LINEAR) →
    (x/255 − mean)/std → CHW."""
    data = np.frombuffer(path.read_bytes(), np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    x = (img.astype(np.float32) * np.float32(1.0 / 255.0) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Model building and randomisation
# ---------------------------------------------------------------------------------------------------------------------


def build(name: str, tiny: bool):
    from paddleclas.ppcls.arch import build_model

    set_vit_globals(name)
    model = build_model({"Arch": arch_config(name, tiny)})
    set_vit_globals(name)
    return model


def randomise(model, calibration: np.ndarray, seed: int) -> None:
    """Every parameter gets noise on top of PaddleClas' init (constant-initialised ones, e.g. BN gamma/beta,
    biases, get N(0, 0.1) noise); BatchNorm running stats are calibrated to the batch statistics of
    ``calibration`` images (one train-mode pass with momentum 0; enough images that the BNNeck's per-sample
    statistics are not degenerate) and then perturbed (mean shift, positive log-normal variance)."""
    import paddle

    rng = np.random.default_rng(seed)
    bn_layers = [m for m in model.sublayers() if isinstance(m, paddle.nn.layer.norm._BatchNormBase)]
    for _, p in sorted(model.named_parameters()):
        value = p.numpy()
        std = float(value.std())
        noise = rng.normal(0.0, 0.1 if std < 1e-8 else 0.5 * std, value.shape)
        p.set_value((value + noise).astype(value.dtype))
    if bn_layers:
        saved = [m._momentum for m in bn_layers]
        for m in bn_layers:
            m._momentum = 0.0
        model.train()
        with paddle.no_grad():
            model.neck(model.backbone(paddle.to_tensor(calibration)))  # backbone BNs and the BNNeck
        for m, mom in zip(bn_layers, saved, strict=True):
            m._momentum = mom
            mean = m._mean.numpy()
            var = m._variance.numpy()
            dtype = mean.dtype  # float32, or float64 under paddle.set_default_dtype("float64")
            mean = mean + rng.normal(0.0, 0.2, mean.shape) * np.sqrt(var + 1e-5)
            var = np.maximum(var, 1e-3) * np.exp(rng.normal(0.0, 0.2, var.shape))
            m._mean.set_value(mean.astype(dtype))
            m._variance.set_value(var.astype(dtype))
    model.eval()


def state_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def forward_features(name: str, model, inputs: np.ndarray) -> np.ndarray:
    import paddle

    set_vit_globals(name)
    model.eval()
    with paddle.no_grad():
        out = model(paddle.to_tensor(inputs))
    return out["features"].numpy()


def re_parameterize(model) -> int:
    """What PaddleClas' Engine.export does before to_static."""
    count = 0
    for layer in model.sublayers():
        if hasattr(layer, "re_parameterize") and not getattr(layer, "is_repped", False):
            layer.re_parameterize()
            count += int(getattr(layer, "is_repped", False))
    return count


def export(name: str, model, arch: dict, input_size: int, dest: Path) -> None:
    """PaddleClas' export: ExportModel (head → IdentityHead, output ``features``) + to_static + jit.save."""
    import paddle
    from paddleclas.ppcls.arch.gears.identity_head import IdentityHead

    class ExportModel(paddle.nn.Layer):
        def __init__(self, base_model):
            super().__init__()
            self.base_model = base_model
            self.infer_output_key = arch.get("infer_output_key")
            if self.infer_output_key == "features":
                self.base_model.head = IdentityHead()

        def eval(self):
            self.training = False
            for layer in self.sublayers():
                layer.training = False
                layer.eval()

        def forward(self, x):
            x = self.base_model(x)
            if isinstance(x, list):
                x = x[0]
            if self.infer_output_key is not None:
                x = x[self.infer_output_key]
            return x

    set_vit_globals(name)
    head = model.head
    wrapped = ExportModel(model)
    wrapped.eval()
    static = paddle.jit.to_static(
        wrapped, input_spec=[paddle.static.InputSpec(shape=[None, 3, input_size, input_size], dtype="float32")]
    )
    dest.mkdir(parents=True, exist_ok=True)
    paddle.jit.save(static, str(dest / "inference"))
    model.head = head


def run_inference(model_file: Path, params_file: Path, inputs: np.ndarray) -> np.ndarray:
    from paddle import inference

    config = inference.Config(str(model_file), str(params_file))
    config.disable_gpu()
    config.set_cpu_math_library_num_threads(2)
    predictor = inference.create_predictor(config)
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(list(inputs.shape))
    handle.copy_from_cpu(inputs)
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------


def file_info(path: Path, root: Path) -> dict:
    data = path.read_bytes()
    return {"path": str(path.relative_to(root)), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def legacy_child(args: argparse.Namespace) -> None:
    """Child process (FLAGS_enable_pir_api=0): rebuild, load the exported state, write the legacy program."""
    import paddle

    install_tiny_builders()
    name = args.legacy_child
    model = build(name, args.tiny)
    re_parameterize(model)
    state = paddle.load(str(args.state))
    missing, unexpected = model.set_state_dict(state)
    assert not missing and not unexpected, (missing, unexpected)
    model.eval()
    size = MODELS[name]["tiny" if args.tiny else "full"]["input_size"]
    export(name, model, arch_config(name, args.tiny), size, Path(args.dest))


def process(name: str, args: argparse.Namespace, root: Path, photos: list[Path], calib: list[Path]) -> dict:
    import paddle

    tiny = args.tiny
    arch = MODELS[name]["tiny" if tiny else "full"]
    size = arch["input_size"]
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    print(f"== {name} ({'tiny' if tiny else 'full'}, {size}px)", flush=True)

    inputs = np.stack([preprocess(p, size) for p in photos])
    np.save(out / "inputs.npy", inputs)

    paddle.seed(args.seed)
    model = build(name, tiny)
    randomise(model, np.stack([preprocess(p, size) for p in calib]), args.seed)
    record: dict = {
        "arch_config": arch_config(name, tiny),
        "arch": arch,
        "num_classes": NUM_CLASSES,
        "input_shape": list(inputs.shape),
    }

    state = model.state_dict()
    paddle.save(state, str(out / f"{name}.pdparams"))
    record["structured_to_parameter_name"] = {k: v.name for k, v in state.items()}
    record["num_keys"] = len(state)
    record["num_values"] = int(sum(int(np.prod(v.shape)) for v in state.values()))
    if args.npz:
        np.savez(out / f"{name}.npz", **state_numpy(model))

    feats = forward_features(name, model, inputs)
    np.save(out / "features.npy", feats)
    record["features_shape"] = list(feats.shape)
    record["features_norm"] = [float(x) for x in np.linalg.norm(feats, axis=1)]
    export_state_file = out / f"{name}.pdparams"

    if MODELS[name]["family"] == "pplcnetv2":
        # The train form exported as is (branches not fused): what an export without re_parameterize() gives.
        export(name, model, record["arch_config"], size, out / "inference_unfused")
        unfused = out / "inference_unfused"
        inf = run_inference(unfused / "inference.json", unfused / "inference.pdiparams", inputs)
        record["unfused_inference_vs_dygraph_max_abs_diff"] = float(np.abs(inf - feats).max())
        record["re_parameterized_blocks"] = re_parameterize(model)
        fused_state = model.state_dict()
        export_state_file = out / f"{name}_fused.pdparams"
        paddle.save(fused_state, str(export_state_file))
        fused = forward_features(name, model, inputs)
        np.save(out / "features_fused.npy", fused)
        record["fused_vs_train_max_abs_diff"] = float(np.abs(fused - feats).max())

    export(name, model, record["arch_config"], size, out / "inference")
    inf = run_inference(out / "inference" / "inference.json", out / "inference" / "inference.pdiparams", inputs)
    np.save(out / "features_inference.npy", inf)
    record["inference_vs_dygraph_max_abs_diff"] = float(np.abs(inf - feats).max())

    # Exports by the older Paddle in a child process: the legacy program (PIR API off), and for
    # PP-ShiTuV2_rec also Paddle 3.0's PIR program, which keeps the unused dw_conv_list parameters.
    children = [("inference_legacy", "0", "inference.pdmodel")] if args.legacy else []
    if args.legacy_paddle and MODELS[name]["family"] == "pplcnetv2":
        children.append(("inference_paddle30", "1", "inference.json"))
    for sub, pir_flag, program in children:
        env = dict(os.environ, FLAGS_enable_pir_api=pir_flag)
        if args.legacy_paddle:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.legacy_paddle), env.get("PYTHONPATH")]))
        cmd = [sys.executable, __file__, "--legacy-child", name, "--state", str(export_state_file)]
        cmd += ["--dest", str(out / sub), "--out", str(root)]
        if tiny:
            cmd.append("--tiny")
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        key = sub.removeprefix("inference_")
        if result.returncode == 0 and (out / sub / program).exists():
            child = run_inference(out / sub / program, out / sub / "inference.pdiparams", inputs)
            np.save(out / f"features_{sub}.npy", child)
            record[f"{key}_inference_vs_dygraph_max_abs_diff"] = float(np.abs(child - feats).max())
        else:
            record[f"{key}_export_error"] = (result.stdout + result.stderr)[-4000:]
            print(record[f"{key}_export_error"], file=sys.stderr)
    if not args.fused_pdparams and export_state_file.name.endswith("_fused.pdparams"):
        export_state_file.unlink()  # tiny fixtures: the inference files hold the fused values already
    record["files"] = [file_info(p, root) for p in sorted(out.rglob("*")) if p.is_file()]
    record["total_bytes"] = sum(f["bytes"] for f in record["files"])
    del model
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tiny", action="store_true", help="small variants for committed fixtures")
    parser.add_argument("--num-images", type=int, default=None, help="default 8 (full) / 2 (tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-images", type=int, default=16, help="images for the BN statistics")
    parser.add_argument("--npz", action=argparse.BooleanOptionalAction, default=None, help="default: on with --tiny")
    parser.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--fused-pdparams",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep <name>_fused.pdparams (default: on, off with --tiny)",
    )
    parser.add_argument(
        "--legacy-paddle",
        type=Path,
        default=DEFAULT_LEGACY_PADDLE if DEFAULT_LEGACY_PADDLE.is_dir() else None,
        help="a `pip install --target` folder with an older Paddle for the legacy export (Paddle 3.3 can no longer "
        "build sigmoid/matmul in the legacy IR); default: .venv-paddle/paddle300 when present",
    )
    parser.add_argument("--legacy-child", help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.legacy_child:
        legacy_child(args)
        return

    import paddle
    import paddleclas

    paddle.set_device("cpu")
    install_tiny_builders()
    if args.npz is None:
        args.npz = args.tiny
    if args.fused_pdparams is None:
        args.fused_pdparams = not args.tiny
    n = args.num_images or (2 if args.tiny else 8)
    photos = select_photos(n, args.seed)
    calib = select_photos(args.calibration_images, args.seed + 1)
    root = args.out.resolve()
    root.mkdir(parents=True, exist_ok=True)

    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update(
        {
            "generator": "tests/parity/paddle_reference.py",
            "argv": sys.argv[1:],
            "paddle": paddle.__version__,
            "paddle_commit": getattr(paddle.version, "commit", None),
            "paddleclas": getattr(paddleclas, "__version__", None) or _dist_version("paddleclas"),
            "numpy": np.__version__,
            "opencv": cv2.__version__,
            "python": sys.version.split()[0],
            "tiny": args.tiny,
            "seed": args.seed,
            "images": [str(p.relative_to(PHOTOS.parent)) for p in photos],
            "calibration_images": [str(p.relative_to(PHOTOS.parent)) for p in calib],
            "preprocess": "cv2.imdecode → RGB → cv2.resize(S×S, INTER_LINEAR) → (x/255 − mean)/std → CHW float32",
            "mean": MEAN.tolist(),
            "std": STD.tolist(),
        }
    )
    models = manifest.setdefault("models", {})
    for name in args.models:
        models[name] = process(name, args, root, photos, calib)
        manifest_path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: v.get("total_bytes") for k, v in models.items()}, indent=1))


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
