"""The noise-prediction network eps_theta(x_t, t[, y]): the UNet of Ho et al. 2020.

Layout (Ho et al. 2020, appendix B; the structure of improved-diffusion, Nichol & Dhariwal
2021), with the poster's defaults (3 levels of 64/128/128 channels, 2 ResBlocks each)::

    input 3x3 conv (in_channels -> base)
    down path: per level, num_res_blocks ResBlocks (+ self-attention at attention_levels),
               then a stride-2 3x3 conv to the next level (none after the last level)
    middle:    ResBlock, [self-attention: middle_attention, default if the lowest level has it], ResBlock
    up path:   per level, num_res_blocks + 1 ResBlocks (+ self-attention), each fed the
               concatenation of the running features and one skip connection, then
               nearest x2 upsampling + 3x3 conv (none after level 0)
    output:    GroupNorm -> SiLU -> 3x3 conv (base -> out_channels), zero-initialised

Why num_res_blocks + 1 blocks on the way up: every activation saved on the way down
(the input conv's output, each ResBlock's output and each downsampler's output: that is
num_res_blocks + 1 per level) is consumed by exactly one up-path block, at the same
resolution. This is the DDPM / improved-diffusion wiring.

The timestep enters every ResBlock as an embedding of the *index* i (0-based; index i
is the paper's step t = i + 1, see schedules.py). A class label, if the model is
conditional, is embedded and added to that same embedding (Ho & Salimans 2022); the
extra embedding slot ``null_label`` means "no label" for classifier-free guidance.

The options after ``dropout`` in UNetConfig describe released models whose layout differs
in details from ddpmkit's own (Ho et al.'s model, as diffusers' UNet2DModel holds it:
interop.py). Each default is ddpmkit's own layout, so configs and checkpoints written
before an option existed load and compute as they did.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .group_norm import GroupNorm
from .validation import check_dataclass_fields, require

# "No label" in a label tensor: the label-dropout marker of training and the unconditional
# half of classifier-free guidance; the UNet maps every negative label to its null slot.
NO_LABEL = -1

DownsamplePadding = Literal["symmetric", "bottom-right"]
DEFAULT_NORM_EPS = 1e-5  # torch's GroupNorm default, which ddpmkit's models were trained with


@dataclass(frozen=True)
class UNetConfig:
    """The UNet's constructor arguments; validated on construction, JSON-serialisable.

    Lists (as read back from JSON or TOML) are accepted for the tuple fields.
    ``out_channels=None`` means "as many as in_channels" (noise has the image's shape).

    Layout options (defaults: ddpmkit's own layout; Ho et al.'s released model in brackets):

    * ``timestep_frequency_shift`` s and ``timestep_cos_first``: the sinusoidal timestep
      embedding's frequencies and half order (timestep_embedding) [s = 1, sines first].
    * ``middle_attention``: self-attention between the two middle ResBlocks; None: when
      the lowest level has attention [True, with attention at level 1 of 4 only].
    * ``downsample_padding``: "symmetric", one pixel of zeros on every side of the stride-2
      conv, or "bottom-right", one row and column of zeros after the image and none before
      (TensorFlow's "SAME" padding for even sizes) ["bottom-right"].
    * ``norm_groups``: one group count for every GroupNorm; None: group_count of each
      norm's width [32]. ``norm_eps``: GroupNorm's epsilon [1e-6].
    * ``attention_head_dim``: the width of each attention head; None: one head as wide as
      the channels [None].
    * ``null_label_embedding``: whether a conditional model has the extra "no label"
      embedding row of classifier-free guidance; False for a model trained with a label
      on every image, which then needs a label for every image.
    """

    in_channels: int = 1
    out_channels: int | None = None
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = ()
    num_classes: int | None = None
    dropout: float = 0.0
    timestep_frequency_shift: int = 0
    timestep_cos_first: bool = False
    middle_attention: bool | None = None
    downsample_padding: DownsamplePadding = "symmetric"
    norm_groups: int | None = None
    norm_eps: float = DEFAULT_NORM_EPS
    attention_head_dim: int | None = None
    null_label_embedding: bool = True

    def __post_init__(self) -> None:
        check_dataclass_fields(self)
        require(self.in_channels >= 1, "in_channels must be >= 1")
        require(self.out_channels is None or self.out_channels >= 1, "out_channels must be >= 1")
        require(self.base_channels >= 1, "base_channels must be >= 1")
        require(len(self.channel_mults) >= 1 and min(self.channel_mults) >= 1, "channel_mults must be a non-empty list of integers >= 1")
        require(self.num_res_blocks >= 1, "num_res_blocks must be >= 1")
        bad = [level for level in self.attention_levels if not 0 <= level < self.num_levels]
        require(not bad, f"attention level(s) {bad} out of range: the model has levels 0..{self.num_levels - 1}")
        require(self.num_classes is None or self.num_classes >= 1, "num_classes must be >= 1 (or None for an unconditional model)")
        require(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        half = self.base_channels // 2
        require(  # the frequencies divide by half - shift
            0 <= self.timestep_frequency_shift < max(half, 1),
            f"timestep_frequency_shift must be in [0, {half}) (half the embedding's width, base_channels / 2)",
        )
        require(self.norm_groups is None or self.norm_groups >= 1, "norm_groups must be >= 1 (or None for group_count's rule)")
        require(self.norm_eps > 0, "norm_eps must be > 0")
        require(self.attention_head_dim is None or self.attention_head_dim >= 1, "attention_head_dim must be >= 1 (or None for one head)")
        require(
            self.null_label_embedding or self.num_classes is not None,
            "null_label_embedding=False describes a conditional model; it needs num_classes",
        )

    @property
    def num_levels(self) -> int:
        return len(self.channel_mults)

    @property
    def has_middle_attention(self) -> bool:
        return self.num_levels - 1 in self.attention_levels if self.middle_attention is None else self.middle_attention

    def check_input_size(self, image_size: int, channels: int) -> None:
        """Raise ConfigError unless (channels, image_size, image_size) images fit this UNet.

        Each of the num_levels - 1 downsamplers halves the size, and the up path must
        restore it exactly so the skip connections line up: the size must be divisible
        by 2 ** (num_levels - 1).
        """
        if channels != self.in_channels:
            raise ConfigError(f"images have {channels} channel(s) but the model was built for in_channels={self.in_channels}")
        halvings = self.num_levels - 1
        factor = 2**halvings
        if image_size < 1 or image_size % factor:
            below = image_size // factor * factor
            options = f"{below} or {below + factor}" if below > 0 else str(factor)
            times = {1: "once", 2: "twice"}.get(halvings, f"{halvings} times")
            raise ConfigError(
                f"image size {image_size} is not divisible by {factor} "
                f"({self.num_levels} levels halve it {times}); use {options}"
            )


def group_count(channels: int) -> int:
    """GroupNorm groups: the largest divisor of ``channels`` that is <= 32 (Ho et al.,
    Wu & He) and leaves at least 2 channels per group.

    Why at least 2: with one channel per group GroupNorm is instance norm, which removes
    each channel's spatial mean; a narrow model (16 or 32 channels) then cannot pass the
    image's mean level from x_t to the predicted noise, and samples come out with grey
    or white backgrounds (measured on mnist-5k: the noise prediction's mean error stayed
    at the size of the noise's own mean, 1/28, at every t). With two or more channels per
    group the mean survives as a difference between channels. The poster's 64 and 128
    channels get Ho's 32 groups.
    """
    return max(groups for groups in range(1, 33) if channels % groups == 0 and (channels // groups >= 2 or groups == 1))


def group_norm(channels: int, silu: bool = False, *, groups: int | None = None, eps: float = DEFAULT_NORM_EPS) -> GroupNorm:
    """GroupNorm over ``channels`` in ``groups`` groups (None: group_count(channels))."""
    groups = group_count(channels) if groups is None else groups
    if channels % groups:
        raise ConfigError(f"norm_groups={groups} does not divide the {channels} channels of one of the model's GroupNorms")
    return GroupNorm(groups, channels, silu=silu, eps=eps)


NormFactory = Callable[..., GroupNorm]  # (channels, silu=False) -> GroupNorm: group_norm with the model's settings


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)


def timestep_embedding(t: torch.Tensor, dim: int, frequency_shift: int = 0, cos_first: bool = False) -> torch.Tensor:
    """Sinusoidal embedding of step indices t (B,) -> (B, dim), in float32.

    Vaswani et al. 2017, sec. 3.5: frequencies 1 / 10000^(k / (half - s)), k = 0 .. half - 1,
    half = dim // 2. The shift s = 0 is Vaswani's 1 / 10000^(2k/dim); s = 1 is Ho et al.'s
    released model (diffusers' ``freq_shift``), whose lowest frequency is exactly 1/10000.
    The sines fill the first half and the cosines the second (``cos_first``: the other way
    round) instead of interleaving: a fixed permutation, which the Linear layer that follows
    absorbs. An odd dim gets a zero last column. Computed in float32 even under bf16/fp16,
    where t * frequency for t near 1000 would lose the phase.
    """
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - frequency_shift))
    angles = t.to(torch.float32)[:, None] * frequencies[None, :]
    halves = [torch.cos(angles), torch.sin(angles)] if cos_first else [torch.sin(angles), torch.cos(angles)]
    return F.pad(torch.cat(halves, dim=1), (0, dim % 2))


class ResBlock(nn.Module):
    """Residual block with the timestep (and label) embedding added between its convs.

    ``activated_embedding`` is SiLU(embedding), computed once per forward by the UNet
    rather than once in every block.
    """

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, dropout: float, norm: NormFactory = group_norm) -> None:
        super().__init__()
        self.norm1 = norm(in_channels, silu=True)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.embedding_projection = nn.Linear(embedding_dim, out_channels)
        self.norm2 = norm(out_channels, silu=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, activated_embedding: torch.Tensor) -> torch.Tensor:
        # norm1 and norm2 include the SiLU (group_norm.py). The adds are in place to spare
        # memory traffic (a conv's backward does not need its output).
        h = self.conv1(self.norm1(x))
        h += self.embedding_projection(activated_embedding)[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        return h.add_(self.skip(x))


class SelfAttention(nn.Module):
    """Self-attention over the H*W pixels, with a residual connection: one head as wide as
    the channels, or heads of width ``head_dim``.

    The 1x1 projections are written as Linear layers over the channel axis of the pixel
    sequence: the same maths as 1x1 convs, without layout changes around them. The
    permute/reshape pair is a free view for channels_last inputs. Head h owns channels
    h * head_dim .. (h + 1) * head_dim - 1 of each of Q, K and V.
    """

    def __init__(self, channels: int, head_dim: int | None = None, norm: NormFactory = group_norm) -> None:
        super().__init__()
        if head_dim is not None and channels % head_dim:
            raise ConfigError(f"attention_head_dim={head_dim} does not divide the {channels} channels of an attention layer")
        self.heads = 1 if head_dim is None else channels // head_dim
        self.norm = norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        pixels = self.norm(x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        query, key, value = (part.unflatten(-1, (self.heads, -1)).transpose(1, 2) for part in self.qkv(pixels).chunk(3, dim=-1))
        # softmax(Q K^T / sqrt(d)) V per head (Vaswani et al. eq. 1), d the head's width.
        attended = F.scaled_dot_product_attention(query, key, value).transpose(1, 2)
        return x + self.out(attended.reshape(batch, height, width, channels)).permute(0, 3, 1, 2)


class ResAttentionBlock(nn.Module):
    """A ResBlock, followed by self-attention at the levels that have it."""

    def __init__(
        self, in_channels: int, out_channels: int, embedding_dim: int, dropout: float, attention: bool,
        norm: NormFactory = group_norm, head_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, embedding_dim, dropout, norm)
        self.attention = SelfAttention(out_channels, head_dim, norm) if attention else None

    def forward(self, x: torch.Tensor, activated_embedding: torch.Tensor) -> torch.Tensor:
        x = self.res(x, activated_embedding)
        return x if self.attention is None else self.attention(x)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv (Ho et al.'s learned downsampling), the image
    padded as ``padding`` says (UNetConfig)."""

    def __init__(self, channels: int, padding: DownsamplePadding = "symmetric") -> None:
        super().__init__()
        self.pad_bottom_right = padding == "bottom-right"
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0 if self.pad_bottom_right else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_bottom_right else x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownLevel(nn.Module):
    """One resolution of the down path; pushes every output it makes onto ``skips``."""

    def __init__(self, blocks: list[ResAttentionBlock], downsample: Downsample | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, h: torch.Tensor, activated_embedding: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, activated_embedding)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)
            skips.append(h)
        return h


class UpLevel(nn.Module):
    """One resolution of the up path; each block pops (consumes) one skip connection."""

    def __init__(self, blocks: list[ResAttentionBlock], upsample: Upsample | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.upsample = upsample

    def forward(self, h: torch.Tensor, activated_embedding: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for block in self.blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), activated_embedding)
        return h if self.upsample is None else self.upsample(h)


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): predicts the noise in x_t, same shape as x_t.

    Call ``model(x_t, t)`` or ``model(x_t, t, y)``. ``t`` holds int64 step *indices*
    (0 .. T-1; index i is step t = i + 1), shape (B,), or one index (python int or 0-d
    tensor) for the whole batch. ``y`` holds class labels in 0 .. num_classes - 1; NO_LABEL (-1) or
    ``null_label`` means "no label", and y=None means "no label" for the whole batch.
    ``null_label`` is num_classes (None for an unconditional model); a model without the
    "no label" embedding (``null_label_embedding=False``) has null_label -1 and refuses it.

    The keyword arguments are UNetConfig's fields (its defaults where left out).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        config = UNetConfig(**options)
        self.config = config
        has_null_row = config.num_classes is not None and config.null_label_embedding
        self.null_label: int | None = None
        if config.num_classes is not None:
            self.null_label = config.num_classes if has_null_row else NO_LABEL
        base = config.base_channels
        embedding_dim = 4 * base  # as in Ho et al.'s released model: the timestep MLP is 4x the base width

        self.time_mlp = nn.Sequential(nn.Linear(base, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))
        # num_classes + 1 rows: the last one is the learned "no label" embedding.
        self.label_embedding = nn.Embedding(config.num_classes + has_null_row, embedding_dim) if config.num_classes is not None else None
        norm = partial(group_norm, groups=config.norm_groups, eps=config.norm_eps)

        def block(in_ch: int, out_ch: int, attention: bool) -> ResAttentionBlock:
            return ResAttentionBlock(in_ch, out_ch, embedding_dim, config.dropout, attention, norm, config.attention_head_dim)

        self.input_conv = conv3x3(config.in_channels, base)
        widths = [base * mult for mult in config.channel_mults]
        last = config.num_levels - 1
        skip_widths = [base]  # channel counts of the activations the down path saves
        channels = base
        down = []
        for level, width in enumerate(widths):
            attention = level in config.attention_levels
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(block(channels, width, attention))
                channels = width
                skip_widths.append(channels)
            downsample = None
            if level < last:
                downsample = Downsample(channels, config.downsample_padding)
                skip_widths.append(channels)
            down.append(DownLevel(blocks, downsample))
        self.down = nn.ModuleList(down)

        self.middle = nn.ModuleList([block(channels, channels, config.has_middle_attention), block(channels, channels, False)])

        up = []
        for level in reversed(range(config.num_levels)):
            attention = level in config.attention_levels
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(block(channels + skip_widths.pop(), widths[level], attention))
                channels = widths[level]
            up.append(UpLevel(blocks, Upsample(channels) if level > 0 else None))
        self.up = nn.ModuleList(up)

        out_channels = config.in_channels if config.out_channels is None else config.out_channels
        # Keys "0" and "2", as when a separate SiLU module sat between the two: checkpoints
        # written before GroupNorm took the SiLU in load unchanged.
        self.output = nn.Sequential(OrderedDict([("0", norm(channels, silu=True)), ("2", conv3x3(channels, out_channels))]))
        # Zero-initialised (improved-diffusion): a fresh model predicts eps = 0, the mean of
        # the target, so the first loss is ~1 and the first updates do not have to undo a
        # random output layer's large, arbitrary predictions.
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)
        # channels_last (NHWC) weights and activations: the same model and the same maths
        # in another memory layout, in which oneDNN's CPU convolutions, GroupNorm and the
        # attention's pixel-sequence view need no layout copies (the gain is measured in
        # benchmarks/README.md). cuDNN prefers it too.
        self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, config: UNetConfig) -> UNet:
        return cls(**asdict(config))

    # Usable before any model exists: UNet.check_input_size(config, image_size, channels).
    check_input_size = staticmethod(UNetConfig.check_input_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None = None) -> torch.Tensor:
        batch = self._check_image_batch(x)
        t = self._batch_of_indices(t, batch, x.device)
        config = self.config
        embedding = self.time_mlp(
            timestep_embedding(t, config.base_channels, config.timestep_frequency_shift, config.timestep_cos_first).to(x.dtype)
        )
        if self.label_embedding is not None:
            embedding = embedding + self.label_embedding(self._labels_or_null(y, batch, x.device))
        elif y is not None:
            raise ConfigError("class labels were given to an unconditional model (built with num_classes=None)")
        activated_embedding = F.silu(embedding)  # every ResBlock starts its projection with SiLU

        h = self.input_conv(x.contiguous(memory_format=torch.channels_last))
        skips = [h]
        for level in self.down:
            h = level(h, activated_embedding, skips)
        for block in self.middle:
            h = block(h, activated_embedding)
        for level in self.up:
            h = level(h, activated_embedding, skips)
        return self.output(h)

    def _check_image_batch(self, x: torch.Tensor) -> int:
        if x.dim() != 4:
            raise ConfigError(f"expected a batch of images shaped (B, C, H, W), got shape {tuple(x.shape)}")
        batch, channels, height, width = x.shape
        if height != width:
            raise ConfigError(f"images are {height}x{width}; the UNet needs square images")
        self.config.check_input_size(height, channels)
        return batch

    @staticmethod
    def _batch_of_indices(t: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.is_floating_point() or t.is_complex():
            raise ConfigError(f"t must hold integer step indices (index i is step t = i + 1), got dtype {t.dtype}")
        if t.dim() == 0:
            return t.expand(batch)
        if t.shape != (batch,):
            raise ConfigError(f"t must have shape ({batch},) (one index per image) or be a single index, got {tuple(t.shape)}")
        return t

    def _labels_or_null(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if y is None:
            if self.null_label == NO_LABEL:
                raise self._no_null_embedding()
            return torch.full((batch,), self.null_label, dtype=torch.long, device=device)
        if y.shape != (batch,):
            raise ConfigError(f"y must have shape ({batch},) (one label per image), got {tuple(y.shape)}")
        if self.null_label == NO_LABEL:
            if bool((y < 0).any()):
                raise self._no_null_embedding()
            return y
        return torch.where(y < 0, self.null_label, y)  # NO_LABEL, or any negative label

    @staticmethod
    def _no_null_embedding() -> ConfigError:
        return ConfigError(
            'this conditional model has no "no label" embedding (null_label_embedding=False): every image needs a class '
            "label (--class), and classifier-free guidance is not possible"
        )
