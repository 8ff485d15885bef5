"""Shared NHWC layers for the recognition models (Flax NNX), written to match PaddlePaddle's numerics.

Conventions (every layer here):

- activations are NHWC float32;
- convolutions pad **symmetrically** with an explicit ``((p, p), (p, p))`` (Paddle's ``padding=(k-1)//2``);
  never ``"SAME"``, which pads stride-2 convolutions asymmetrically;
- every kernel keeps its **output channels on the last axis**: a dense convolution is HWIO
  ``[kh, kw, cin, cout]`` (Paddle's OIHW ``w.transpose(2, 3, 1, 0)``), a depthwise convolution is
  ``[kh, kw, C]`` (Paddle's ``[C, 1, kh, kw]`` as ``w[:, 0].transpose(1, 2, 0)``). Folding a per-channel
  scale (BatchNorm) into either is therefore ``kernel * scale`` with plain broadcasting;
- BatchNorm is :func:`batch_norm`: eps 1e-5, momentum 0.9. Paddle updates
  ``running = 0.9·running + 0.1·batch`` with the biased batch variance, which is exactly flax's
  ``momentum * ra + (1 - momentum) * batch`` convention, so ``momentum=0.9`` carries over unchanged.

Depthwise convolutions are *not* ``lax.conv_general_dilated(feature_group_count=C)``: XLA:CPU runs those
10–30× slower than the same arithmetic written as a sum of k² shifted (strided) slices of the padded input
times a per-channel weight, which XLA fuses into one vectorised loop. The gradient is a custom VJP: the
input gradient is again a shift-sum (of the stride-dilated cotangent with the flipped kernel), the kernel
gradient k² reductions scanned over pairs of images. Measured on this project's 2-core AVX2 CPU (AMD EPYC,
no AVX-512; jax 0.10.2, float32, jitted, best of 5–10, machine shared so ±30%):

    x (NHWC), k, stride        slice-sum fwd / fwd+bwd      feature_group_count fwd / fwd+bwd
    32×14×14×512,  5, 1          23 ms /  182 ms               291 ms /  5,382 ms
    32×28×28×256,  5, 2          28 ms /  162 ms               151 ms /  2,224 ms
    32×14×14×1024, 5, 1          35 ms /  369 ms               613 ms / 12,629 ms

(Plain autodiff of the slice-sum was 1.5–3× slower in backward: it pads k² copies of the cotangent.)
The kernel-gradient reductions dominate the backward pass; a fused single-pass kernel would need a
custom call. Compiling a k=5 depthwise backward takes ~1 s (k² reduction kernels), so the first training
step of the whole network compiles for ~25 s on this machine.

:func:`depthwise_conv2d_grouped` keeps the grouped form as the reference for tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

Initializer = Callable[..., jax.Array]

#: BatchNorm settings shared by every Paddle BatchNorm2D / BatchNorm1D in these models.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def normal(std: float) -> Initializer:
    """Paddle's ``Normal(0, std)`` initializer, deterministic in ``key``.

    Eagerly, the samples come from numpy's PCG64 seeded with the key's data: ``jax.random.normal``
    compiles once per distinct shape (about 0.5 s each on this CPU, so 15–20 s to build PP-ShiTuV2_rec;
    numpy takes microseconds). Under a trace (``nnx.eval_shape``, ``jit``) it is ``jax.random.normal``."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        if isinstance(key, jax.core.Tracer):
            return std * jax.random.normal(key, shape, dtype)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
        return jnp.asarray(std * rng.standard_normal(shape), dtype)

    return init


def kaiming_normal(fan_in: int, gain: float = math.sqrt(2.0)) -> Initializer:
    """Paddle's ``KaimingNormal()`` (and its default Conv2D init): an *untruncated* normal with
    std ``gain / sqrt(fan_in)``. (jax's ``he_normal`` is truncated, so it is not used.)"""
    return normal(gain / math.sqrt(fan_in))


def same_padding(kernel_size: int) -> int:
    """Paddle's ``padding=(k-1)//2``, applied on both sides."""
    return (kernel_size - 1) // 2


