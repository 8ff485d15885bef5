"""Give the parameters of an exported inference program their PaddleClas structured names.

An inference model names its parameters by creation counters (``conv2d_12.w_0``, ``batch_norm2d_3.w_1``,
``linear_7.b_0``); the counters depend on everything built before the model in the exporting process, so
they cannot be trusted. What can be trusted is the program: which parameter feeds which slot of which op,
in program order. This module reads that in two steps:

1. *Layers*: each conv/depthwise conv (with the batch_norm or bias ``add`` that consumes its output), each
   linear (``matmul`` with a parameter, plus its bias ``add``), each standalone batch_norm / layer_norm, a
   parameter ``expand``-ed into the batch (a class token) and a parameter added directly (a position
   embedding). Legacy and PIR op/slot spellings are both understood.
2. *Naming*, from the layer sequence alone (no counters), by the model's spec: its ``paddle_structure``
   function. The built-in ones, :func:`pplcnetv2_names` and :func:`clip_vit_names`:

   - PP-LCNetV2 (ShiTu) + BNNeck: ``stem.0``, then blocks (a run of depthwise convs, optional SE = two
     biased 1×1 convs, then one or two 1×1 conv+BN), ``stem.1`` first and then ``stages.{s}.{i}``, a new stage
     starting where the stride is 2, the channels change, or SE/kernel/re-parameterisation differ from the
     previous block; ``last_conv``; ``neck.feat_bn``. A re-parameterized block (export form) gives
     ``dw_conv.weight``/``dw_conv.bias``; an unfused one ``dw_conv_list.{j}`` (j by decreasing kernel size).
   - CLIP ViT + FC neck: ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``ln_pre`` (when present),
     ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``proj``, ``neck.fc``.

Anything that does not fit raises :class:`ShituError` rather than guessing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from shitu.errors import ShituError
from shitu.models.spec import resolve

if TYPE_CHECKING:
    from shitu.models.spec import ModelSpec
    from shitu.weights.paddle_inference import InferenceModel, Op

_LEGACY_TYPES = {
    "matmul_v2": "matmul",
    "mul": "matmul",
    "elementwise_add": "add",
    "elementwise_mul": "multiply",
    "elementwise_sub": "subtract",
    "elementwise_div": "divide",
    "reshape2": "reshape",
    "transpose2": "transpose",
    "flatten_contiguous_range": "flatten",
    "reduce_mean": "mean",
    "expand_v2": "expand",
    "unsqueeze2": "unsqueeze",
    "squeeze2": "squeeze",
}
_VIEW_OPS = {"reshape", "unsqueeze", "squeeze", "flatten", "assign"}
_BN_ROLES = {"scale": "weight", "bias": "bias", "mean": "_mean", "variance": "_variance"}


def op_kind(op: Op) -> str:
    """``pd_op.batch_norm_`` / ``batch_norm`` → ``batch_norm``; ``elementwise_add`` / ``pd_op.add`` → ``add``."""
    kind = op.type.rpartition(".")[2]
    if kind.endswith("_"):
        kind = kind[:-1]
    return _LEGACY_TYPES.get(kind, kind)


def op_input(op: Op, slot: str) -> list[str]:
    """An input slot by its lower-case name (PIR spells ``x``/``filter``, legacy ``X``/``Filter``)."""
    for key, names in op.inputs.items():
        if key.lower() == slot:
            return names
    return []


def op_output(op: Op) -> str | None:
    """The data output of an op (PIR: ``out``; legacy: ``Out``, ``Output`` or ``Y``)."""
    for key in ("out", "Out", "Output", "Y"):
        names = op.outputs.get(key)
        if names:
            return names[0]
    return None


@dataclass
class Layer:
    kind: str  # conv | linear | bn | ln | token | add_param
    params: dict[str, str] = field(default_factory=dict)  # role → static name
    bn: dict[str, str] = field(default_factory=dict)  # BN role (weight/bias/_mean/_variance) → static name
    groups: int = 1
    stride: int = 1

    @property
    def weight(self) -> str:
        return self.params["weight"]


class _Graph:
    def __init__(self, model: InferenceModel) -> None:
        self.model = model
        self.ops = model.ops
        self.params = set(model.params)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, op in enumerate(self.ops):
            for names in op.outputs.values():
                for n in names:
                    self.producer.setdefault(n, i)
            for names in op.inputs.values():
                for n in names:
                    self.consumers[n].append(i)

    def param_of(self, value: str) -> str | None:
        """``value`` itself if it is a parameter, or the parameter behind a reshape-like view of it."""
        if value in self.params:
            return value
        i = self.producer.get(value)
        if i is not None and op_kind(self.ops[i]) in _VIEW_OPS:
            source = op_input(self.ops[i], "x")
            if len(source) == 1 and source[0] in self.params:
                return source[0]
        return None

    def error(self, message: str) -> ShituError:
        return ShituError(message, path=self.model.program_file)


def _int_attr(op: Op, name: str, default: int) -> int:
    value = op.attrs.get(name, default)
    if isinstance(value, list):
        value = value[0] if value else default
    return int(value)


def extract_layers(model: InferenceModel) -> list[Layer]:
    """The parameterised layers of the program, in program order."""
    g = _Graph(model)
    claimed: set[int] = set()
    used: set[str] = set()
    layers: list[Layer] = []

    def take_bias(out: str | None, layer: Layer) -> None:
        for j in g.consumers.get(out or "", []):
            consumer = g.ops[j]
            if j in claimed or op_kind(consumer) != "add":
                continue
            x, y = op_input(consumer, "x"), op_input(consumer, "y")
            other = y if x == [out] else x
            bias = g.param_of(other[0]) if len(other) == 1 else None
            if bias is not None:
                layer.params["bias"] = bias
                claimed.add(j)
                return

    def take_bn(op: Op) -> dict[str, str]:
        roles = {}
        for slot, role in _BN_ROLES.items():
            names = op_input(op, slot)
            if len(names) != 1 or names[0] not in g.params:
                raise g.error(f"a {op.type} op without its {slot} parameter")
            roles[role] = names[0]
        return roles

    for i, op in enumerate(g.ops):
        if i in claimed:
            continue
        kind = op_kind(op)
        new: Layer | None = None
        if kind in ("conv2d", "depthwise_conv2d"):
            weight = op_input(op, "filter")
            if len(weight) != 1 or weight[0] not in g.params:
                raise g.error(f"{op.type} whose filter is not a parameter")
            layer = Layer("conv", {"weight": weight[0]}, groups=_int_attr(op, "groups", 1))
            layer.stride = _int_attr(op, "strides", 1)
            out = op_output(op)
            for j in g.consumers.get(out or "", []):
                if j not in claimed and op_kind(g.ops[j]) == "batch_norm" and op_input(g.ops[j], "x") == [out]:
                    layer.bn = take_bn(g.ops[j])
                    claimed.add(j)
                    break
            else:
                take_bias(out, layer)
            new = layer
        elif kind == "matmul":
            x, y = op_input(op, "x"), op_input(op, "y")
            weight = [n for n in (*y, *x) if n in g.params]
            if not weight:
                continue
            transposed = any(op.attrs.get(a) for a in ("trans_x", "trans_y", "transpose_x", "transpose_y"))
            if len(weight) != 1 or transposed or weight != y:
                raise g.error(f"a {op.type} op with an unexpected parameter use")
            new = Layer("linear", {"weight": weight[0]})
            take_bias(op_output(op), new)
        elif kind == "batch_norm":
            new = Layer("bn", bn=take_bn(op))
        elif kind == "layer_norm":
            new = Layer("ln")
            for slot in ("scale", "bias"):
                names = op_input(op, slot)
                if len(names) == 1 and names[0] in g.params:
                    new.params["weight" if slot == "scale" else "bias"] = names[0]
        elif kind in ("expand", "tile"):
            source = op_input(op, "x")
            if len(source) == 1 and source[0] in g.params:
                new = Layer("token", {"weight": source[0]})
        elif kind == "add":
            direct = [n for n in (*op_input(op, "x"), *op_input(op, "y")) if n in g.params]
            if len(direct) == 1:
                new = Layer("add_param", {"weight": direct[0]})
        if new is not None:
            layers.append(new)
            used.update(new.params.values(), new.bn.values())
    # Parameters no op reads are skipped: Paddle 3.0 keeps the unused pre-re-parameterization branches of
    # PP-LCNetV2 (dw_conv_list.*) in the program and the .pdiparams; they play no part in inference.
    # Anything else not claimed by a layer is not understood.
    leftover = sorted(p for p in g.params - used if g.consumers.get(p))
    if leftover:
        raise g.error(f"parameters used in ways this importer does not understand: {', '.join(leftover[:5])}")
    return layers


# -------------------------------------------------------------------------------------------- PP-LCNetV2


def _conv_names(prefix: str, layer: Layer, *, plain: bool = False) -> dict[str, str]:
    """ConvBNLayer → ``prefix.conv.weight`` + ``prefix.bn.*``; a plain Conv2D → ``prefix.weight``/``.bias``."""
    if layer.bn and not plain:
        names = {f"{prefix}.conv.weight": layer.weight}
        names |= {f"{prefix}.bn.{role}": static for role, static in layer.bn.items()}
        return names
    names = {f"{prefix}.weight": layer.weight}
    if "bias" in layer.params:
        names[f"{prefix}.bias"] = layer.params["bias"]
    return names


@dataclass
class _Block:
    dws: list[Layer]
    se: list[Layer]
    pws: list[Layer]


def pplcnetv2_names(model: InferenceModel, layers: list[Layer]) -> dict[str, str]:
    """Structured names of a PP-LCNetV2 (ShiTu) + BNNeck program (module docstring)."""
    err = lambda msg: ShituError(f"not a PP-LCNetV2 (ShiTu) program: {msg}", path=model.program_file)  # noqa: E731
    shapes = {name: model.params[name].shape for name in model.params}

    def is_dw(layer: Layer) -> bool:
        return layer.kind == "conv" and layer.groups > 1 and layer.groups == shapes[layer.weight][0]

    def kernel(layer: Layer) -> int:
        return int(shapes[layer.weight][-1])

    names: dict[str, str] = {}
    body = list(layers)
    if body and body[-1].kind == "bn":
        names |= {f"neck.feat_bn.{role}": static for role, static in body.pop().bn.items()}
    if any(layer.kind != "conv" for layer in body) or len(body) < 3:
        raise err("unexpected layer kinds " + ", ".join(sorted({la.kind for la in body})))
    stem, last = body[0], body[-1]
    if is_dw(stem) or not stem.bn or is_dw(last) or last.bn:
        raise err("the first layer must be a conv+BN and the last a plain 1×1 conv")
    names |= _conv_names("backbone.stem.0", stem)
    names |= _conv_names("backbone.last_conv", last, plain=True)

    blocks: list[_Block] = []
    for layer in body[1:-1]:
        if is_dw(layer):
            if not blocks or blocks[-1].se or blocks[-1].pws:
                blocks.append(_Block([], [], []))
            blocks[-1].dws.append(layer)
        elif not blocks:
            raise err("a pointwise conv before any depthwise conv")
        elif layer.bn:
            blocks[-1].pws.append(layer)
        elif blocks[-1].pws:
            raise err("a biased conv after the pointwise convs of a block")
        else:
            blocks[-1].se.append(layer)
    if not blocks:
        raise err("no depthwise blocks")

    def signature(block: _Block) -> tuple:
        dw = block.dws[0]
        form = "fused" if not dw.bn else ("branches" if len(block.dws) > 1 else "plain")
        return kernel(max(block.dws, key=kernel)), bool(block.se), form == "plain"

    stage, index, previous = -1, 0, None
    for b, block in enumerate(blocks):
        if len(block.se) not in (0, 2) or len(block.pws) not in (1, 2):
            raise err(f"block {b} has {len(block.se)} SE convs and {len(block.pws)} pointwise convs")
        channels_in = shapes[block.dws[0].weight][0]
        channels_out = shapes[block.pws[-1].weight][0]
        if b == 0:
            prefix = "backbone.stem.1"
        else:
            new_stage = (
                previous is None
                or block.dws[0].stride != 1
                or channels_in != channels_out
                or signature(block) != signature(previous)
            )
            if new_stage:
                stage, index = stage + 1, 0
            else:
                index += 1
            prefix = f"backbone.stages.{stage}.{index}"
            previous = block
        if len(block.dws) > 1 or (len(block.dws) == 1 and not block.dws[0].bn):
            if len(block.dws) > 1:
                for j, dw in enumerate(sorted(block.dws, key=kernel, reverse=True)):
                    if not dw.bn:
                        raise err(f"block {b}: a depthwise branch without BatchNorm")
                    names |= _conv_names(f"{prefix}.dw_conv_list.{j}", dw)
            else:
                names |= _conv_names(f"{prefix}.dw_conv", block.dws[0], plain=True)
        else:
            names |= _conv_names(f"{prefix}.dw_conv", block.dws[0])
        if block.se:
            names |= _conv_names(f"{prefix}.se.conv1", block.se[0], plain=True)
            names |= _conv_names(f"{prefix}.se.conv2", block.se[1], plain=True)
        if len(block.pws) == 1:
            names |= _conv_names(f"{prefix}.pw_conv", block.pws[0])
        else:
            names |= _conv_names(f"{prefix}.pw_conv_1", block.pws[0])
            names |= _conv_names(f"{prefix}.pw_conv_2", block.pws[1])
    return names


# ------------------------------------------------------------------------------------------------ CLIP ViT


def clip_vit_names(model: InferenceModel, layers: list[Layer]) -> dict[str, str]:
    """Structured names of a CLIP ViT + FC neck program (module docstring)."""
    err = lambda msg: ShituError(f"not a CLIP ViT program: {msg}", path=model.program_file)  # noqa: E731
    names: dict[str, str] = {}
    seq: list[Layer] = []
    convs = 0
    for layer in layers:
        if layer.kind == "conv":
            convs += 1
            if convs > 1 or layer.bn:
                raise err("more than one convolution, or a convolution with BatchNorm")
            names |= _conv_names("backbone.patch_embed.proj", layer, plain=True)
        elif layer.kind == "token":
            names["backbone.cls_token"] = layer.weight
        elif layer.kind == "add_param":
            names["backbone.pos_embed"] = layer.weight
        elif layer.kind in ("ln", "linear"):
            seq.append(layer)
        else:
            raise err(f"unexpected {layer.kind} layer")

    def ln(prefix: str, layer: Layer) -> dict[str, str]:
        return {f"{prefix}.{role}": static for role, static in layer.params.items()}

    def linear(prefix: str, layer: Layer) -> dict[str, str]:
        out = {f"{prefix}.weight": layer.weight}
        if "bias" in layer.params:
            out[f"{prefix}.bias"] = layer.params["bias"]
        return out

    kinds = [layer.kind for layer in seq]
    pos = 0
    if kinds[:2] == ["ln", "ln"]:
        names |= ln("backbone.ln_pre", seq[0])
        pos = 1
    block = ["ln", "linear", "linear", "ln", "linear", "linear"]
    depth = 0
    while kinds[pos : pos + 6] == block and all(
        "bias" in la.params for la in seq[pos : pos + 6] if la.kind == "linear"
    ):
        p = f"backbone.blocks.{depth}"
        names |= ln(f"{p}.norm1", seq[pos]) | linear(f"{p}.attn.qkv", seq[pos + 1])
        names |= linear(f"{p}.attn.proj", seq[pos + 2]) | ln(f"{p}.norm2", seq[pos + 3])
        names |= linear(f"{p}.mlp.fc1", seq[pos + 4]) | linear(f"{p}.mlp.fc2", seq[pos + 5])
        pos += 6
        depth += 1
    if depth == 0 or kinds[pos : pos + 1] != ["ln"]:
        raise err("no transformer blocks followed by the final LayerNorm")
    names |= ln("backbone.norm", seq[pos])
    rest = seq[pos + 1 :]
    if rest and rest[0].kind == "linear" and "bias" not in rest[0].params:
        names["backbone.proj"] = rest[0].weight
        rest = rest[1:]
    if rest and rest[0].kind == "linear":
        names |= linear("neck.fc", rest[0])
        rest = rest[1:]
    if rest:
        raise err(f"{len(rest)} unexpected layers after the neck")
    return names


# ---------------------------------------------------------------------------------------------------- API


def structured_names(model: InferenceModel, spec: ModelSpec | None = None) -> dict[str, str]:
    """``{PaddleClas structured name: static parameter name}`` for the program's parameters, named by
    ``spec.paddle_structure``; without a spec, by the first registered model whose ``paddle_structure``
    accepts the program (each raises ShituError on a program that is not its model's)."""
    layers = extract_layers(model)
    if spec is not None:
        if spec.paddle_structure is None:
            raise ShituError(f"model {spec.name} cannot read Paddle inference models", path=model.program_file)
        names = resolve(spec.paddle_structure)(model, layers)
    else:
        names = _names_by_any_spec(model, layers)
    missing = used_parameters(model) - set(names.values())
    if missing:
        raise ShituError(f"could not name the parameters {', '.join(sorted(missing)[:5])}", path=model.program_file)
    return names


def _names_by_any_spec(model: InferenceModel, layers: list[Layer]) -> dict[str, str]:
    from shitu.plugins import get_host

    refusals: list[str] = []
    tried: set[str] = set()
    for spec in get_host().models.values():
        if spec.paddle_structure is None or spec.paddle_structure in tried:
            continue
        tried.add(spec.paddle_structure)
        try:
            return resolve(spec.paddle_structure)(model, layers)
        except ShituError as exc:
            refusals.append(exc.message)
    raise ShituError(
        "unrecognised model structure: no registered model reads this program",
        path=model.program_file,
        hint="; ".join(refusals[:3]) or None,
    )


def used_parameters(model: InferenceModel) -> set[str]:
    """The parameters some op reads (Paddle 3.0 also saves parameters the program never uses)."""
    read = {n for op in model.ops for names in op.inputs.values() for n in names}
    return read & set(model.params)


def structured_state(model: InferenceModel, spec: ModelSpec | None = None) -> dict[str, np.ndarray]:
    """The model's parameters keyed like a PaddleClas ``.pdparams`` (``backbone.…``, ``neck.…``), named
    as :func:`structured_names` does."""
    return {key: model.params[static] for key, static in structured_names(model, spec).items()}
