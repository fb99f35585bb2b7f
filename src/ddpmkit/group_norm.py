"""GroupNorm, optionally followed by SiLU, with a fast path for channels_last CPU tensors.

Why: the UNet keeps its activations channels_last (NHWC), where oneDNN's convolutions
are fastest, but torch's CPU GroupNorm kernel for that layout is slow when a group has
few channels, as with the poster's 64 channels in 32 groups (2 channels per group);
benchmarks/README.md ("Levers") has the measurements. The fast path here does the work
in passes over NHWC memory that run along the channel axis:

    forward   one pass (a numba kernel) sums x and x^2 over each image's pixels per
              channel, in float64; the group statistics follow from those N x C sums;
              then y = scale[n, c] * x + shift[n, c], one multiply-add pass (torch).
              SiLU follows in place when nothing needs the gradient; under autograd
              sigmoid(y) is kept for the backward and y *= sigmoid(y).
    backward  two numba passes over (grad_output, x, sigmoid): the first sums g and
              g * x per image and channel, the second writes dx = a[n, c] * g +
              b[n, c] * x + c[n, c]. g is the gradient at GroupNorm's output: grad_output
              times SiLU's derivative s (1 + z (1 - s)), with z = scale * x + shift
              recomputed and s the saved sigmoid, so SiLU's backward costs no pass.

GroupNorm (Wu & He 2018, eq. 1 with the group sets of sec. 3.1): for image n and group
k with M = (C / G) * H * W elements, mean = (1/M) sum x, var = (1/M) sum x^2 - mean^2
(biased, as torch), rstd = 1 / sqrt(var + eps), y = weight[c] * (x - mean) * rstd + bias[c].
Its input gradient, with g = dL/dy and xhat = (x - mean) * rstd:

    dx = rstd * (weight[c] g - P - xhat * Q),
    P = (1/M) sum_{c in k, pixels} weight[c] g,   Q = (1/M) sum_{c in k, pixels} weight[c] g xhat,

which is linear in g and x with per-(image, channel) coefficients: a = rstd * weight[c],
b = -rstd^2 Q, c = rstd^2 Q mean - rstd P. dweight[c] = sum_{n, pixels} g xhat and
dbias[c] = sum_{n, pixels} g. Both need only the per-(image, channel) sums of g and g x.

Where the fast path does not apply (GPU, dtypes other than float32, NCHW tensors, under
torch.compile, which fuses torch's own ops), the module is torch's F.group_norm and
F.silu. The numba kernels release the GIL, so ddpmkit's worker threads
(batch_threads.py) run them in parallel.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def _kernel(function):  # type: ignore[no-untyped-def]
    """numba.njit, releasing the GIL, its machine code cached on disk: compiling the
    kernels takes about 7 s, once per machine rather than once per process."""
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:
        # numba found no writable cache directory (read-only install, no writable home):
        # still correct, only each process compiles on its first call.
        return numba.njit(nogil=True)(function)


@_kernel
def _forward_coefficients(x, weight, bias, groups, eps, scale, shift, mean, rstd):  # type: ignore[no-untyped-def]
    """GroupNorm as y = scale[n, c] * x + shift[n, c]. x: (N, H*W, C) float32; fills
    scale, shift (N, C) float32 and each group's mean, rstd (N, G) float64."""
    images, pixels, channels = x.shape
    per_group = channels // groups
    elements = pixels * per_group
    sum_x = np.empty(channels, np.float64)
    sum_x_squared = np.empty(channels, np.float64)
    for n in range(images):
        sum_x[:] = 0.0
        sum_x_squared[:] = 0.0
        for p in range(pixels):
            for c in range(channels):  # contiguous: the loop that vectorises
                value = np.float64(x[n, p, c])
                sum_x[c] += value
                sum_x_squared[c] += value * value
        for k in range(groups):
            group = slice(k * per_group, (k + 1) * per_group)
            group_mean = sum_x[group].sum() / elements
            # E[x^2] - mean^2 from float64 sums: no cancellation at float32 scales.
            variance = max(sum_x_squared[group].sum() / elements - group_mean * group_mean, 0.0)
            mean[n, k] = group_mean
            rstd[n, k] = 1.0 / np.sqrt(variance + eps)
            for c in range(k * per_group, (k + 1) * per_group):
                scale[n, c] = rstd[n, k] * weight[c]
                shift[n, c] = bias[c] - group_mean * rstd[n, k] * weight[c]


