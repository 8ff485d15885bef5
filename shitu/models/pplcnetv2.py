"""PP-ShiTuV2_rec in Flax NNX: PaddleClas' ``PPLCNetV2_base_ShiTu`` backbone + BNNeck + FC head.

Follows reference/ppshitu_spec.md §1–§2 exactly; the module contract is :mod:`shitu.models.spec`'s.
Activations are NHWC float32; layouts and padding rules are those of :mod:`shitu.models.layers`.

Structure (attribute names are PaddleClas' structured names, so ``backbone.stages.2.0.se.conv1`` is
``model.backbone.stages[2][0].se.conv1``)::

    PPShiTuV2Rec
      backbone: PPLCNetV2ShiTu     stem[0] ConvBN 3→32 k3 s2, stem[1] RepDepthwiseSeparable 32→64 dw3,
                                   stages[0..3] (NET_CONFIG), global avg pool, last_conv 1024→512 (bias,
                                   no ReLU), dropout p=0.2 "downscale_in_infer", flatten → [B, 512]
      neck:     BNNeck             feat_bn: BatchNorm1D(512)                → features [B, 512]
      head:     FCHead             fc: Linear(512→num_classes, no bias)     → model.logits(features)

Forms of the model (all share the same eval-mode outputs up to float32 rounding):

- **training form** (default): each re-parameterisable block (stages 2 and 3) holds ``dw_conv_list``,
  one depthwise ConvBN per kernel size (5, 3, 1; no 1 when the stride is 2), summed then ReLU. Paddle's
  training-form blocks also hold a stale plain ``dw_conv`` (depthwise conv with bias, 113,152 parameters
  in all) that only its eval/export path uses; this port does **not** keep it (no dead parameters in
  the optimizer): training form = 4,621,824 trainable backbone parameters (Paddle's 4,734,976 minus
  those 113,152) + 1,024 BNNeck; the importer lists Paddle's stale ``dw_conv.*`` as ``unused``.
- **deploy form** (``deploy=True``, or :func:`fuse`): each such block holds one fused depthwise conv with
  bias, ``dw_conv`` (Paddle's re-parameterised ``dw_conv``): 4,557,312 backbone parameters.
- **export form** (``model.inference_form(export=True)``): the folded form below with each depthwise conv
  written as one grouped convolution and 1×1 convolutions kept as convolutions (what ONNX Runtime and
  OpenVINO have fused kernels for); used by :mod:`shitu.export`.
- **folded form** (:func:`fold_batchnorm`): the deploy form with every ConvBN's BatchNorm folded into its
  conv, and the eval-mode dropout scale (0.8) and the BNNeck folded into ``last_conv``. Inference only:
  no BatchNorm or dropout is left (``train()`` changes nothing), ``model.neck is None`` and the backbone
  output already is ``features``. It has no Paddle layout (import into an unfolded model, then fold).

Weights: :func:`import_paddle_state` loads a PaddleClas ``RecModel`` state dict (structured names, Paddle
layouts: conv OIHW, depthwise ``[C, 1, k, k]``, Linear ``[in, out]``, BN ``weight/bias/_mean/_variance``);
:func:`export_paddle_state` writes one; :func:`paddle_state_keys` / :func:`paddle_state_shapes` list what
a model needs.

Parity and speed (2-core AVX2 EPYC, shared, so ±30%): against PaddleClas 3.3.1/2.6.0 itself on random
weights and BN statistics, features agree to ~1e-6 relative in every form (``test_parity_with_paddleclas``,
slow, needs paddle). Eval at 224 px, jitted, best runs: training form 43 ms (batch 1) / 1.32 s (batch 32),
fused 37 ms / 1.19 s, folded 32 ms / 1.12 s (≈29 images/s); Paddle Inference + oneDNN on the same
machine, same moment: 34 ms / 1.02 s (≈31 images/s). The 1×1 convolutions (matmuls at this CPU's
~67 GFLOP/s) take about 70% of the time, the depthwise convolutions about 20%, the stem conv 5%.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shitu.errors import ShituError
from shitu.models.layers import (
    BN_EPSILON,
    Conv2d,
    ConvBN,
    DepthwiseConv2d,
    DownscaleInInferDropout,
    GlobalAvgPool,
    batch_norm,
    bn_fold_factors,
    kaiming_normal,
    normal,
    use_export_ops,
)
from shitu.models.spec import ImportReport

__all__ = [
    "NET_CONFIG",
    "BNNeck",
    "FCHead",
    "PPLCNetV2ShiTu",
    "PPShiTuV2Rec",
    "RepDepthwiseSeparable",
    "SEModule",
    "build_pp_shituv2_rec",
    "export_paddle_state",
    "fold_batchnorm",
    "fuse",
    "import_paddle_state",
    "make_divisible",
    "paddle_state_keys",
    "paddle_state_shapes",
]

#: PaddleClas NET_CONFIG: per stage (in_channels, kernel_size, split_pw, use_rep, use_se, use_shortcut).
NET_CONFIG: tuple[tuple[int, int, bool, bool, bool, bool], ...] = (
    (64, 3, False, False, False, False),
    (128, 3, False, False, False, False),
    (256, 5, True, True, True, False),
    (512, 5, False, True, False, True),
)
#: PPLCNetV2_base depths.
DEPTHS = (2, 2, 6, 2)

_STALE_KEY = "StructuredToParameterName@@"


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Paddle's ``make_divisible``: round to a multiple of ``divisor`` (at least ``min_value``), and add
    one ``divisor`` when rounding lost more than 10%."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


# ------------------------------------------------------------------------------------------------------ blocks


class SEModule(nnx.Module):
    """Squeeze-and-excitation: avg pool → 1×1 conv C→C/4 (bias) → ReLU → 1×1 conv C/4→C (bias) →
    **Sigmoid** (Paddle names it ``hardsigmoid`` but it is ``nn.Sigmoid``) → ``x * gate``."""

    def __init__(self, channels: int, reduction: int = 4, *, rngs: nnx.Rngs) -> None:
        self.conv1 = Conv2d(channels, channels // reduction, 1, use_bias=True, rngs=rngs)
        self.conv2 = Conv2d(channels // reduction, channels, 1, use_bias=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = jnp.mean(x, axis=(1, 2), keepdims=True)
        gate = jax.nn.relu(self.conv1(gate))
        gate = jax.nn.sigmoid(self.conv2(gate))
        return x * gate


class RepDepthwiseSeparable(nnx.Module):
    """Paddle's ``RepDepthwiseSeparable``: depthwise conv (re-parameterisable branches if ``use_rep``) →
    SE → pointwise conv(s) → ``+ x`` if the shortcut is in effect (``use_shortcut`` and stride 1 and
    ``in == out``; no ReLU after the add).

    ``use_rep``: training form ``dw_conv_list`` (kernels ``range(dw_size, 0, -2)``, skipping 1 when the
    stride is not 1; summed, then ReLU) or deploy form ``dw_conv`` (one depthwise conv with bias, then
    ReLU). Without ``use_rep``: ``dw_conv`` is a depthwise ConvBN with ReLU.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        dw_size: int = 3,
        split_pw: bool = False,
        use_rep: bool = False,
        use_se: bool = False,
        use_shortcut: bool = False,
        *,
        deploy: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.dw_size = dw_size
        self.split_pw = split_pw
        self.use_rep = use_rep
        self.use_se = use_se
        self.use_shortcut = bool(use_shortcut and stride == 1 and in_channels == out_channels)

        self.dw_conv_list: nnx.List | None = nnx.data(None)
        self.dw_conv: ConvBN | DepthwiseConv2d
        if use_rep and not deploy:
            self.dw_conv_list = nnx.List(
                [
                    ConvBN(in_channels, in_channels, k, stride, depthwise=True, use_act=False, rngs=rngs)
                    for k in self.branch_kernel_sizes()
                ]
            )
            self.dw_conv = nnx.data(None)
        elif use_rep:
            # Paddle's plain Conv2D default init: N(0, 2/(k·k·C)) (its fan-in ignores groups).
            self.dw_conv = DepthwiseConv2d(
                in_channels,
                dw_size,
                stride=stride,
                use_bias=True,
                kernel_init=kaiming_normal(dw_size * dw_size * in_channels),
                rngs=rngs,
            )
        else:
            self.dw_conv = ConvBN(in_channels, in_channels, dw_size, stride, depthwise=True, rngs=rngs)

        self.se = nnx.data(SEModule(in_channels, rngs=rngs) if use_se else None)
        if split_pw:
            mid = int(out_channels * 0.5)
            self.pw_conv_1 = ConvBN(in_channels, mid, 1, rngs=rngs)
            self.pw_conv_2 = ConvBN(mid, out_channels, 1, rngs=rngs)
        else:
            self.pw_conv = ConvBN(in_channels, out_channels, 1, rngs=rngs)

    def branch_kernel_sizes(self) -> list[int]:
        """Kernel sizes of the training-form branches, in Paddle's order (5, 3, 1; 1 only at stride 1)."""
        return [k for k in range(self.dw_size, 0, -2) if not (k == 1 and self.stride != 1)]

    @property
    def is_deploy(self) -> bool:
        return self.use_rep and self.dw_conv_list is None

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        if self.dw_conv_list is not None:
            y = self.dw_conv_list[0](x)
            for branch in self.dw_conv_list[1:]:
                y = y + branch(x)
            x = jax.nn.relu(y)
        elif self.use_rep:
            x = jax.nn.relu(self.dw_conv(x))
        else:
            x = self.dw_conv(x)
        if self.se is not None:
            x = self.se(x)
        x = self.pw_conv_2(self.pw_conv_1(x)) if self.split_pw else self.pw_conv(x)
        if self.use_shortcut:
            x = x + shortcut
        return x

    def fused_kernel_bias(self) -> tuple[np.ndarray, np.ndarray]:
        """Paddle's re-parameterisation (``rep()``): fold each branch's eval BatchNorm into its kernel,
        zero-pad every kernel (centred) to ``dw_size`` and sum kernels and biases. Float64 numpy, kernel
        ``[dw_size, dw_size, C]``."""
        if self.dw_conv_list is None:
            raise ValueError("the block is not in training form")
        kernel = np.zeros((self.dw_size, self.dw_size, self.in_channels))
        bias = np.zeros(self.in_channels)
        for branch in self.dw_conv_list:
            k, b = branch.folded_kernel_bias()
            pad = (self.dw_size - k.shape[0]) // 2
            kernel += np.pad(k, ((pad, pad), (pad, pad), (0, 0)))
            bias += b
        return kernel, bias


