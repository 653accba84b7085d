"""SLaK / ConvNeXt+BN in PyTorch, written from ``shared/docs/reference.md`` (not the authors' code).

It keeps the authors' module and parameter names (``stages.i.j.large_kernel.LoRA1.conv.weight``
...), so its ``state_dict()`` converts with ``--arch slak``. Used for live parity tests against
freshly randomised models and as the PyTorch side of ``tools/benchmark_step.py``. The large
depthwise convolutions are plain ``nn.Conv2d(groups=C)`` with padding ``(kh // 2, kw // 2)``,
which is what the authors' CUDA kernel computes.
"""
from __future__ import annotations

from typing import Sequence

import torch

from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's 'channels_first')."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvBN(nn.Sequential):
    def __init__(self, channels: int, kernel: tuple[int, int], bn: bool):
        super().__init__()
        self.add_module("conv", nn.Conv2d(channels, channels, kernel, padding=(kernel[0] // 2, kernel[1] // 2),
                                          groups=channels, bias=False))
        if bn:
            self.add_module("bn", nn.BatchNorm2d(channels))


class LargeKernel(nn.Module):
    def __init__(self, channels: int, k: int, n: int, decompose: bool, bn: bool):
        super().__init__()
        if decompose:
            self.LoRA1 = ConvBN(channels, (k, n), bn)
            self.LoRA2 = ConvBN(channels, (n, k), bn)
        else:
            self.lkb_origin = ConvBN(channels, (k, k), bn)
        if n < k:
            self.small_conv = ConvBN(channels, (n, n), bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "LoRA1"):
            out = self.LoRA1(x) + self.LoRA2(x)
        else:
            out = self.lkb_origin(x)
        if hasattr(self, "small_conv"):
            out = out + self.small_conv(x)
        return out


class Block(nn.Module):
    def __init__(self, dim: int, k: int, n: int, decompose: bool, bn: bool, drop_path: float, ls: float):
        super().__init__()
        self.gamma = nn.Parameter(ls * torch.ones(dim)) if ls > 0 else None
        self.large_kernel = LargeKernel(dim, k, n, decompose, bn)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.large_kernel(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        y = y.permute(0, 3, 1, 2)
        if self.training and self.drop_path > 0:
            keep = torch.rand(y.shape[0], 1, 1, 1, device=y.device) >= self.drop_path
            y = y * keep / (1 - self.drop_path)
        return x + y


class SLaK(nn.Module):
    """SLaK (``kernel_size=[51,49,47,13,5]``, width 1.3) or ConvNeXt+BN (``[7,7,7,7,100]``)."""

    def __init__(self, *, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, kernel_size: Sequence[int] = (51, 49, 47, 13, 5),
                 width_factor: float = 1.0, decompose: bool = True, bn: bool = True):
        super().__init__()
        dims = [int(d * width_factor) for d in dims]
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0]))]
            + [nn.Sequential(LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2)) for i in range(1, 4)]
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        c = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                Block(dims[i], kernel_size[i], kernel_size[4], decompose, bn, rates[c + j], layer_scale_init_value)
                for j in range(depths[i])
            ]))
            c += depths[i]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x)[-1].mean((2, 3))))


def randomize_(model: nn.Module, seed: int, sparsity: float = 0.0) -> nn.Module:
    """Overwrite every tensor with non-trivial random values (as the golden data does).

    With ``sparsity`` > 0, that fraction of every large-kernel depthwise weight is set to zero,
    like a released sparse SLaK checkpoint.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var") or ".weight" in name and t.ndim == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("gamma"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif t.ndim == 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) / fan_in ** 0.5)
                if sparsity > 0 and ".large_kernel." in name:
                    flat = t.view(-1)
                    idx = torch.randperm(flat.numel(), generator=g)[: int(sparsity * flat.numel())]
                    flat[idx] = 0.0
    return model


__all__ = ["SLaK", "randomize_"]