@numba.njit(inline="always")
def _gradient_at_norm(grad_output, x, sigmoid, scale, shift, silu, n, p, g):  # type: ignore[no-untyped-def]
    """g[c] = dL/d(GroupNorm output) at image n, pixel p: grad_output, times
    SiLU'(z) = s (1 + z (1 - s)) with z = scale x + shift recomputed and s = sigmoid(z)
    saved by the forward. Written into the row buffer g: loops that read and write fewer
    arrays each are ones LLVM can prove free of aliasing and vectorise (computing g inside
    the loops that use it made the backward kernels several times slower)."""
    if silu:
        for c in range(x.shape[2]):
            z = scale[n, c] * x[n, p, c] + shift[n, c]
            s = sigmoid[n, p, c]
            g[c] = grad_output[n, p, c] * s * (np.float32(1.0) + z * (np.float32(1.0) - s))
    else:
        for c in range(x.shape[2]):
            g[c] = grad_output[n, p, c]


@_kernel
def _backward_coefficients(  # type: ignore[no-untyped-def]
    grad_output, x, sigmoid, scale, shift, silu, weight, mean, rstd, groups, g_scale, x_scale, offset, grad_weight, grad_bias
):
    """The input gradient as dx = g_scale[n, c] g + x_scale[n, c] x + offset[n, c] (module
    docstring), and dweight, dbias (float64, accumulated over images) from one pass."""
    images, pixels, channels = x.shape
    per_group = channels // groups
    elements = pixels * per_group
    # Two loops over the images, not one: with the coefficient stores in the same loop as
    # the pixel sums, LLVM no longer vectorised the sums.
    sum_g = np.zeros((images, channels), np.float64)
    sum_gx = np.zeros((images, channels), np.float64)
    g = np.empty(channels, np.float32)
    for n in range(images):
        for p in range(pixels):
            _gradient_at_norm(grad_output, x, sigmoid, scale, shift, silu, n, p, g)
            for c in range(channels):
                sum_g[n, c] += g[c]
                sum_gx[n, c] += np.float64(g[c]) * x[n, p, c]
    for n in range(images):
        for k in range(groups):
            weighted_g = 0.0  # M P
            weighted_g_xhat = 0.0  # M Q
            for c in range(k * per_group, (k + 1) * per_group):
                sum_g_xhat = (sum_gx[n, c] - mean[n, k] * sum_g[n, c]) * rstd[n, k]
                weighted_g += weight[c] * sum_g[n, c]
                weighted_g_xhat += weight[c] * sum_g_xhat
                grad_weight[c] += sum_g_xhat
                grad_bias[c] += sum_g[n, c]
            group_x_scale = -rstd[n, k] ** 2 * weighted_g_xhat / elements
            group_offset = -group_x_scale * mean[n, k] - rstd[n, k] * weighted_g / elements
            for c in range(k * per_group, (k + 1) * per_group):
                g_scale[n, c] = rstd[n, k] * weight[c]
                x_scale[n, c] = group_x_scale
                offset[n, c] = group_offset


@_kernel
def _input_gradient(grad_output, x, sigmoid, scale, shift, silu, g_scale, x_scale, offset, grad_input):  # type: ignore[no-untyped-def]
    images, pixels, channels = x.shape
    g = np.empty(channels, np.float32)
    for n in range(images):
        for p in range(pixels):
            _gradient_at_norm(grad_output, x, sigmoid, scale, shift, silu, n, p, g)
            for c in range(channels):
                grad_input[n, p, c] = g_scale[n, c] * g[c] + x_scale[n, c] * x[n, p, c] + offset[n, c]


