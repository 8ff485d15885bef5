"""CLIP ViT recognizers: ``PP-ShiTuV2_rec_CLIP_vit_base`` and ``PP-ShiTuV2_rec_CLIP_vit_large`` in Flax NNX.

A re-creation of PaddleClas' ``RecModel`` with backbone ``CLIP_vit_base_patch16_224`` /
``CLIP_vit_large_patch14_224`` (``ppcls/arch/backbone/model_zoo/foundation_vit.py``, ``return_embed`` and
``return_mean_embed`` on), neck ``FC(512 → 512)`` and head ``ArcMargin(margin 0.2, scale 30)``.

Forward (input NHWC float32, normalised): patch embedding (Conv P×P stride P, no bias) → prepend the
cls token → ``+ pos_embed`` → ``ln_pre`` → pre-norm blocks (fused qkv with bias, exact-erf GELU MLP) →
[base only: drop the cls token] → ``norm`` on every remaining token → ``@ proj`` [D, 512] → mean over the
tokens (base: the n patch tokens; large: n + 1 tokens, cls included) → neck → ``features`` [B, 512].
Every LayerNorm has epsilon 1e-5 and is computed with the two-pass variance (like Paddle).

Other input sizes follow PaddleClas' ``forward_features`` exactly:

- a side that is not a multiple of the patch size is zero-padded at the bottom/right first
  (``pading_for_not_divisible``). Upstream quirk, kept: as soon as one side is not divisible, the *other*
  side is padded too, by a whole patch if it was divisible (e.g. 32×36 with P=8 becomes 40×40);
- when the patch grid differs from ``img_size // patch_size`` the patch part of ``pos_embed`` is resized
  bicubically (``resize_pos_embed``: Paddle ``interpolate(mode="bicubic", align_corners=False)``, i.e.
  cubic convolution with a = -0.75, half-pixel centres, edge clamping, no antialiasing); the cls entry is
  kept. So the models also run at 112 or 128 px on a CPU, with the 224-px weights.

Upstream version: this follows the current ``foundation_vit.py`` (the one with ``proj``,
``remove_cls_token_in_forward`` and ``return_mean_embed``). Older PaddleClas releases built the CLIP ViTs
differently (QuickGELU, a patch conv *with* bias, no ``proj``, no token mean); their files do not fit here.

Weights: :func:`import_paddle_state` loads PaddleClas structured names (``backbone.*``, ``neck.fc.*``,
``head.weight``); :func:`export_paddle_state` writes them back; :func:`paddle_state_keys` lists them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shitu.errors import ShituError
from shitu.models.heads import ArcMargin, paddle_xavier_normal, standard_normal
from shitu.models.spec import ImportReport

__all__ = [
    "CLIPViTRecModel",
    "CLIPVisionTransformer",
    "build_clip_vit",
    "build_clip_vit_base",
    "build_clip_vit_large",
    "export_paddle_state",
    "import_paddle_state",
    "paddle_state_keys",
]

LAYER_NORM_EPS = 1e-5
BICUBIC_A = -0.75  # Paddle / PyTorch cubic-convolution coefficient


# PaddleClas ``_init_weights``: Linear weights TruncatedNormal(std .02) (cut at ±2 std), zero biases;
# cls_token and pos_embed TruncatedNormal(.02). The patch conv keeps Paddle's Conv2D default,
# N(0, sqrt(2 / fan_in)).
def _trunc_normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return standard_normal(key, shape, dtype, truncate=2.0) * jnp.asarray(0.02, dtype)


def _conv_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    fan_in = math.prod(shape[:-1])  # HWIO kernel: P·P·in_chans
    return standard_normal(key, shape, dtype) * jnp.asarray(math.sqrt(2.0 / fan_in), dtype)


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs)


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, *, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=_trunc_normal, rngs=rngs)


# ----------------------------------------------------------------------------------------------------
# Pieces that follow PaddleClas' forward for other input sizes.


def _cubic_coefficients(t: float) -> tuple[float, float, float, float]:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position ``t`` (Paddle/PyTorch)."""
    a = BICUBIC_A

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    return far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)