# --------------------------------------------------------------------------------------------------- functions


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    stride: int = 1,
    padding: int = 0,
    *,
    as_matmul: bool = True,
    operand_dtype: jnp.dtype | None = None,
) -> jax.Array:
    """Dense NHWC convolution with an HWIO kernel and symmetric explicit padding.

    Unless ``as_matmul`` is False (the export form: ONNX runtimes fuse a ``Conv`` with its bias and
    activation and keep one layout, but not a ``MatMul``), two kinds of convolution run as one matmul,
    which XLA:CPU runs faster than its convolution (same sums, float32 rounding apart):

    - a 1×1 stride-1 convolution, as a matmul over the channel axis;
    - a convolution of at most :data:`PATCH_MATMUL_MAX_CHANNELS` input channels (the RGB stem), as a matmul
      over its k²·cin gathered patches (see :func:`_patch_matmul`).

    ``operand_dtype`` (e.g. bfloat16): multiply ``x`` and ``kernel`` rounded to that type, accumulating and
    returning ``x``'s type. XLA:CPU upcasts a bf16 dot with a bf16 result to f32 (so bf16 activations only
    add conversions), but runs a bf16×bf16→f32 dot as one YNNPACK bf16 kernel: on an AVX-512 BF16 EPYC a
    6272×1024×1024 dot took 45 ms against 86 ms in f32 (25088×256×256: 12 against 19 ms)."""
    out_dtype = x.dtype
    if operand_dtype is not None:
        x, kernel = x.astype(operand_dtype), kernel.astype(operand_dtype)
    kh, kw = kernel.shape[:2]
    if as_matmul and kh == kw == 1 and stride == 1 and padding == 0:
        return jnp.matmul(x, kernel[0, 0], preferred_element_type=out_dtype)
    if as_matmul and kh * kw > 1 and kernel.shape[2] <= PATCH_MATMUL_MAX_CHANNELS:
        return _patch_matmul(x, kernel, stride, padding, out_dtype)
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=out_dtype,
    )


#: Dense convolutions with at most this many input channels run as a matmul over gathered patches.
PATCH_MATMUL_MAX_CHANNELS = 4


def _patch_matmul(x: jax.Array, kernel: jax.Array, stride: int, padding: int, out_dtype: jnp.dtype) -> jax.Array:
    """The convolution as one matmul: the k² strided windows of the padded input, concatenated on the channel
    axis in the kernel's (kh, kw, cin) order, times the kernel as a [k²·cin, cout] matrix.

    Written by hand because XLA:CPU's convolution is slow with few input channels: PP-ShiTuV2_rec's stem
    (3×3, stride 2, 3 → 32 channels, 224 px, with its bias, ReLU and padding) took 1.17 ms per image as a
    convolution and 0.59 ms this way, its forward and backward at batch 32 159 against 124 ms (AVX-512 EPYC,
    2 cores). The patches are k²·cin wide, so this is only for few input channels."""
    kh, kw, channels, out_channels = kernel.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    patches = jnp.concatenate(_windows(xp, kh, kw, stride), axis=-1)
    return jnp.matmul(patches, kernel.reshape(kh * kw * channels, out_channels), preferred_element_type=out_dtype)