def _pixels_by_channel(x: torch.Tensor) -> np.ndarray:
    """The (N, H*W, C) numpy view of a channels_last (N, C, H, W) tensor's memory."""
    batch, channels = x.shape[:2]
    return x.detach().permute(0, 2, 3, 1).view(batch, -1, channels).numpy()


def _per_image_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, ...]:
    """GroupNorm(x) (a fresh channels_last tensor), and the scale, shift, mean and rstd that
    produced it."""
    batch, channels = x.shape[:2]
    scale, shift = torch.empty(batch, channels), torch.empty(batch, channels)
    mean, rstd = torch.empty(batch, groups, dtype=torch.float64), torch.empty(batch, groups, dtype=torch.float64)
    _forward_coefficients(
        _pixels_by_channel(x), weight.detach().numpy(), bias.detach().numpy(), groups, eps,
        scale.numpy(), shift.numpy(), mean.numpy(), rstd.numpy(),
    )
    normalised = torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None])
    return normalised, scale, shift, mean, rstd


class _ChannelsLastGroupNorm(torch.autograd.Function):
    """GroupNorm (+ SiLU) with the closed-form backward of the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float, silu: bool) -> torch.Tensor:
        y, scale, shift, mean, rstd = _per_image_affine(x, weight, bias, groups, eps)
        # With SiLU, keep sigmoid(z) rather than z: SiLU's derivative is then arithmetic the
        # backward kernels fuse in, not a separate pass with exponentials.
        sigmoid = torch.sigmoid(y) if silu else torch.empty(0)
        if silu:
            y.mul_(sigmoid)
        ctx.groups, ctx.silu = groups, silu
        ctx.save_for_backward(x, weight, scale, shift, mean, rstd, sigmoid)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, scale, shift, mean, rstd, sigmoid = ctx.saved_tensors
        grad_output = grad_output.contiguous(memory_format=torch.channels_last)
        batch, channels = x.shape[:2]
        g_scale, x_scale, offset = (np.empty((batch, channels), np.float32) for _ in range(3))
        grad_weight, grad_bias = np.zeros(channels), np.zeros(channels)
        pixel_arrays = [_pixels_by_channel(t) for t in (grad_output, x)]
        pixel_arrays.append(_pixels_by_channel(sigmoid) if ctx.silu else pixel_arrays[0])  # unread without SiLU
        tensors = (*pixel_arrays, scale.numpy(), shift.numpy(), ctx.silu)
        _backward_coefficients(
            *tensors, weight.detach().numpy(), mean.numpy(), rstd.numpy(), ctx.groups, g_scale, x_scale, offset, grad_weight, grad_bias
        )
        grad_input = torch.empty_like(x, memory_format=torch.channels_last)
        _input_gradient(*tensors, g_scale, x_scale, offset, _pixels_by_channel(grad_input))
        grad_weight, grad_bias = (torch.as_tensor(grad, dtype=weight.dtype) for grad in (grad_weight, grad_bias))
        return grad_input, grad_weight, grad_bias, None, None, None


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, followed by SiLU if ``silu``; the same parameters and state-dict keys.
    On channels_last float32 CPU tensors it takes the fast path of the module docstring."""

    def __init__(self, num_groups: int, num_channels: int, silu: bool = False, eps: float = 1e-5) -> None:
        super().__init__(num_groups, num_channels, eps=eps)
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast_path_applies(x, self.weight):
            y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            return F.silu(y, inplace=not torch.is_grad_enabled()) if self.silu else y
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or self.bias.requires_grad):
            return _ChannelsLastGroupNorm.apply(x, self.weight, self.bias, self.num_groups, self.eps, self.silu)
        y = _per_image_affine(x, self.weight, self.bias, self.num_groups, self.eps)[0]
        return F.silu(y, inplace=True) if self.silu else y  # y is ours: in place spares a pass

    def extra_repr(self) -> str:
        return super().extra_repr() + (", silu=True" if self.silu else "")


def _fast_path_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.compiler.is_compiling()
    )
