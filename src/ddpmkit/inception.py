"""The FID Inception-v3 network and its weights file.

The Inception-v3 of TensorFlow's original FID code ("2015-12-05" graph), as ported to
PyTorch by pytorch-fid (weights file pt_inception-2015-12-05-6726825d.pth). It is
torchvision's Inception-v3 layout with 1008 classes and no auxiliary head, plus three
differences of the TensorFlow graph: average pools ignore the zero padding
(count_include_pad=False), and the last block pools with max instead of average.
Module names match the file's state-dict keys, so it loads strictly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .choices import INCEPTION_WEIGHTS_FILE
from .errors import CheckpointError, DdpmError
from .io import cache_root, file_sha256, load_weights

INCEPTION_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_FILE
# torch.hub's convention: the file name carries the first hex digits of its SHA-256.
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_FEATURE_DIM = 2048
_INCEPTION_SIZE = 299


class _FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics (the network is only ever evaluated).

    eps = 0.001 as in TensorFlow's Inception (and torchvision's port).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=0.001)


class _BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm -> ReLU, torchvision's BasicConv2d."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = _FrozenBatchNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_average_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


class _InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = _BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = _BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = _BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_average_pool(x)),
        ], dim=1)


class _InceptionB(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = _BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class _InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = _BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = _BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = _BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_tf_average_pool(x)),
        ], dim=1)


class _InceptionD(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = _BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = _BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = _BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], dim=1)


class _InceptionE(nn.Module):
    def __init__(self, in_channels: int, pool: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = _BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = _BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = _BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = _BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(self.pool(x)),
        ], dim=1)


class FIDInceptionV3(nn.Module):
    """Images in [-1, 1] (B, 1 or 3, H, W) -> the 2048 pool3 features of FID.

    As pytorch-fid: resized to 299 x 299 bilinearly (align_corners=False, no
    antialiasing); grayscale is repeated to three channels. pytorch-fid resizes images
    in [0, 1] and then maps them to [-1, 1]; bilinear interpolation commutes with that
    affine map, so resizing the [-1, 1] image is the same up to float rounding.
    ``fc`` (the 1008 logits) is not used for the features; it is kept so the weights
    file loads with every key checked.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = _BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = _BasicConv2d(80, 192, 3)
        self.Mixed_5b = _InceptionA(192, pool_features=32)
        self.Mixed_5c = _InceptionA(256, pool_features=64)
        self.Mixed_5d = _InceptionA(288, pool_features=64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, channels_7x7=128)
        self.Mixed_6c = _InceptionC(768, channels_7x7=160)
        self.Mixed_6d = _InceptionC(768, channels_7x7=160)
        self.Mixed_6e = _InceptionC(768, channels_7x7=192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, pool=_tf_average_pool)
        self.Mixed_7c = _InceptionE(2048, pool=_max_pool_same)  # max pool: the TF graph's quirk
        self.fc = nn.Linear(INCEPTION_FEATURE_DIM, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(_INCEPTION_SIZE, _INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # pool3: global average pooling


def inception_weights_path(path: str | Path | None = None) -> Path:
    """The FID Inception weights file: ``path``, else ``<cache>/inception/``, else torch.hub's
    checkpoint folder (where pytorch-fid keeps it), else downloaded into ``<cache>/inception/``."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DdpmError(f"Inception weights file {path} does not exist")
        return path
    folder = cache_root() / "inception"
    for candidate in (folder / INCEPTION_WEIGHTS_FILE, Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE):
        if candidate.is_file():
            return candidate
    try:
        import pooch  # only when a download is needed (data.py's _fetch says why)

        # No known_hash: the SHA-256 prefix is checked by load_inception like any found file.
        return Path(pooch.retrieve(INCEPTION_WEIGHTS_URL, known_hash=None, fname=INCEPTION_WEIGHTS_FILE, path=folder))
    except (ImportError, OSError, ValueError) as exc:
        reason = f"{exc.name} is not installed" if isinstance(exc, ImportError) else type(exc).__name__
        raise DdpmError(
            f"the FID Inception weights are not here and could not be downloaded ({reason}); "
            f"put {INCEPTION_WEIGHTS_FILE} (from {INCEPTION_WEIGHTS_URL}) into {folder}"
        ) from None


def load_inception(path: str | Path | None = None, *, device: str | torch.device = "cpu") -> tuple[FIDInceptionV3, str]:
    """The FID Inception network with its weights, in eval mode, and the weights file's SHA-256."""
    path = inception_weights_path(path)
    sha256 = file_sha256(path)
    if not sha256.startswith(INCEPTION_SHA256_PREFIX):
        raise CheckpointError(f"{path} is not the FID Inception weights file (its SHA-256 does not start with {INCEPTION_SHA256_PREFIX})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (pickle, zip, runtime) on a damaged file
        raise CheckpointError(f"{path} is not a readable torch weights file ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    # torchvision's batch norms also store a training-step counter, meaningless here.
    state = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    network = FIDInceptionV3()
    load_weights(network, state, source=str(path))
    return network.to(device).eval(), sha256
