"""Train PaddleClas' own model for a few steps on fixed batches: the reference for tests/parity/test_train_parity.py.

Run it with the *separate* Paddle environment (never the main one)::

    .venv-paddle/bin/python tests/parity/paddle_train_reference.py --settings settings.json \
        --batches batches.npz --paddleclas-src .work/paddleclas_src --out OUT

``settings.json`` names the model (``PP-ShiTuV2_rec`` or ``PP-ShiTuV2_rec_CLIP_vit_base``) and the run:
``input_size``, ``num_classes``, ``learning_rate``, ``epochs``, ``steps_per_epoch``, ``warmup_epoch``,
``weight_decay`` (the L2 coefficient), ``seed``, ``snapshot_steps``, ``dtype`` ("float32" or "float64"),
``randomise`` (noise on PaddleClas' initialisation as ``paddle_reference.py`` adds it; default off) and,
for the ViT, ``vit`` (``embed_dim``, ``depth``, ``num_heads``, ``patch_size``, ``output_dim``, ``embedding_size``).
``batches.npz`` holds ``images`` [steps, B, 3, S, S] (already normalised) and ``labels`` [steps, B].

What runs is PaddleClas' training step as ``ppcls/engine/train/train.py`` does it, in dygraph, AMP off:
``RecModel`` from the recipe's ``Arch`` (built by ``paddle_reference.py``'s code), the recipe's ``Loss.Train``
summed like ``CombinedLoss`` (PaddleClas' own ``CELoss`` / ``TripletAngularMarginLoss`` files), and the
``Optimizer`` section built like ``build_optimizer`` (PaddleClas' ``Cosine`` schedule and ``Momentum`` wrapper,
``L2Decay(coeff)`` as weight decay); per step: forward with labels ``[B, 1]``, ``loss.backward()``,
``optimizer.step()``, ``clear_grad()``, ``lr.step()``. The backbone's dropout is set to p = 0 (the only random
operation of either recipe: its masks cannot be shared with another framework). With ``dtype`` float64 the
model, the batches and the whole step run in float64 (``paddle.set_default_dtype``); the starting state is
then rounded to float32 values, so that the float32 ``.pdparams`` importers of other frameworks
start from exactly the same numbers.

Writes into OUT: ``initial.pdparams`` (the starting state, ``paddle.save`` of the state dict) and
``trajectory.npz``: ``losses`` [steps, terms] with ``loss_names``, ``lrs`` [steps] (the rate each step used),
and ``step{k}/{structured name}`` for every state entry (parameters and BatchNorm running statistics) after
each step k in ``snapshot_steps``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paddle_reference  # this folder's reference builder: the Arch sections, randomisation

PPLCNET = "PP-ShiTuV2_rec"
CLIP_BASE = "PP-ShiTuV2_rec_CLIP_vit_base"
SMALL_VIT_BUILDER = "CLIP_vit_base_patch16_224_train_parity"

#: ``Loss.Train`` of GeneralRecognitionV2_PPLCNetV2_base.yaml and GeneralRecognitionV2_CLIP_vit_base.yaml.
TRAIN_LOSS = {
    PPLCNET: [
        {"CELoss": {"weight": 1.0, "epsilon": 0.1}},
        {
            "TripletAngularMarginLoss": {
                "weight": 1.0,
                "feature_from": "features",
                "margin": 0.5,
                "reduction": "mean",
                "add_absolute": True,
                "absolute_loss_weight": 0.1,
                "normalize_feature": True,
                "ap_value": 0.8,
                "an_value": 0.4,
            }
        },
    ],
    CLIP_BASE: [{"CELoss": {"weight": 1.0}}],
}


def build_model(name: str, settings: dict):
    """PaddleClas' ``RecModel`` with the recipe's ``Arch`` (pretrained off, ``num_classes`` classes)."""
    from paddleclas.ppcls.arch import build_model as build_rec_model

    if name == PPLCNET:
        arch = paddle_reference.arch_config(name, tiny=False)
    else:
        register_small_vit(settings["input_size"], settings["vit"])
        arch = paddle_reference.arch_config(name, tiny=False)
        arch["Backbone"]["name"] = SMALL_VIT_BUILDER
        arch["Neck"].update(embedding_size=settings["vit"]["output_dim"], class_num=settings["vit"]["embedding_size"])
        arch["Head"]["embedding_size"] = settings["vit"]["embedding_size"]
    arch["Head"]["class_num"] = settings["num_classes"]
    paddle_reference.set_vit_globals(name)
    model = build_rec_model({"Arch": arch})
    paddle_reference.set_vit_globals(name)
    return model


def register_small_vit(img_size: int, vit: dict) -> None:
    """``CLIP_vit_base_patch16_224`` fixes ``img_size`` 224: register the same ``VisionTransformer`` (the CLIP
    base variant, so ``remove_cls_token_in_forward`` holds) at ``img_size`` under a name ``RecModel`` finds."""
    import paddleclas.ppcls.arch as arch_mod
    from paddleclas.ppcls.arch.backbone.model_zoo import foundation_vit

    def make(pretrained=False, use_ssld=False, **kwargs):
        return foundation_vit.VisionTransformer(
            model_name="CLIP_vit_base_patch16_224",
            img_size=img_size,
            patch_size=vit["patch_size"],
            embed_dim=vit["embed_dim"],
            depth=vit["depth"],
            num_heads=vit["num_heads"],
            output_dim=vit["output_dim"],
            mlp_ratio=4,
            qkv_bias=True,
            epsilon=1e-5,
            **kwargs,
        )

    setattr(arch_mod, SMALL_VIT_BUILDER, make)


def build_loss(name: str):
    """``ppcls.loss.CombinedLoss`` of the recipe's ``Loss.Train``: each term times its weight, ``loss`` their
    ``add_n`` (a single term is the loss itself). Written out because ``ppcls/loss/__init__.py`` imports every
    loss PaddleClas has."""
    import paddle
    from ppcls.loss.celoss import CELoss
    from ppcls.loss.tripletangularmarginloss import TripletAngularMarginLoss

    classes = {"CELoss": CELoss, "TripletAngularMarginLoss": TripletAngularMarginLoss}
    terms = []
    for item in TRAIN_LOSS[name]:
        (loss_name, params), *_ = item.items()
        params = dict(params)
        weight = params.pop("weight")
        terms.append((classes[loss_name](**params), weight))

    def combined(out, labels):
        if len(terms) == 1:
            loss = terms[0][0](out, labels)
            return {**loss, "loss": next(iter(loss.values()))}
        loss_dict = {}
        for func, weight in terms:
            loss_dict.update({key: value * weight for key, value in func(out, labels).items()})
        loss_dict["loss"] = paddle.add_n(list(loss_dict.values()))
        return loss_dict

    return combined


def build_optimizer(model, settings: dict):
    """``ppcls.optimizer.build_optimizer`` for ``{name: Momentum, momentum: 0.9, lr: {name: Cosine,
    learning_rate, warmup_epoch}, regularizer: {name: L2, coeff}}`` on ``[model]`` (scope "all"); returns the
    optimizer and the schedule."""
    import paddle
    from ppcls.optimizer.learning_rate import Cosine
    from ppcls.optimizer.optimizer import Momentum

    schedule = Cosine(
        epochs=settings["epochs"],
        step_each_epoch=settings["steps_per_epoch"],
        learning_rate=settings["learning_rate"],
        warmup_epoch=settings["warmup_epoch"],
    )()
    regularizer = paddle.regularizer.L2Decay(coeff=settings["weight_decay"])
    wrapper = Momentum(learning_rate=schedule, momentum=0.9, weight_decay=regularizer, grad_clip=None)
    if settings.get("dtype", "float32") == "float64":
        # The wrapper switches to Paddle's multi-tensor Momentum, which takes only fp32/fp16/bf16 parameters:
        # build the optimizer it builds first, the same update without the multi-tensor kernel.
        optimizer = paddle.optimizer.Momentum(
            learning_rate=schedule,
            momentum=wrapper.momentum,
            weight_decay=wrapper.weight_decay,
            grad_clip=wrapper.grad_clip,
            multi_precision=wrapper.multi_precision,
            use_nesterov=wrapper.use_nesterov,
            parameters=model.parameters(),
        )
    else:
        optimizer = wrapper([model])
    return optimizer, schedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", required=True, type=Path)
    parser.add_argument("--batches", required=True, type=Path)
    parser.add_argument("--paddleclas-src", required=True, type=Path, help="holds ppcls/loss and ppcls/optimizer")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    import paddleclas

    # The loss and optimizer files come without ppcls/{loss,optimizer}/__init__.py: ppcls is a namespace
    # package spread over them and the installed wheel (which has ppcls/arch and ppcls/utils).
    sys.path[:0] = [str(args.paddleclas_src.resolve()), os.path.dirname(paddleclas.__file__)]
    import paddle
    from ppcls.utils import logger

    logger.init_logger(log_level=40)
    paddle.set_device("cpu")
    settings = json.loads(args.settings.read_text())
    name = settings["model"]
    batches = np.load(args.batches)
    dtype = settings.get("dtype", "float32")
    images, labels = batches["images"].astype(dtype), batches["labels"].astype(np.int64)
    args.out.mkdir(parents=True, exist_ok=True)

    paddle.set_default_dtype(dtype)
    paddle.seed(settings["seed"])
    model = build_model(name, settings)
    if settings.get("randomise", False):
        paddle_reference.randomise(model, np.concatenate(list(images[:2])), settings["seed"])
    for value in model.state_dict().values():
        value.set_value(value.numpy().astype(np.float32).astype(value.numpy().dtype))
    if name == PPLCNET:
        model.backbone.dropout.p = 0.0
    paddle.save(model.state_dict(), str(args.out / "initial.pdparams"))

    loss_fn = build_loss(name)
    optimizer, schedule = build_optimizer(model, settings)
    snapshot_steps = set(settings["snapshot_steps"])
    losses, lrs, loss_names, snapshots = [], [], None, {}
    model.train()
    for step in range(len(images)):
        paddle_reference.set_vit_globals(name)
        x = paddle.to_tensor(images[step])
        y = paddle.to_tensor(labels[step]).reshape([len(labels[step]), -1])
        out = model(x, y)
        loss_dict = loss_fn(out, y)
        loss_dict["loss"].backward()
        lrs.append(float(optimizer.get_lr()))
        optimizer.step()
        optimizer.clear_grad()
        schedule.step()
        loss_names = loss_names or sorted(loss_dict)
        losses.append([float(loss_dict[k]) for k in loss_names])
        terms = ", ".join(f"{k} {v:.6f}" for k, v in zip(loss_names, losses[-1], strict=True))
        print(f"step {step + 1}: {terms}", flush=True)
        if step + 1 in snapshot_steps:
            snapshots.update({f"step{step + 1}/{k}": v.numpy() for k, v in model.state_dict().items()})
    np.savez(
        args.out / "trajectory.npz",
        losses=np.asarray(losses, np.float64),
        loss_names=np.asarray(loss_names),
        lrs=np.asarray(lrs, np.float64),
        **snapshots,
    )


if __name__ == "__main__":
    main()