def bicubic_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of 1-D bicubic resizing, ``align_corners=False`` (Paddle's ``interpolate``)."""
    m = np.zeros((n_out, n_in), np.float64)
    if n_in == n_out:
        return np.eye(n_in)
    ratio = n_in / n_out
    for k in range(n_out):
        src = ratio * (k + 0.5) - 0.5  # not clamped at 0 for cubic
        i0 = math.floor(src)
        for j, w in enumerate(_cubic_coefficients(src - i0)):
            m[k, min(max(i0 - 1 + j, 0), n_in - 1)] += w
    return m


def resize_pos_embed(pos_embed: jax.Array, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> jax.Array:
    """Resize the patch part of ``pos_embed`` [1, 1 + h·w, D] bicubically to ``dst_grid``; keep the cls entry."""
    if tuple(src_grid) == tuple(dst_grid):
        return pos_embed
    (sh, sw), (dh, dw) = src_grid, dst_grid
    extra, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(grid.shape[0], sh, sw, grid.shape[-1]).astype(jnp.float32)
    mh = jnp.asarray(bicubic_resize_matrix(sh, dh), jnp.float32)
    mw = jnp.asarray(bicubic_resize_matrix(sw, dw), jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    grid = jnp.einsum("yh,bhwd->bywd", mh, grid, precision=hp)
    grid = jnp.einsum("xw,bywd->byxd", mw, grid, precision=hp)
    grid = grid.reshape(grid.shape[0], dh * dw, grid.shape[-1]).astype(pos_embed.dtype)
    return jnp.concatenate([extra, grid], axis=1)


def pad_to_patches(x: jax.Array, patch_size: int) -> jax.Array:
    """PaddleClas ``pading_for_not_divisible`` on NHWC input, quirk included (see the module docstring)."""
    h, w = x.shape[1], x.shape[2]
    if h % patch_size == 0 and w % patch_size == 0:
        return x
    pad_h = patch_size - h % patch_size
    pad_w = patch_size - w % patch_size
    return jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))


# ----------------------------------------------------------------------------------------------------
# Modules (attribute names mirror PaddleClas so the weight mapping stays readable).


class PatchEmbed(nnx.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, rngs: nnx.Rngs) -> None:
        self.patch_size = patch_size
        self.proj = nnx.Conv(
            in_chans,
            embed_dim,
            (patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            use_bias=False,
            kernel_init=_conv_init,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        x = self.proj(pad_to_patches(x, self.patch_size))  # [B, gh, gw, D]
        b, gh, gw, d = x.shape
        return x.reshape(b, gh * gw, d), (gh, gw)  # row-major tokens, as Paddle's flatten(2)


class Attention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, rngs: nnx.Rngs) -> None:
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = _linear(dim, 3 * dim, rngs, use_bias=qkv_bias)
        self.proj = _linear(dim, dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)  # [q|k|v][heads][hd]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attn = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
        # Softmax in float32 at least (a no-op in float32; under bf16 training the scores are bf16).
        attn = jax.nn.softmax(attn.astype(jnp.promote_types(attn.dtype, jnp.float32)), axis=-1).astype(v.dtype)
        x = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, c)
        return self.proj(x)


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs) -> None:
        self.fc1 = _linear(dim, hidden, rngs)
        self.fc2 = _linear(hidden, dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # nn.GELU() in Paddle is the exact erf form (CLIP's QuickGELU is *not* used: replace_mlp_GELU is empty).
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, qkv_bias: bool, rngs: nnx.Rngs) -> None:
        self.norm1 = _layer_norm(dim, rngs)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, rngs=rngs)
        self.norm2 = _layer_norm(dim, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVisionTransformer(nnx.Module):
    """PaddleClas ``VisionTransformer`` for the CLIP variants with ``return_embed``/``return_mean_embed``.

    Returns the mean projected token embedding [B, output_dim].
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        img_size: int = 224,
        remove_cls_token: bool,
        output_dim: int = 512,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        in_chans: int = 3,
        rngs: nnx.Rngs,
    ) -> None:
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.remove_cls_token = bool(remove_cls_token)
        num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, rngs=rngs)
        self.cls_token = nnx.Param(_trunc_normal(rngs.params(), (1, 1, embed_dim)))
        self.pos_embed = nnx.Param(_trunc_normal(rngs.params(), (1, num_patches + 1, embed_dim)))
        self.ln_pre = _layer_norm(embed_dim, rngs)
        self.blocks = nnx.List(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, rngs=rngs) for _ in range(depth)]
        )
        self.norm = _layer_norm(embed_dim, rngs)
        # Upstream: Assign(embed_dim**-0.5 * randn(embed_dim, output_dim)).
        proj = standard_normal(rngs.params(), (embed_dim, output_dim)) * embed_dim**-0.5
        self.proj = nnx.Param(proj)

    def __call__(self, x: jax.Array) -> jax.Array:
        x, grid = self.patch_embed(x)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + resize_pos_embed(self.pos_embed[...], self.grid, grid)
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        if self.remove_cls_token:  # CLIP base only (remove_cls_token_in_forward)
            x = x[:, 1:]
        x = self.norm(x)
        x = x @ self.proj[...]
        return x.mean(axis=1)


class FC(nnx.Module):
    """PaddleClas neck ``FC``: Linear(embedding_size → class_num) with bias, XavierNormal weight."""

    def __init__(self, embedding_size: int, class_num: int, *, rngs: nnx.Rngs) -> None:
        self.fc = nnx.Linear(embedding_size, class_num, kernel_init=paddle_xavier_normal, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(x)


class CLIPViTRecModel(nnx.Module):
    """RecModel: ``model(x)`` → features [B, embedding_size]; ``model.logits(features, labels)`` → ArcMargin."""

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: CLIPVisionTransformer,
        embedding_size: int,
        margin: float,
        scale: float,
        easy_margin: bool,
        rngs: nnx.Rngs,
    ) -> None:
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.backbone = backbone
        out_dim = backbone.proj.shape[1]
        self.neck = FC(out_dim, embedding_size, rngs=rngs)
        self.head = ArcMargin(
            embedding_size, num_classes, margin=margin, scale=scale, easy_margin=easy_margin, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.neck(self.backbone(x))

    def logits(self, features: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        return self.head(features, labels)


def build_clip_vit(
    num_classes: int,
    *,
    rngs: nnx.Rngs,
    embed_dim: int,
    depth: int,
    num_heads: int,
    patch_size: int,
    img_size: int = 224,
    remove_cls_token: bool,
    output_dim: int = 512,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    in_chans: int = 3,
    embedding_size: int = 512,
    margin: float = 0.2,
    scale: float = 30.0,
    easy_margin: bool = False,
) -> CLIPViTRecModel:
    """Build a CLIP-ViT RecModel (backbone + FC neck + ArcMargin head) with random initialisation."""
    backbone = CLIPVisionTransformer(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        patch_size=patch_size,
        img_size=img_size,
        remove_cls_token=remove_cls_token,
        output_dim=output_dim,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        in_chans=in_chans,
        rngs=rngs,
    )
    return CLIPViTRecModel(
        num_classes,
        backbone=backbone,
        embedding_size=embedding_size,
        margin=margin,
        scale=scale,
        easy_margin=easy_margin,
        rngs=rngs,
    )


BASE_ARCH: dict[str, Any] = {
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "patch_size": 16,
    "remove_cls_token": True,
}
LARGE_ARCH: dict[str, Any] = {
    "embed_dim": 1024,
    "depth": 24,
    "num_heads": 16,
    "patch_size": 14,
    "remove_cls_token": False,
}


def build_clip_vit_base(num_classes: int, *, rngs: nnx.Rngs, **kw: Any) -> CLIPViTRecModel:
    """``PP-ShiTuV2_rec_CLIP_vit_base``: CLIP_vit_base_patch16_224 (768/12/12/16, cls token dropped)."""
    return build_clip_vit(num_classes, rngs=rngs, **{**BASE_ARCH, **kw})


def build_clip_vit_large(num_classes: int, *, rngs: nnx.Rngs, **kw: Any) -> CLIPViTRecModel:
    """``PP-ShiTuV2_rec_CLIP_vit_large``: CLIP_vit_large_patch14_224 (1024/24/16/14, cls token kept)."""
    return build_clip_vit(num_classes, rngs=rngs, **{**LARGE_ARCH, **kw})


# ----------------------------------------------------------------------------------------------------
# PaddleClas weights.


@dataclass(frozen=True)
class _Entry:
    key: str  # PaddleClas structured name
    var: nnx.Variable
    perm: tuple[int, ...] | None  # our layout → Paddle's layout (np.transpose axes); None = same
    required: bool

    @property
    def paddle_shape(self) -> tuple[int, ...]:
        shape = tuple(self.var.shape)
        return shape if self.perm is None else tuple(shape[i] for i in self.perm)

    def to_model(self, a: np.ndarray) -> np.ndarray:
        return a if self.perm is None else np.transpose(a, np.argsort(self.perm))

    def to_paddle(self, a: np.ndarray) -> np.ndarray:
        return a if self.perm is None else np.transpose(a, self.perm)


_HWIO_TO_OIHW = (3, 2, 0, 1)


def _entries(model: CLIPViTRecModel) -> list[_Entry]:
    bb = model.backbone
    out: list[_Entry] = []

    def add(key: str, var: nnx.Variable, perm: tuple[int, ...] | None = None, required: bool = True) -> None:
        out.append(_Entry(key, var, perm, required))

    def norm(prefix: str, ln: nnx.LayerNorm) -> None:
        add(f"{prefix}.weight", ln.scale)
        add(f"{prefix}.bias", ln.bias)

    def linear(prefix: str, lin: nnx.Linear) -> None:  # Paddle Linear weight is [in, out], like NNX
        add(f"{prefix}.weight", lin.kernel)
        if lin.bias is not None:
            add(f"{prefix}.bias", lin.bias)

    add("backbone.cls_token", bb.cls_token)
    add("backbone.pos_embed", bb.pos_embed)
    add("backbone.patch_embed.proj.weight", bb.patch_embed.proj.kernel, _HWIO_TO_OIHW)
    norm("backbone.ln_pre", bb.ln_pre)
    for i, block in enumerate(bb.blocks):
        p = f"backbone.blocks.{i}"
        norm(f"{p}.norm1", block.norm1)
        linear(f"{p}.attn.qkv", block.attn.qkv)
        linear(f"{p}.attn.proj", block.attn.proj)
        norm(f"{p}.norm2", block.norm2)
        linear(f"{p}.mlp.fc1", block.mlp.fc1)
        linear(f"{p}.mlp.fc2", block.mlp.fc2)
    norm("backbone.norm", bb.norm)
    add("backbone.proj", bb.proj)
    linear("neck.fc", model.neck.fc)
    # The training head is optional: fine-tuning usually starts from a file without it (or with
    # another class count, which is then skipped for its shape, as Paddle's set_dict does).
    add("head.weight", model.head.weight, required=False)
    return out


def paddle_state_keys(model: CLIPViTRecModel) -> dict[str, tuple[int, ...]]:
    """The PaddleClas keys this model reads and writes, with their shapes in Paddle's layout."""
    return {e.key: e.paddle_shape for e in _entries(model)}


def import_paddle_state(model: CLIPViTRecModel, state: dict[str, np.ndarray]) -> ImportReport:
    """Load a PaddleClas RecModel state dict (structured names) into ``model`` in place.

    Conv weights arrive OIHW and are stored HWIO; Linear weights are [in, out] on both sides. A key whose
    shape differs is listed in ``skipped`` and the parameter keeps its initial value (Paddle's set_dict);
    keys the model does not use are listed in ``unused``. A missing required key (everything but
    ``head.weight``) raises :class:`~shitu.ShituError` before anything is changed.
    """
    entries = _entries(model)
    missing = [e.key for e in entries if e.required and e.key not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ShituError(
            f"Paddle weights lack the key {missing[0]!r}{more}",
            hint="expected a PaddleClas RecModel state dict for this architecture",
        )
    report = ImportReport()
    for e in entries:
        if e.key not in state:
            continue
        array = np.asarray(state[e.key])
        if tuple(array.shape) != e.paddle_shape:
            report.skipped.append((e.key, tuple(array.shape), e.paddle_shape))
            continue
        e.var.set_value(jnp.asarray(e.to_model(array), dtype=e.var.dtype))
        report.loaded.append(e.key)
    known = {e.key for e in entries}
    report.unused = sorted(k for k in state if k not in known)
    return report


def export_paddle_state(model: CLIPViTRecModel) -> dict[str, np.ndarray]:
    """The inverse of :func:`import_paddle_state`: numpy arrays under PaddleClas names and layouts."""
    return {e.key: np.asarray(e.to_paddle(np.asarray(e.var[...]))) for e in _entries(model)}
