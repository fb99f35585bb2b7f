"""GroupNorm (+ SiLU) with numba kernels on channels_last CPU tensors: the same numbers as
torch's GroupNorm, forward and backward, and torch's own path wherever the kernels do not apply.

The oracle is torch's F.group_norm (and F.silu) in float64 on the same values.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ddpmkit import group_norm as group_norm_module
from ddpmkit.group_norm import GroupNorm
from ddpmkit.unet import UNet

# (batch, channels, size, groups): the poster's shapes (2 and 4 channels per group, 7x7
# to 28x28), an odd size, one channel per group, and a single group.
SHAPES = [(2, 64, 28, 32), (3, 128, 7, 32), (2, 192, 14, 32), (2, 6, 5, 3), (2, 4, 3, 4), (1, 8, 4, 1)]


def channels_last(*shape: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(*shape, generator=generator) + offset).contiguous(memory_format=torch.channels_last)


def norm_with_random_affine(channels: int, groups: int, silu: bool) -> GroupNorm:
    norm = GroupNorm(groups, channels, silu=silu)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.5 * torch.randn(channels, generator=generator))
        norm.bias.copy_(0.5 * torch.randn(channels, generator=generator))
    return norm


def reference(norm: GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """torch's GroupNorm (+ SiLU) in float64: the oracle."""
    y = F.group_norm(x.double(), norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps)
    return F.silu(y) if norm.silu else y


@pytest.fixture
def kernel_calls(monkeypatch) -> list[str]:
    """Names of the numba kernels called, so a test can tell the fast path from torch's."""
    calls: list[str] = []
    for name in ("_forward_coefficients", "_backward_coefficients", "_input_gradient"):
        kernel = getattr(group_norm_module, name)
        monkeypatch.setattr(group_norm_module, name, lambda *args, _kernel=kernel, _name=name: calls.append(_name) or _kernel(*args))
    return calls