def _windows(x: jax.Array, kh: int, kw: int, stride: int) -> list[jax.Array]:
    """The kh·kw strided windows of an already padded NHWC ``x`` that a kh×kw convolution at ``stride`` reads,
    ``x[:, i::s, j::s, :]`` cut to the output's size, in (i, j) row-major order."""
    batch, height, width, channels = x.shape
    out_h = (height - kh) // stride + 1
    out_w = (width - kw) // stride + 1
    return [
        lax.slice(
            x,
            (0, i, j, 0),
            (batch, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, channels),
            (1, stride, stride, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]


def _shift_sum(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """``sum_ij x[:, i::s, j::s, :] * kernel[i, j]`` over the valid windows of an already padded ``x``."""
    kh, kw, _ = kernel.shape
    out = None
    for index, window in enumerate(_windows(x, kh, kw, stride)):
        term = window * kernel[index // kw, index % kw]
        out = term if out is None else out + term
    assert out is not None
    return out


def _padded_shift_sum(x: jax.Array, kernel: jax.Array, stride: int, pad_h: tuple, pad_w: tuple) -> jax.Array:
    """:func:`_shift_sum` of ``lax.pad(x)`` (``pad_h``/``pad_w``: ``(low, high, interior)``).

    When C is a multiple of 512 the channel stride is a multiple of 2 KiB, so the k² windows read by
    one output vector fall in the same few L1 cache sets and evict each other (4 KiB aliasing): the
    padded copy then gets 8 spare channels (it is materialised anyway) and the output is sliced back.
    That halves the time of the 14×14×1024 k5 layers (32×14×14×1024: 64 → 28 ms here)."""
    channels = x.shape[-1]
    extra = 8 if channels % 512 == 0 else 0
    zero = jnp.zeros((), x.dtype)
    xp = lax.pad(x, zero, ((0, 0, 0), pad_h, pad_w, (0, extra, 0)))
    if extra:
        kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, extra)))
    y = _shift_sum(xp, kernel, stride)
    return y[..., :channels] if extra else y


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise(x: jax.Array, kernel: jax.Array, stride: int, ph: int, pw: int) -> jax.Array:
    return _padded_shift_sum(x, kernel, stride, (ph, ph, 0), (pw, pw, 0))


def _depthwise_fwd(x, kernel, stride, ph, pw):
    return _depthwise(x, kernel, stride, ph, pw), (x, kernel)


def _depthwise_bwd(stride, ph, pw, residuals, g):
    x, kernel = residuals
    kh, kw, _ = kernel.shape
    _, height, width, _ = x.shape
    # dx: the transposed convolution = a stride-1 shift-sum of the cotangent, dilated by the stride
    # (zeros between rows/columns) and padded so that the output lands exactly on x, with the
    # kernel flipped. Autodiff of the slices would instead build k² padded copies of g.
    rem_h = (height + 2 * ph - kh) % stride
    rem_w = (width + 2 * pw - kw) % stride
    dx = _padded_shift_sum(
        g,
        kernel[::-1, ::-1],
        1,
        (kh - 1 - ph, kh - 1 - ph + rem_h, stride - 1),
        (kw - 1 - pw, kw - 1 - pw + rem_w, stride - 1),
    )
    # dkernel[i, j] = sum over batch and positions of the (i, j)-shifted input times g: k² reductions.
    # XLA:CPU runs these fastest on cache-sized pieces, so scan over pairs of images (about 2× faster
    # than reducing the whole batch at once at 32×14×14×512 and 32×112×112×32).
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    batch = x.shape[0]
    if batch >= 4 and batch % 2 == 0:
        pairs = (xp.reshape(batch // 2, 2, *xp.shape[1:]), g.reshape(batch // 2, 2, *g.shape[1:]))

        def step(acc, pair):
            return acc + _kernel_grad(pair[0], pair[1], kh, kw, stride), None

        # Accumulated in float32 at least (bf16 training: many partial sums), returned in the kernel's dtype.
        accumulator = jnp.zeros(kernel.shape, jnp.promote_types(g.dtype, jnp.float32))
        dkernel, _ = lax.scan(step, accumulator, pairs)
    else:
        dkernel = _kernel_grad(xp, g, kh, kw, stride)
    return dx, dkernel.astype(kernel.dtype)


def _kernel_grad(xp: jax.Array, g: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    batch, out_h, out_w, channels = g.shape
    rows = []
    for i in range(kh):
        row = []
        for j in range(kw):
            window = lax.slice(
                xp,
                (0, i, j, 0),
                (batch, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, channels),
                (1, stride, stride, 1),
            )
            row.append(jnp.sum(window * g, axis=(0, 1, 2), dtype=jnp.promote_types(g.dtype, jnp.float32)))
        rows.append(jnp.stack(row))
    return jnp.stack(rows)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int | None = None) -> jax.Array:
    """Depthwise NHWC convolution (``groups = C``, one filter per channel) as a sum of shifted slices.

    ``kernel`` is ``[kh, kw, C]``; ``padding`` defaults to ``(k-1)//2`` on every side. Output size is
    ``(H + 2p - k) // stride + 1`` like any convolution. Same arithmetic as
    :func:`depthwise_conv2d_grouped`, but XLA:CPU fuses it into a single loop (see the module docstring).
    Its gradient (a custom VJP) is a shift-sum too for the input, and k² reductions for the kernel.
    """
    kh, kw, channels = kernel.shape
    if x.shape[-1] != channels:
        raise ValueError(f"depthwise kernel has {channels} channels, input has {x.shape[-1]}")
    ph = same_padding(kh) if padding is None else padding
    pw = same_padding(kw) if padding is None else padding
    return _depthwise(x, kernel, stride, ph, pw)


def depthwise_conv2d_grouped(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int | None = None) -> jax.Array:
    """The same depthwise convolution through ``feature_group_count=C`` (reference for tests; slow on CPU)."""
    kh, kw, channels = kernel.shape
    ph = same_padding(kh) if padding is None else padding
    pw = same_padding(kw) if padding is None else padding
    return lax.conv_general_dilated(
        x,
        kernel[:, :, None, :],  # HWIO with I = 1
        window_strides=(stride, stride),
        padding=((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
    )


def bn_fold_factors(bn: nnx.BatchNorm) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` (float64 numpy) such that eval-mode ``bn(y) == y * scale + shift``:
    ``scale = γ/√(var+eps)``, ``shift = β − mean·scale``. Folding is done in float64 and rounded once."""
    gamma, beta, mean, var = (np.asarray(v[...], np.float64) for v in (bn.scale, bn.bias, bn.mean, bn.var))
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale, beta - mean * scale


# ----------------------------------------------------------------------------------------------------- modules


class Conv2d(nnx.Module):
    """NHWC convolution, HWIO ``kernel``, optional ``bias``; symmetric padding ``(k-1)//2`` by default.

    Init is Paddle's Conv2D default (and ``KaimingNormal()``): ``N(0, 2/(k·k·cin))``, bias zeros."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int | None = None,
        use_bias: bool = False,
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = same_padding(kernel_size) if padding is None else padding
        init = kernel_init or kaiming_normal(in_channels * kernel_size * kernel_size)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32))
        self.bias = nnx.data(nnx.Param(jnp.asarray(np.zeros(out_channels, np.float32))) if use_bias else None)
        # Export form (see :func:`use_export_ops`): no convolution becomes a matmul (see :func:`conv2d`).
        self.as_matmul = True
        # bf16 products with f32 accumulation (see :func:`use_bf16_products`); None: in the input's type.
        self.operand_dtype: str | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv2d(
            x,
            self.kernel[...],
            self.stride,
            self.padding,
            as_matmul=self.as_matmul,
            operand_dtype=jnp.dtype(self.operand_dtype) if self.operand_dtype else None,
        )
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class DepthwiseConv2d(nnx.Module):
    """Depthwise NHWC convolution, ``kernel`` ``[k, k, C]``, optional ``bias``, via :func:`depthwise_conv2d`.

    Default init ``N(0, 2/(k·k))`` (Paddle's ``KaimingNormal()`` on a ``[C, 1, k, k]`` weight); pass
    ``kernel_init`` for Paddle's plain-Conv2D default ``N(0, 2/(k·k·C))`` (its fan-in ignores groups)."""

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        use_bias: bool = False,
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = same_padding(kernel_size)
        # Export form (see :func:`use_export_ops`): one grouped convolution instead of shifted slices.
        self.grouped = False
        init = kernel_init or kaiming_normal(kernel_size * kernel_size)
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, channels), jnp.float32))
        self.bias = nnx.data(nnx.Param(jnp.asarray(np.zeros(channels, np.float32))) if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        conv = depthwise_conv2d_grouped if self.grouped else depthwise_conv2d
        y = conv(x, self.kernel[...], self.stride, self.padding)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def global_avg_pool(x: jax.Array, *, as_matmul: bool = True) -> jax.Array:
    """The mean of NHWC ``x`` over height and width, as ``[B, 1, 1, C]`` (Paddle's ``AdaptiveAvgPool2D(1)``).

    By default a matmul of a row of ``1/(H·W)`` with the ``[H·W, C]`` positions of each image: XLA:CPU
    otherwise fuses the mean into the dot that produces ``x`` and runs the whole more slowly
    (PP-ShiTuV2_rec at 224 px, medians per image: 10.4 against 11.2 ms at batch 8, 12.2 against 12.5 ms at
    batch 1; AVX-512 EPYC, 2 cores). ``as_matmul=False`` (the export form) is ``mean``, which ONNX writes as one
    ``ReduceMean``. The two differ by float32 rounding."""
    if not as_matmul:
        return jnp.mean(x, axis=(1, 2), keepdims=True)
    batch, height, width, channels = x.shape
    weights = jnp.full((batch, 1, height * width), 1.0 / (height * width), x.dtype)
    return jnp.matmul(weights, x.reshape(batch, height * width, channels)).reshape(batch, 1, 1, channels)


class GlobalAvgPool(nnx.Module):
    """:func:`global_avg_pool` as a layer (no parameters), switched to its export form by
    :func:`use_export_ops`."""

    def __init__(self) -> None:
        self.as_matmul = True

    def __call__(self, x: jax.Array) -> jax.Array:
        return global_avg_pool(x, as_matmul=self.as_matmul)


def use_export_ops(module: nnx.Module) -> nnx.Module:
    """Switch every convolution and pool in ``module`` (in place) to the ops ONNX runtimes run fastest, and
    return it.

    Depthwise layers become one grouped convolution (``feature_group_count=C``: a single ``Conv`` with
    ``group=C`` in ONNX) instead of k² shifted slices, every dense convolution stays a convolution (no
    matmul forms, see :func:`conv2d`) and :class:`GlobalAvgPool` a mean, so ONNX Runtime / OpenVINO fuse
    each ``Conv`` with its bias and activation and keep one layout. Same arithmetic, so the same results to
    float32 rounding; XLA:CPU runs this form slower (see the module docstring), so it is for export only.
    Parameters and their tree are unchanged.
    """
    for _, node in nnx.iter_graph(module):
        if isinstance(node, DepthwiseConv2d):
            node.grouped = True
        elif isinstance(node, (Conv2d, GlobalAvgPool)):
            node.as_matmul = False
    return module


def use_bf16_products(module: nnx.Module) -> nnx.Module:
    """Make every dense convolution (1×1 ones are dots) in ``module`` multiply in bfloat16 and accumulate
    in float32, in place, and return it; activations, depthwise convolutions and parameters stay float32.
    This is the JAX bf16 path: the dots are most of the time and XLA:CPU runs only this form of them in
    bf16 (see :func:`conv2d`). Parameters and their tree are unchanged."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, Conv2d):
            node.operand_dtype = "bfloat16"
    return module


def batch_norm(num_features: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """Paddle ``BatchNorm2D``/``BatchNorm1D`` defaults: γ=1, β=0, mean 0, var 1, eps 1e-5, momentum 0.9.

    ``use_fast_variance=False``: the batch variance is computed as ``mean((x-mean)²)`` like Paddle, not
    ``E[x²]-E[x]²``."""
    return nnx.BatchNorm(
        num_features,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        use_fast_variance=False,
        rngs=rngs,
    )


class ConvBN(nnx.Module):
    """Paddle's ``ConvBNLayer``: conv (no bias) → BatchNorm → ReLU if ``use_act``.

    ``conv`` is a :class:`Conv2d`, or a :class:`DepthwiseConv2d` when ``groups == in_channels ==
    out_channels``. After :meth:`fold` the BatchNorm is gone (``bn is None``) and the conv carries the
    folded bias: eval-mode results are unchanged, and the layer is for inference only."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        depthwise: bool = False,
        use_act: bool = True,
        rngs: nnx.Rngs,
    ) -> None:
        if depthwise:
            if in_channels != out_channels:
                raise ValueError("a depthwise ConvBN keeps the channel count")
            self.conv = DepthwiseConv2d(in_channels, kernel_size, stride=stride, rngs=rngs)
        else:
            self.conv = Conv2d(in_channels, out_channels, kernel_size, stride=stride, rngs=rngs)
        self.bn = nnx.data(batch_norm(out_channels, rngs=rngs))
        self.use_act = use_act

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.use_act:
            x = jax.nn.relu(x)
        return x

    def folded_kernel_bias(self) -> tuple[np.ndarray, np.ndarray]:
        """The conv kernel and bias (float64 numpy, kernel in this layer's layout) with the eval-mode
        BatchNorm folded in: ``W·s`` and ``b·s + shift`` (see :func:`bn_fold_factors`)."""
        kernel = np.asarray(self.conv.kernel[...], np.float64)
        bias = np.zeros(kernel.shape[-1]) if self.conv.bias is None else np.asarray(self.conv.bias[...], np.float64)
        if self.bn is None:
            return kernel, bias
        scale, shift = bn_fold_factors(self.bn)
        return kernel * scale, bias * scale + shift

    def fold(self) -> None:
        """Fold the BatchNorm into the conv, in place (inference only afterwards)."""
        if self.bn is None:
            return
        kernel, bias = self.folded_kernel_bias()
        self.conv.kernel[...] = jnp.asarray(kernel, jnp.float32)
        if self.conv.bias is None:
            self.conv.bias = nnx.Param(jnp.asarray(bias, jnp.float32))
        else:
            self.conv.bias[...] = jnp.asarray(bias, jnp.float32)
        self.bn = None


class DownscaleInInferDropout(nnx.Dropout):
    """Paddle ``Dropout(p, mode="downscale_in_infer")``: training ``x * mask`` (keep prob ``1-p``, **no**
    rescale); eval ``x * (1 - p)``. (flax's own Dropout is ``upscale_in_train``.)"""

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
        deterministic = self.deterministic if deterministic is None else deterministic
        if self.rate == 0.0:
            return inputs
        if deterministic:
            return inputs * jnp.asarray(1.0 - self.rate, inputs.dtype)
        if rngs is None:
            rngs = self.rngs
        if rngs is None:
            raise ValueError("DownscaleInInferDropout in training mode needs rngs")
        if isinstance(rngs, nnx.Rngs):
            key = rngs[self.rng_collection]()
        elif isinstance(rngs, nnx.RngStream):
            key = rngs()
        else:
            key = rngs
        mask = jax.random.bernoulli(key, p=1.0 - self.rate, shape=inputs.shape)
        return lax.select(mask, inputs, jnp.zeros_like(inputs))
