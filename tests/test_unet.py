"""The noise-prediction UNet: shapes, embeddings, labels, validation, layout, gradients."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from ddpmkit import ConfigError
from ddpmkit.unet import SelfAttention, UNet, UNetConfig, group_count, timestep_embedding

TINY = dict(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1)


def tiny(**changes) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**TINY, **changes})


def with_random_output(model: UNet) -> UNet:
    """A zero-initialised output conv hides everything upstream; give it weights."""
    torch.manual_seed(1)
    torch.nn.init.normal_(model.output[-1].weight, std=0.1)
    torch.nn.init.normal_(model.output[-1].bias, std=0.1)
    return model


def images(batch: int = 2, channels: int = 1, size: int = 28) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(2))


# --- shapes ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "options",
    [
        {},
        {"attention_levels": (0,)},
        {"attention_levels": (1,)},
        {"attention_levels": (2,)},
        {"num_classes": 10},
        {"dropout": 0.1},
        {"channel_mults": (1, 2)},
        {"in_channels": 3},
        {"in_channels": 3, "out_channels": 6},
    ],
    ids=["plain", "attn0", "attn1", "attn2", "conditional", "dropout", "two-levels", "rgb", "rgb-6-out"],
)
@pytest.mark.parametrize("size", [28, 32])
def test_output_has_the_input_shape(options, size):
    model = tiny(**options)
    x = images(channels=model.config.in_channels, size=size)
    y = torch.tensor([3, -1]) if "num_classes" in options else None
    out = model(x, torch.tensor([0, 999]), y)
    expected_channels = options.get("out_channels", model.config.in_channels)
    assert out.shape == (2, expected_channels, size, size)


def test_parameter_count_of_a_one_level_model_matches_a_hand_count():
    # base 8, one level, 1 ResBlock down, 2 up (each eats one skip of 8 channels):
    # time MLP (8*32+32)+(32*32+32)=1344, input conv 1*8*9+8=80,
    # ResBlock 8->8: norms 16+16, convs 2*(8*8*9+8), embedding proj 32*8+8 -> 1464,
    # down 1 + middle 2 blocks = 3*1464, up ResBlock 16->8: norms 32+16, conv1 16*8*9+8,
    # conv2 584, proj 264, 1x1 skip 16*8+8 -> 2192 (x2), output norm 16 + conv 8*9+1=73.
    expected = 1344 + 80 + 3 * 1464 + 2 * 2192 + 16 + 73
    model = UNet(base_channels=8, channel_mults=(1,), num_res_blocks=1)
    assert sum(p.numel() for p in model.parameters()) == expected == 10289


# --- embeddings -----------------------------------------------------------------------

def test_timestep_embedding_matches_the_sinusoid_closed_form():
    # dim 8: 4 frequencies 1 / 10000^(k/4) = 1, 0.1, 0.01, 0.001; sines first, then cosines.
    embedding = timestep_embedding(torch.tensor([0, 1, 500]), 8)
    frequencies = [1.0, 0.1, 0.01, 0.001]
    for row, t in enumerate([0, 1, 500]):
        expected = [math.sin(t * f) for f in frequencies] + [math.cos(t * f) for f in frequencies]
        assert embedding[row].tolist() == pytest.approx(expected, abs=1e-5)
    assert embedding.dtype == torch.float32
    assert embedding[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_timestep_embedding_pads_an_odd_width_with_a_zero_column():
    embedding = timestep_embedding(torch.tensor([7]), 9)
    assert embedding.shape == (1, 9) and embedding[0, 8] == 0
    assert torch.equal(embedding[:, :8], timestep_embedding(torch.tensor([7]), 8))  # half = 4 in both


def test_timestep_embedding_with_a_frequency_shift_and_cosines_first():
    # dim 8, shift 1 (Ho et al.'s released model): frequencies 1 / 10000^(k/3) = 1, 10000^(-1/3), 10000^(-2/3), 1e-4.
    embedding = timestep_embedding(torch.tensor([0, 3, 700]), 8, frequency_shift=1, cos_first=True)
    frequencies = [10000.0 ** (-k / 3) for k in range(4)]
    for row, t in enumerate([0, 3, 700]):
        expected = [math.cos(t * f) for f in frequencies] + [math.sin(t * f) for f in frequencies]
        assert embedding[row].tolist() == pytest.approx(expected, abs=1e-5)


def test_timestep_changes_the_output_and_a_single_index_broadcasts():
    model = with_random_output(tiny()).eval()
    x = images()
    assert not torch.allclose(model(x, torch.tensor([0, 0])), model(x, torch.tensor([500, 500])))
    full = model(x, torch.tensor([17, 17]))
    assert torch.equal(model(x, 17), full)
    assert torch.equal(model(x, torch.tensor(17)), full)


@pytest.mark.parametrize("channels, groups", [(64, 32), (128, 32), (16, 8), (8, 4), (24, 12), (48, 24), (40, 20), (33, 11), (7, 1)])
def test_group_count_is_32_or_the_largest_divisor_with_two_channels_per_group(channels, groups):
    assert group_count(channels) == groups


def test_self_attention_matches_the_softmax_formula():
    torch.manual_seed(3)
    attention = SelfAttention(8)
    x = torch.randn(2, 8, 4, 4)
    pixels = attention.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    query, key, value = attention.qkv(pixels).chunk(3, dim=-1)
    weights = torch.softmax(query @ key.transpose(1, 2) / math.sqrt(8), dim=-1)  # Vaswani eq. 1
    expected = x + attention.out(weights @ value).transpose(1, 2).reshape(2, 8, 4, 4)
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)


# --- class labels ---------------------------------------------------------------------

def test_labels_change_the_output_and_the_null_label_equals_no_label():
    model = with_random_output(tiny(num_classes=10)).eval()
    assert model.null_label == 10
    x, t = images(), torch.tensor([100, 100])
    assert not torch.allclose(model(x, t, torch.tensor([1, 1])), model(x, t, torch.tensor([2, 2])))
    unlabelled = model(x, t)
    assert torch.equal(model(x, t, torch.tensor([10, 10])), unlabelled)
    assert torch.equal(model(x, t, torch.tensor([-1, -1])), unlabelled)
    assert not torch.allclose(model(x, t, torch.tensor([1, 1])), unlabelled)
    mixed = model(x, t, torch.tensor([-1, 4]))
    assert torch.equal(mixed[0], unlabelled[0])
    assert torch.equal(mixed[1], model(x, t, torch.tensor([4, 4]))[1])


def test_unconditional_model_has_no_null_label_and_refuses_labels():
    model = tiny()
    assert model.null_label is None
    with pytest.raises(ConfigError, match="unconditional"):
        model(images(), torch.tensor([1, 2]), torch.tensor([0, 1]))


# --- validation -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "options, message",
    [
        ({"attention_levels": (3,)}, "attention level(s) [3] out of range: the model has levels 0..2"),
        ({"attention_levels": (-1,)}, "out of range: the model has levels 0..2"),
        ({"channel_mults": ()}, "channel_mults must be a non-empty list"),
        ({"channel_mults": (1, 0)}, "channel_mults must be a non-empty list of integers >= 1"),
        ({"base_channels": 0}, "base_channels must be >= 1"),
        ({"num_res_blocks": 0}, "num_res_blocks must be >= 1"),
        ({"in_channels": 0}, "in_channels must be >= 1"),
        ({"out_channels": -1}, "out_channels must be >= 1"),
        ({"num_classes": 0}, "num_classes must be >= 1"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"dropout": -0.1}, "dropout must be in [0, 1)"),
        ({"base_channels": "64"}, "base_channels must be an integer"),
        ({"channel_mults": "1,2"}, "channel_mults must be a list of integers"),
    ],
)
def test_invalid_arguments_raise_config_error(options, message):
    with pytest.raises(ConfigError) as info:
        UNetConfig(**options)
    assert message in str(info.value)
    with pytest.raises(ConfigError):
        UNet(**options)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"timestep_frequency_shift": 32}, "timestep_frequency_shift must be in [0, 32)"),
        ({"norm_groups": 0}, "norm_groups must be >= 1"),
        ({"norm_eps": 0.0}, "norm_eps must be > 0"),
        ({"attention_head_dim": 0}, "attention_head_dim must be >= 1"),
        ({"null_label_embedding": False}, "null_label_embedding=False describes a conditional model"),
        ({"downsample_padding": "zero"}, "downsample_padding must be one of 'symmetric', 'bottom-right'"),
    ],
)
def test_invalid_layout_options_raise_config_error(options, message):
    with pytest.raises(ConfigError) as info:
        UNetConfig(**options)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"norm_groups": 3}, "norm_groups=3 does not divide the 8 channels"),
        ({"attention_levels": (1,), "attention_head_dim": 5}, "attention_head_dim=5 does not divide the 16 channels"),
    ],
)
def test_layout_options_that_do_not_divide_the_widths_are_refused_when_the_model_is_built(options, message):
    UNetConfig(**TINY, **options)  # valid on its own: the widths are only known to the model
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny(**options)


def test_middle_attention_is_independent_of_the_level_attention():
    assert tiny().middle[0].attention is None and tiny(attention_levels=(2,)).middle[0].attention is not None
    assert tiny(middle_attention=True).middle[0].attention is not None
    assert tiny(attention_levels=(2,), middle_attention=False).middle[0].attention is None


def test_attention_heads_match_the_per_head_softmax_formula():
    torch.manual_seed(3)
    attention = SelfAttention(8, head_dim=4)
    x = torch.randn(2, 8, 4, 4)
    pixels = attention.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    query, key, value = attention.qkv(pixels).chunk(3, dim=-1)
    heads = []
    for h in range(2):  # head h: channels 4h .. 4h + 3 of Q, K and V
        part = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(query[..., part] @ key[..., part].transpose(1, 2) / math.sqrt(4), dim=-1)
        heads.append(weights @ value[..., part])
    expected = x + attention.out(torch.cat(heads, dim=-1)).transpose(1, 2).reshape(2, 8, 4, 4)
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)


def test_bottom_right_padding_pads_after_the_image_only():
    from ddpmkit.unet import Downsample

    torch.manual_seed(4)
    down = Downsample(3, padding="bottom-right")
    x = torch.randn(1, 3, 8, 8)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert down(x).shape == (1, 3, 4, 4) and torch.equal(down(x), expected)


def test_a_model_without_the_no_label_row_refuses_no_label():
    model = tiny(num_classes=3, null_label_embedding=False)
    assert model.label_embedding.num_embeddings == 3 and model.null_label == -1
    model(images(), torch.tensor([1, 2]), torch.tensor([0, 2]))
    for y in (None, torch.tensor([0, -1])):
        with pytest.raises(ConfigError, match='no "no label" embedding'):
            model(images(), torch.tensor([1, 2]), y)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 1, 30, 30), "image size 30 is not divisible by 4 (3 levels halve it twice); use 28 or 32"),
        ((2, 1, 2, 2), "image size 2 is not divisible by 4 (3 levels halve it twice); use 4"),
        ((2, 1, 28, 32), "images are 28x32; the UNet needs square images"),
        ((2, 3, 28, 28), "images have 3 channel(s) but the model was built for in_channels=1"),
        ((1, 28, 28), "expected a batch of images shaped (B, C, H, W)"),
    ],
)
def test_bad_input_shapes_name_the_constraint(shape, message):
    with pytest.raises(ConfigError) as info:
        tiny()(torch.zeros(shape), 0)
    assert message in str(info.value)


def test_size_message_counts_halvings_for_deeper_models():
    with pytest.raises(ConfigError, match=r"not divisible by 8 \(4 levels halve it 3 times\); use 24 or 32"):
        UNetConfig(channel_mults=(1, 1, 2, 2)).check_input_size(28, 1)


def test_check_input_size_works_before_a_model_exists():
    config = UNetConfig(in_channels=3)
    UNet.check_input_size(config, 32, 3)  # fits: returns without error
    with pytest.raises(ConfigError, match="image size 30"):
        UNet.check_input_size(config, 30, 3)


@pytest.mark.parametrize(
    "t, y, message",
    [
        (torch.tensor([1, 2, 3]), None, "t must have shape (2,)"),
        (torch.tensor([0.5, 1.0]), None, "t must hold integer step indices"),
        (torch.tensor([1, 2]), torch.tensor([1, 2, 3]), "y must have shape (2,)"),
    ],
)
def test_bad_timesteps_and_labels_raise_config_error(t, y, message):
    with pytest.raises(ConfigError) as info:
        tiny(num_classes=10)(images(), t, y)
    assert message in str(info.value)


# --- configuration --------------------------------------------------------------------

def test_config_round_trips_through_json_and_from_config():
    config = UNetConfig(in_channels=3, base_channels=16, channel_mults=(1, 2), attention_levels=(1,), num_classes=10, dropout=0.1)
    again = UNetConfig(**json.loads(json.dumps(asdict(config))))  # JSON turns tuples into lists
    assert again == config and again.channel_mults == (1, 2)
    model = UNet.from_config(config)
    assert model.config == config
    assert UNet().config == UNetConfig()  # the constructor's defaults are the config's


# --- layout, gradients, initialisation, determinism -----------------------------------

def test_channels_last_gives_the_same_output():
    model = with_random_output(tiny(attention_levels=(0, 2), num_classes=10)).eval()
    x, t, y = images(size=32), torch.tensor([3, 700]), torch.tensor([5, -1])
    expected = model(x, t, y)
    model.to(memory_format=torch.channels_last)
    assert model.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_gradient_reaches_every_parameter():
    # Attention everywhere (incl. the middle), labels used: no parameter may be unused (DDP).
    model = with_random_output(tiny(channel_mults=(1, 2), attention_levels=(0, 1), num_classes=3))
    loss = model(images(), torch.tensor([10, 900]), torch.tensor([2, -1])).square().mean()
    loss.backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert dead == []


def test_fresh_model_predicts_zero_until_trained():
    model = tiny()
    x, t = images(), torch.tensor([5, 50])
    assert torch.equal(model(x, t), torch.zeros_like(x))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    F.mse_loss(model(x, t), torch.randn_like(x)).backward()
    optimizer.step()
    assert model(x, t).abs().max() > 0


def test_same_seed_gives_the_same_weights_and_outputs():
    first, second = tiny(dropout=0.2), tiny(dropout=0.2)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    with_random_output(first), with_random_output(second)
    x, t = images(), torch.tensor([1, 2])
    torch.manual_seed(5)
    out_first = first(x, t)  # train mode: dropout draws from the seeded generator
    torch.manual_seed(5)
    assert torch.equal(second(x, t), out_first)
    torch.manual_seed(6)
    assert not torch.equal(second(x, t), out_first)  # dropout is live in train mode