class PPLCNetV2ShiTu(nnx.Module):
    """``PPLCNetV2_base_ShiTu``: PPLCNetV2_base with the ReLU after ``last_conv`` removed, ``last_conv``
    with bias, and both stage-4 blocks at stride 1 (block 0 then has branches 5, 3, 1). Output
    ``[B, embedding_size]`` (Paddle's ``out["backbone"]``; the classifier ``fc`` is cut by
    ``stop_after("flatten")``)."""

    def __init__(
        self,
        *,
        scale: float = 1.0,
        depths: tuple[int, ...] = DEPTHS,
        dropout_prob: float = 0.2,
        embedding_size: int = 512,
        deploy: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        self.scale = scale
        stem_out = make_divisible(32 * scale)
        self.stem = nnx.List(
            [
                ConvBN(3, stem_out, 3, 2, rngs=rngs),
                RepDepthwiseSeparable(stem_out, make_divisible(64 * scale), 1, dw_size=3, deploy=deploy, rngs=rngs),
            ]
        )
        stages = []
        for stage, (channels, kernel_size, split_pw, use_rep, use_se, use_shortcut) in enumerate(NET_CONFIG):
            blocks = []
            for i in range(depths[stage]):
                # ShiTu variant: the last stage runs at stride 1 (Paddle rebuilds stages[3][0] and [1]).
                stride = 2 if i == 0 and stage != len(NET_CONFIG) - 1 else 1
                blocks.append(
                    RepDepthwiseSeparable(
                        make_divisible((channels if i == 0 else channels * 2) * scale),
                        make_divisible(channels * 2 * scale),
                        stride,
                        dw_size=kernel_size,
                        split_pw=split_pw,
                        use_rep=use_rep,
                        use_se=use_se,
                        use_shortcut=use_shortcut,
                        deploy=deploy,
                        rngs=rngs,
                    )
                )
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.last_conv = Conv2d(
            make_divisible(NET_CONFIG[-1][0] * 2 * scale), embedding_size, 1, use_bias=True, rngs=rngs
        )
        self.pool = GlobalAvgPool()
        self.dropout = nnx.data(DownscaleInInferDropout(dropout_prob, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.stem:
            x = layer(x)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        x = self.pool(x)  # AdaptiveAvgPool2D(1)
        x = self.last_conv(x)  # no ReLU in the ShiTu variant
        x = x.reshape(x.shape[0], -1)  # flatten
        if self.dropout is not None:  # None once folded into last_conv
            x = self.dropout(x)
        return x


class BNNeck(nnx.Module):
    """PaddleClas ``BNNeck``: flatten → BatchNorm1D (momentum 0.9, eps 1e-5; γ=1, β=0). (The recipe
    freezes β with ``learning_rate: 1e-20``: an optimizer matter, not the module's.)"""

    def __init__(self, num_features: int, *, rngs: nnx.Rngs) -> None:
        self.feat_bn = batch_norm(num_features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.feat_bn(x.reshape(x.shape[0], -1))


class FCHead(nnx.Module):
    """PaddleClas ``FC`` gear: Linear(embedding → num_classes, no bias, weight init N(0, 0.001)).
    The kernel is ``[in, out]`` like Paddle's Linear weight."""

    def __init__(self, embedding_size: int, num_classes: int, *, rngs: nnx.Rngs) -> None:
        self.fc = nnx.Linear(embedding_size, num_classes, use_bias=False, kernel_init=normal(0.001), rngs=rngs)

    def __call__(self, features: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        return self.fc(features)


class PPShiTuV2Rec(nnx.Module):
    """PaddleClas ``RecModel`` for PP-ShiTuV2_rec: ``model(x)`` → ``features`` [B, 512] (BNNeck output,
    not L2-normalised); ``model.logits(features, labels=None)`` → [B, num_classes]."""

    def __init__(
        self,
        num_classes: int,
        *,
        scale: float = 1.0,
        dropout_prob: float = 0.2,
        embedding_size: int = 512,
        deploy: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.folded = False
        self.backbone = PPLCNetV2ShiTu(
            scale=scale, dropout_prob=dropout_prob, embedding_size=embedding_size, deploy=deploy, rngs=rngs
        )
        self.neck = nnx.data(BNNeck(embedding_size, rngs=rngs))
        self.head = FCHead(embedding_size, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        features = self.backbone(x)
        if self.neck is not None:  # None once folded into last_conv
            features = self.neck(features)
        return features

    def logits(self, features: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        """Training-head logits (plain FC, no margin: ``labels`` is accepted and ignored)."""
        return self.head(features, labels)

    def inference_form(self, *, export: bool = False) -> PPShiTuV2Rec:
        """An inference-only copy with this model's eval-mode features: :func:`fold_batchnorm`'s folded
        form; with ``export`` also :func:`~shitu.models.layers.use_export_ops` (grouped depthwise and 1×1
        convolutions, the graph ONNX runtimes run fast). ``self`` is unchanged."""
        folded = fold_batchnorm(self)
        folded.eval()
        return use_export_ops(folded) if export else folded


def build_pp_shituv2_rec(
    num_classes: int,
    *,
    rngs: nnx.Rngs,
    scale: float = 1.0,
    dropout_prob: float = 0.2,
    deploy: bool = False,
    embedding_size: int = 512,
) -> PPShiTuV2Rec:
    """Build PP-ShiTuV2_rec (training mode, random Paddle-style init). ``scale`` widens/narrows every
    stage through :func:`make_divisible` like Paddle (``last_conv``'s output stays ``embedding_size``);
    ``deploy=True`` builds the re-parameterised form (see the module docstring)."""
    return PPShiTuV2Rec(
        num_classes,
        scale=scale,
        dropout_prob=dropout_prob,
        embedding_size=embedding_size,
        deploy=deploy,
        rngs=rngs,
    )


# ------------------------------------------------------------------------------------------ re-parameterising


def _rep_blocks(model: PPShiTuV2Rec) -> Iterator[tuple[str, RepDepthwiseSeparable]]:
    """``(paddle prefix, block)`` for every block with ``use_rep``."""
    for s, stage in enumerate(model.backbone.stages):
        for i, block in enumerate(stage):
            if block.use_rep:
                yield f"backbone.stages.{s}.{i}.", block


def fuse(model: PPShiTuV2Rec) -> PPShiTuV2Rec:
    """A deploy-form copy of ``model``: each training-form rep block's branches become one depthwise conv
    with bias (Paddle's re-parameterisation, computed in float64). ``model`` is unchanged; the copy keeps
    its train/eval mode. Eval-mode outputs equal the training form's to float32 rounding. The deploy form
    can still be trained (it trains the fused kernel, not the branches)."""
    fused = nnx.clone(model)
    for _, block in _rep_blocks(fused):
        if block.dw_conv_list is None:
            continue
        kernel, bias = block.fused_kernel_bias()
        conv = DepthwiseConv2d(block.in_channels, block.dw_size, stride=block.stride, use_bias=True, rngs=nnx.Rngs(0))
        conv.kernel[...] = jnp.asarray(kernel, jnp.float32)
        conv.bias[...] = jnp.asarray(bias, jnp.float32)
        block.dw_conv = conv
        block.dw_conv_list = None
    return fused


def fold_batchnorm(model: PPShiTuV2Rec) -> PPShiTuV2Rec:
    """An inference-only copy of ``model`` for speed: :func:`fuse`, then fold every ConvBN's BatchNorm into
    its conv (the conv gains a bias) and fold the eval dropout scale ``(1-p)`` and the BNNeck into
    ``last_conv``: ``W' = W·(1-p)·s``, ``b' = b·(1-p)·s + shift`` (``s, shift`` the neck's BN factors).
    Outputs equal ``model``'s **eval-mode** outputs to float32 rounding whatever mode it is in; training
    the result is not meaningful. ``model`` is unchanged."""
    folded = fuse(model)
    if folded.folded:
        return folded
    for conv_bn in [node for _, node in nnx.iter_graph(folded) if isinstance(node, ConvBN)]:
        conv_bn.fold()
    backbone = folded.backbone
    keep = 1.0 - (backbone.dropout.rate if backbone.dropout is not None else 0.0)
    kernel = np.asarray(backbone.last_conv.kernel[...], np.float64) * keep
    bias = np.asarray(backbone.last_conv.bias[...], np.float64) * keep
    if folded.neck is not None:
        scale, shift = bn_fold_factors(folded.neck.feat_bn)
        kernel, bias = kernel * scale, bias * scale + shift
    backbone.last_conv.kernel[...] = jnp.asarray(kernel, jnp.float32)
    backbone.last_conv.bias[...] = jnp.asarray(bias, jnp.float32)
    backbone.dropout = None
    folded.neck = None
    folded.folded = True
    return folded


# ---------------------------------------------------------------------------------------------- Paddle weights


@dataclass
class _Entry:
    """One Paddle key: its shape in Paddle's layout, and how to read/write it from the model."""

    key: str
    shape: tuple[int, ...]
    get: Callable[[], np.ndarray]
    set: Callable[[np.ndarray], None]


def _param_entry(key: str, var: nnx.Variable, to_paddle: Callable, from_paddle: Callable) -> _Entry:
    shape = tuple(to_paddle(np.zeros(var.get_value().shape, np.float32)).shape)

    def get() -> np.ndarray:
        return np.ascontiguousarray(to_paddle(np.asarray(var[...])))

    def set_(value: np.ndarray) -> None:
        var[...] = jnp.asarray(from_paddle(np.asarray(value, np.float32)), jnp.float32)

    return _Entry(key, shape, get, set_)


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _hwio_to_oihw(a: np.ndarray) -> np.ndarray:
    return a.transpose(3, 2, 0, 1)


def _oihw_to_hwio(a: np.ndarray) -> np.ndarray:
    return a.transpose(2, 3, 1, 0)


def _hwc_to_c1hw(a: np.ndarray) -> np.ndarray:
    return a.transpose(2, 0, 1)[:, None]


def _c1hw_to_hwc(a: np.ndarray) -> np.ndarray:
    return a[:, 0].transpose(1, 2, 0)


def _module_entries(prefix: str, node: nnx.Module) -> Iterator[_Entry]:
    if isinstance(node, Conv2d):
        yield _param_entry(prefix + "weight", node.kernel, _hwio_to_oihw, _oihw_to_hwio)
    elif isinstance(node, DepthwiseConv2d):
        yield _param_entry(prefix + "weight", node.kernel, _hwc_to_c1hw, _c1hw_to_hwc)
    elif isinstance(node, nnx.Linear):
        yield _param_entry(prefix + "weight", node.kernel, _same, _same)
    elif isinstance(node, nnx.BatchNorm):
        for name, attr in (("weight", "scale"), ("bias", "bias"), ("_mean", "mean"), ("_variance", "var")):
            yield _param_entry(prefix + name, getattr(node, attr), _same, _same)
        return
    else:
        children = enumerate(node) if isinstance(node, nnx.List) else vars(node).items()
        for name, child in children:
            if isinstance(child, nnx.Module):
                yield from _module_entries(f"{prefix}{name}.", child)
        return
    if node.bias is not None:
        yield _param_entry(prefix + "bias", node.bias, _same, _same)


def _entries(model: PPShiTuV2Rec) -> list[_Entry]:
    if model.folded:
        raise ShituError(
            "a BatchNorm-folded model has no Paddle layout",
            hint="import or export the unfolded model, then call fold_batchnorm()",
        )
    return list(_module_entries("", model))


def paddle_state_keys(model: PPShiTuV2Rec) -> list[str]:
    """The PaddleClas structured names this model needs, in Paddle's registration order. A training-form
    model does not need the rep blocks' stale ``dw_conv.weight/bias``; a deploy-form model needs them
    instead of ``dw_conv_list.*``."""
    return [entry.key for entry in _entries(model)]


def paddle_state_shapes(model: PPShiTuV2Rec) -> dict[str, tuple[int, ...]]:
    """``{key: shape in Paddle's layout}`` for :func:`paddle_state_keys`."""
    return {entry.key: entry.shape for entry in _entries(model)}


def export_paddle_state(model: PPShiTuV2Rec) -> dict[str, np.ndarray]:
    """The model's weights as a PaddleClas ``RecModel`` state dict (float32 numpy, Paddle layouts). For a
    training-form model the rep blocks' ``dw_conv.weight/bias`` are added holding the fused kernel (what
    Paddle's own ``rep()`` writes there), so the dict has Paddle's full training-form key set."""
    state: dict[str, np.ndarray] = {}
    fused_after: dict[str, str] = {}
    for prefix, block in _rep_blocks(model):
        if block.dw_conv_list is not None:
            last = len(block.dw_conv_list) - 1
            fused_after[f"{prefix}dw_conv_list.{last}.bn._variance"] = prefix
    for entry in _entries(model):
        state[entry.key] = entry.get()
        prefix = fused_after.get(entry.key)
        if prefix is not None:
            block = _block_at(model, prefix)
            kernel, bias = block.fused_kernel_bias()
            state[prefix + "dw_conv.weight"] = _hwc_to_c1hw(kernel.astype(np.float32))
            state[prefix + "dw_conv.bias"] = bias.astype(np.float32)
    return state


def _block_at(model: PPShiTuV2Rec, prefix: str) -> RepDepthwiseSeparable:
    for p, block in _rep_blocks(model):
        if p == prefix:
            return block
    raise KeyError(prefix)


def _fuse_paddle_branches(
    state: Mapping[str, np.ndarray], prefix: str, block: RepDepthwiseSeparable, report: ImportReport
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Re-parameterise a Paddle training-form block's ``dw_conv_list`` (Paddle layouts, float64) into
    ``{prefix+"dw_conv.weight": ..., prefix+"dw_conv.bias": ...}``; returns ``({}, keys)`` and records the
    mismatch in ``report.skipped`` when a branch has the wrong shape."""
    channels, size = block.in_channels, block.dw_size
    keys: list[str] = []
    kernel = np.zeros((channels, 1, size, size))
    bias = np.zeros(channels)
    ok = True
    for j, k in enumerate(block.branch_kernel_sizes()):
        branch = f"{prefix}dw_conv_list.{j}."
        names = ["conv.weight", "bn.weight", "bn.bias", "bn._mean", "bn._variance"]
        missing = [branch + n for n in names if branch + n not in state]
        if missing:
            raise ShituError(f"Paddle state is missing {missing[0]!r} (needed to re-parameterise {prefix[:-1]})")
        keys += [branch + n for n in names]
        expected = {"conv.weight": (channels, 1, k, k)} | {n: (channels,) for n in names[1:]}
        for n in names:
            shape = tuple(np.shape(state[branch + n]))
            if shape != expected[n]:
                report.skipped.append((branch + n, shape, expected[n]))
                ok = False
        if not ok:
            continue
        w, gamma, beta, mean, var = (np.asarray(state[branch + n], np.float64) for n in names)
        scale = gamma / np.sqrt(var + BN_EPSILON)
        pad = (size - k) // 2
        kernel += np.pad(w * scale[:, None, None, None], ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        bias += beta - mean * scale
    if not ok:
        return {}, keys
    return {prefix + "dw_conv.weight": kernel, prefix + "dw_conv.bias": bias}, keys


def import_paddle_state(model: PPShiTuV2Rec, state: Mapping[str, np.ndarray]) -> ImportReport:
    """Load a PaddleClas ``RecModel`` state dict (structured names → numpy, e.g. a ``.pdparams`` pickle)
    into ``model`` in place, like Paddle's ``set_dict``:

    - a key whose array has another shape (e.g. ``head.fc.weight`` for another class count) is left at
      its init and listed in ``skipped`` as ``(key, file_shape, model_shape)``;
    - a key the model needs that the state lacks raises :class:`shitu.ShituError` naming it;
    - keys the model does not use are listed in ``unused`` (``StructuredToParameterName@@`` is ignored).

    A training-form model takes the rep blocks' ``dw_conv_list`` and lists Paddle's stale
    ``dw_conv.weight/bias`` as unused. A deploy-form model takes ``dw_conv.weight/bias`` from a
    re-parameterised state, or, when the state has the ``dw_conv_list`` branches, re-parameterises them
    itself (and lists the possibly stale ``dw_conv.*`` as unused), as the spec advises.
    """
    entries = _entries(model)
    state = {k: v for k, v in state.items() if k != _STALE_KEY}
    report = ImportReport()
    derived: dict[str, np.ndarray] = {}
    keep_init: set[str] = set()  # fused convs whose branches were skipped
    consumed: set[str] = set()
    for prefix, block in _rep_blocks(model):
        has_branches = any(k.startswith(prefix + "dw_conv_list.") for k in state)
        if block.is_deploy and has_branches:
            values, keys = _fuse_paddle_branches(state, prefix, block, report)
            derived.update(values)
            consumed.update(keys)
            if not values:
                keep_init.update({prefix + "dw_conv.weight", prefix + "dw_conv.bias"})
        elif not block.is_deploy and not has_branches and prefix + "dw_conv.weight" in state:
            raise ShituError(
                f"Paddle state has no {prefix}dw_conv_list.* (it is re-parameterised): it cannot be loaded "
                "into a training-form model",
                hint="build the model with deploy=True to load it",
            )
    # An exported (inference) model has no training head: the head then keeps its initialisation.
    keep_init.update(e.key for e in entries if e.key.startswith("head.") and e.key not in state)
    missing = [e.key for e in entries if e.key not in state and e.key not in derived and e.key not in keep_init]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ShituError(f"Paddle state is missing key {missing[0]!r}{more}")
    for entry in entries:
        if entry.key in keep_init:
            continue
        if entry.key in derived:
            value = derived[entry.key]
        else:
            value = state[entry.key]
            consumed.add(entry.key)
        shape = tuple(np.shape(value))
        if shape != entry.shape:
            report.skipped.append((entry.key, shape, entry.shape))
            continue
        entry.set(value)
        report.loaded.append(entry.key)
    report.unused = [k for k in state if k not in consumed]
    return report