@pytest.mark.parametrize("silu", [False, True], ids=["norm", "norm+silu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_torch_group_norm(shape, silu, kernel_calls, device):
    # On a GPU the module is torch's GroupNorm (no kernel call), and must still be exact.
    on_cpu = device.type == "cpu"
    batch, channels, size, groups = shape
    norm = norm_with_random_affine(channels, groups, silu).to(device)
    x = channels_last(batch, channels, size, size, seed=1, offset=2.0).to(device)
    with torch.no_grad():
        out = norm(x)
    assert kernel_calls == (["_forward_coefficients"] if on_cpu else [])
    assert out.dtype == torch.float32 and out.device == x.device
    assert out.is_contiguous(memory_format=torch.channels_last) or not on_cpu  # the kernels' layout contract
    torch.testing.assert_close(out.double(), reference(norm, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("silu", [False, True], ids=["norm", "norm+silu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gradients_match_torch_group_norm(shape, silu, kernel_calls, device):
    on_cpu = device.type == "cpu"
    batch, channels, size, groups = shape
    norm = norm_with_random_affine(channels, groups, silu).to(device)
    x = channels_last(batch, channels, size, size, seed=1, offset=2.0).to(device).requires_grad_()
    upstream = channels_last(batch, channels, size, size, seed=2).to(device)
    out = norm(x)
    (out * upstream).sum().backward()
    assert kernel_calls == (["_forward_coefficients", "_backward_coefficients", "_input_gradient"] if on_cpu else [])

    x64 = x.detach().double().requires_grad_()
    weight64, bias64 = (p.detach().double().requires_grad_() for p in (norm.weight, norm.bias))
    y = F.group_norm(x64, groups, weight64, bias64, norm.eps)
    ((F.silu(y) if silu else y) * upstream.double()).sum().backward()
    torch.testing.assert_close(out.detach().double(), (F.silu(y) if silu else y).detach(), rtol=1e-5, atol=1e-5)
    assert x.grad.is_contiguous(memory_format=torch.channels_last) or not on_cpu
    for ours, oracle in ((x.grad, x64.grad), (norm.weight.grad, weight64.grad), (norm.bias.grad, bias64.grad)):
        scale = oracle.abs().max().item()
        torch.testing.assert_close(ours.double(), oracle, rtol=1e-4, atol=1e-5 * scale)


def test_statistics_survive_a_large_mean():
    # E[x^2] - mean^2 in float32 would lose every digit of a variance of 9 at a mean of 1e3
    # (x^2 ~ 1e6, float32 resolution ~0.1); the kernels sum in float64.
    norm = norm_with_random_affine(64, 32, silu=False)
    x = channels_last(2, 64, 28, 28, seed=3, offset=1000.0)
    with torch.no_grad():
        out = norm(x)
    torch.testing.assert_close(out.double(), reference(norm, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "make_input",
    [
        lambda: torch.randn(2, 64, 8, 8),  # NCHW
        lambda: torch.randn(2, 64, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last),
        lambda: torch.randn(2, 64, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last),
        lambda: torch.randn(2, 64, 8),  # (N, C, L)
    ],
    ids=["nchw", "float64", "bfloat16", "3d"],
)
def test_other_inputs_take_torch_group_norm(make_input, kernel_calls):
    norm = norm_with_random_affine(64, 32, silu=True)
    x = make_input()
    expected = F.silu(F.group_norm(x, 32, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps))
    with torch.no_grad():
        module = GroupNorm(32, 64, silu=True).to(x.dtype).requires_grad_(False)
        module.load_state_dict(norm.state_dict())
        result = module(x)
    assert kernel_calls == []
    assert torch.equal(result, expected)


def test_inference_mode_and_autograd_give_the_same_output(kernel_calls):
    norm = norm_with_random_affine(64, 32, silu=True)
    x = channels_last(2, 64, 14, 14, seed=4)
    with torch.inference_mode():
        inferred = norm(x)
    trained = norm(x)  # the weights require grad: the autograd path
    assert trained.requires_grad and not inferred.requires_grad
    assert kernel_calls == ["_forward_coefficients"] * 2
    torch.testing.assert_close(inferred, trained.detach(), rtol=0, atol=1e-6)


def test_unet_state_dict_keys_are_those_of_separate_group_norm_and_silu_modules():
    # Checkpoints written when SiLU was its own module (output = GroupNorm, SiLU, conv as
    # Sequential items 0, 1, 2) must load: the fused module keeps nn.GroupNorm's keys and
    # the output conv stays item 2.
    model = UNet(base_channels=8, channel_mults=(1,), num_res_blocks=1)
    keys = set(model.state_dict())
    assert {"output.0.weight", "output.0.bias", "output.2.weight", "output.2.bias"} <= keys
    assert not any(key.startswith("output.1.") for key in keys)
    assert {"down.0.blocks.0.res.norm1.weight", "down.0.blocks.0.res.norm2.bias"} <= keys
    assert isinstance(model.output[0], torch.nn.GroupNorm) and model.output[0].silu


def test_kernels_work_without_a_writable_cache_directory(tmp_path):
    # numba raises at decoration, that is at `import ddpmkit`, when it finds nowhere to
    # write its cache (a read-only install and no writable home). Simulated with a cache
    # locator that never applies.
    (tmp_path / "no_cache_locator.py").write_text(
        "class Nowhere:\n    @classmethod\n    def from_function(cls, py_func, py_file):\n        return None\n"
    )
    program = (
        "import torch, torch.nn.functional as F\n"
        "from ddpmkit.group_norm import GroupNorm\n"
        "x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)\n"
        "with torch.no_grad():\n"
        "    print(float((GroupNorm(4, 8)(x) - F.group_norm(x, 4)).abs().max()))\n"
    )
    environment = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "no_cache_locator.Nowhere",
                   "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    ran = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=environment, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert float(ran.stdout) < 1e-5
