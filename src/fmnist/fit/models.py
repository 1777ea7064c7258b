"""Model registry: every architecture is created by name (``create_model("seed-a")``).

Every model exposes ``features(x)`` (the penultimate representation, used by out-of-distribution detection)
and ``head`` (the final linear layer), so ``forward(x) == head(features(x))``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fmnist.core.errors import InputError

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], str]] = {}


def register(name: str, description: str):
    def wrap(fn):
        _REGISTRY[name] = (fn, description)
        return fn

    return wrap


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise InputError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    model = _REGISTRY[name][0](num_classes=num_classes, **kwargs)
    model.arch_name = name
    return model


def model_names() -> list[str]:
    return list(_REGISTRY)


def describe(name: str) -> str:
    return _REGISTRY[name][1]


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters plus BatchNorm running statistics.

    This is the Keras convention (its summary counts BN's moving mean/variance as non-trainable
    parameters), so seed A's "1,630,474" compares like with like.
    """
    n = sum(p.numel() for p in model.parameters())
    n += sum(b.numel() for name, b in model.named_buffers() if b.is_floating_point())
    return n


class Classifier(nn.Module):
    """A feature extractor followed by one linear head."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# --- the seeds' models, reproduced -------------------------------------------------------------------------


@register("seed-a", "seed A: 2 x [conv3x3-ReLU-BN-maxpool] (32, 64), dense 512, dropout 0.5")
def seed_a(num_classes: int = 10) -> nn.Module:
    body = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(32), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(64), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(), nn.Dropout(0.5),
    )
    return Classifier(body, 512, num_classes)


@register("seed-b-mlp", "seed B dense net: 784-256-128-10")
def seed_b_mlp(num_classes: int = 10) -> nn.Module:
    body = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
    return Classifier(body, 128, num_classes)


@register("seed-b-cnn", "seed B CNN: 3 x [conv3x3-ReLU-maxpool-dropout 0.25] (32, 64, 128), dense 128")
def seed_b_cnn(num_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    c_in = 1
    for c in (32, 64, 128):
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25)]
        c_in = c
    # 28 -> 14 -> 7 -> 3 (floor), as Keras's default 'valid' pooling does
    layers += [nn.Flatten(), nn.Linear(128 * 3 * 3, 128), nn.ReLU(), nn.Dropout(0.5)]
    return Classifier(nn.Sequential(*layers), 128, num_classes)


# --- fast models for the CPU -------------------------------------------------------------------------------


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x):
        return x + self.block(x)


class GlobalPool(nn.Module):
    """Concatenated global max and average pooling, flattened."""

    def forward(self, x):
        return torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)


def resnet9(widths=(16, 32, 64, 128), num_classes: int = 10) -> nn.Module:
    """ResNet-9 in the style of the fast CIFAR-10 trainers, sized for 28x28 inputs.

    prep conv at 28x28, then three stages that each halve the resolution (28 -> 14 -> 7 -> 3); the first and
    last stages carry a residual block. Most compute happens at low resolution, which keeps CPU steps cheap.
    """
    c0, c1, c2, c3 = widths
    body = nn.Sequential(
        conv_bn(1, c0),
        conv_bn(c0, c1), nn.MaxPool2d(2), Residual(c1),
        conv_bn(c1, c2), nn.MaxPool2d(2),
        conv_bn(c2, c3), nn.MaxPool2d(2), Residual(c3),
        GlobalPool(),
    )
    return Classifier(body, 2 * c3, num_classes)


def vgg_small(widths=(16, 32, 64), num_classes: int = 10) -> nn.Module:
    """Three stages of [conv-BN-ReLU x2, maxpool], then global pooling: few parameters, strong on 28x28."""
    layers: list[nn.Module] = []
    c_in = 1
    for i, c in enumerate(widths):
        layers += [conv_bn(c_in, c), conv_bn(c, c)]
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        c_in = c
    layers.append(GlobalPool())
    return Classifier(nn.Sequential(*layers), 2 * widths[-1], num_classes)


class SpaceToDepth(nn.Module):
    """Folds each 2x2 patch into 4 channels: 28x28x1 -> 14x14x4, losing nothing. Convolutions then run on a
    quarter of the positions, which is where a CPU spends its time in small CNNs (memory traffic of the
    full-resolution activations and their gradients)."""

    def forward(self, x):
        return nn.functional.pixel_unshuffle(x, 2)


class PatchWhitening(nn.Module):
    """A frozen first convolution whose filters whiten the k x k patches of the training images.

    The filters are the eigenvectors of the patches' covariance scaled by 1 / sqrt(eigenvalue + eps), each with
    its negative (a ReLU after them keeps both signs): the next layer sees decorrelated inputs of unit variance,
    which is what lets the fast CIFAR-10 trainers (airbench) take larger steps from the first one. Fitted once,
    before training, from training images (:func:`fit_whitening`); never trained; saved with the weights.
    """

    def __init__(self, k: int, stride: int = 1, padding: int = 0, eps: float = 5e-3):
        super().__init__()
        self.conv = nn.Conv2d(1, 2 * k * k, k, stride=stride, padding=padding, bias=True)
        self.conv.requires_grad_(False)
        self.eps = eps

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        """Set the filters from normalised (N, 1, H, W) images (a few thousand are plenty)."""
        k = self.conv.kernel_size[0]
        patches = nn.functional.unfold(images.float(), k).transpose(1, 2).reshape(-1, k * k).double()
        mean = patches.mean(0)
        eigenvalues, vectors = torch.linalg.eigh(torch.cov(patches.T))
        filters = (vectors / torch.sqrt(eigenvalues.clamp(min=0) + self.eps)).T
        filters = torch.cat([filters, -filters])
        self.conv.weight.copy_(filters.reshape(self.conv.weight.shape).to(self.conv.weight))
        self.conv.bias.copy_(-(filters @ mean).to(self.conv.bias))

    def forward(self, x):
        return self.conv(x)


def fit_whitening(model: nn.Module, images: torch.Tensor) -> int:
    """Fit every :class:`PatchWhitening` stem of ``model`` from ``images``; returns how many there were."""
    stems = [m for m in model.modules() if isinstance(m, PatchWhitening)]
    for stem in stems:
        stem.fit(images.to(stem.conv.weight.device))
    return len(stems)


def s2d_net(widths=(24, 48, 96), num_classes: int = 10, whiten: bool = False) -> nn.Module:
    """Space-to-depth stem, then [conv-BN-ReLU x2] at 14x14 and 7x7 and one conv at 3x3, global max+avg pool.

    ``whiten``: the stem is a frozen whitening of 4x4 patches at stride 2 (32 channels at 14x14) instead of the
    plain 2x2 fold (4 channels): the same resolution, decorrelated inputs."""
    a, b, c = widths
    stem, c0 = (PatchWhitening(4, stride=2, padding=1), 32) if whiten else (SpaceToDepth(), 4)
    body = nn.Sequential(
        stem,
        conv_bn(c0, a), conv_bn(a, a), nn.MaxPool2d(2),
        conv_bn(a, b), conv_bn(b, b), nn.MaxPool2d(2),
        conv_bn(b, c),
        GlobalPool(),
    )
    return Classifier(body, 2 * c, num_classes)


@register("s2d-24", "space-to-depth stem, widths 24/48/96 at 14/7/3 (under 100k parameters; the tiny preset)")
def s2d_24(num_classes: int = 10) -> nn.Module:
    return s2d_net((24, 48, 96), num_classes)


@register("s2d-32", "space-to-depth stem, widths 32/64/128 at 14/7/3 (short schedules on a CPU)")
def s2d_32(num_classes: int = 10) -> nn.Module:
    return s2d_net((32, 64, 128), num_classes)


@register("s2d-48", "space-to-depth stem, widths 48/96/192 at 14/7/3 (for GPUs or long CPU runs)")
def s2d_48(num_classes: int = 10) -> nn.Module:
    return s2d_net((48, 96, 192), num_classes)


@register("s2dw-24", "s2d-24 with a frozen patch-whitening stem (4x4 patches, 32 channels at 14x14); < 100k parameters")
def s2dw_24(num_classes: int = 10) -> nn.Module:
    return s2d_net((24, 48, 96), num_classes, whiten=True)


@register("s2dw-32", "s2d-32 with a frozen patch-whitening stem (4x4 patches, 32 channels at 14x14)")
def s2dw_32(num_classes: int = 10) -> nn.Module:
    return s2d_net((32, 64, 128), num_classes, whiten=True)


class AirBlock(nn.Module):
    """airbench's block: conv, 2x2 max pool, BatchNorm, GELU, conv, BatchNorm, GELU (pooling before the
    normalisation: a quarter of the BatchNorm work). BatchNorm keeps its bias but not its scale."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out)
        for norm in (self.norm1, self.norm2):
            norm.weight.requires_grad_(False)

    def forward(self, x):
        x = nn.functional.gelu(self.norm1(nn.functional.max_pool2d(self.conv1(x), 2)))
        return nn.functional.gelu(self.norm2(self.conv2(x)))


def air_net(widths=(32, 64, 128), num_classes: int = 10) -> nn.Module:
    """Shaped like airbench: a frozen whitening of 3x3 patches at full resolution, three wide blocks without
    residuals (28 -> 14 -> 7 -> 3), global max pooling."""
    a, b, c = widths
    body = nn.Sequential(PatchWhitening(3, padding=1), nn.GELU(), AirBlock(18, a), AirBlock(a, b), AirBlock(b, c),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten())
    return Classifier(body, c, num_classes)


@register("air-16", "airbench-shaped: whitening stem, 3 blocks without residuals, widths 16/32/64 (< 100k parameters)")
def air_16(num_classes: int = 10) -> nn.Module:
    return air_net((16, 32, 64), num_classes)


@register("air-32", "airbench-shaped: whitening stem, 3 blocks without residuals, widths 32/64/128")
def air_32(num_classes: int = 10) -> nn.Module:
    return air_net((32, 64, 128), num_classes)


@register("air-64", "airbench-shaped: whitening stem, 3 blocks without residuals, widths 64/128/256 (GPUs)")
def air_64(num_classes: int = 10) -> nn.Module:
    return air_net((64, 128, 256), num_classes)


@register("tiny", "under 100k parameters: 3 x [conv-BN-ReLU x2] (16, 32, 64), global max+avg pool")
def tiny(num_classes: int = 10) -> nn.Module:
    return vgg_small((16, 32, 64), num_classes)


@register("resnet-lite", "residual CNN that halves the resolution first: 24 @28, res 32 @14, res 64 @7, 128 @3")
def resnet_lite(num_classes: int = 10) -> nn.Module:
    """A residual CNN sized for a CPU without fast matrix units: one cheap conv at full resolution, then
    residual stages at 14x14 and 7x7, where almost all of the compute and parameters sit."""
    body = nn.Sequential(
        conv_bn(1, 24), nn.MaxPool2d(2),
        conv_bn(24, 32), Residual(32), nn.MaxPool2d(2),
        conv_bn(32, 64), Residual(64), nn.MaxPool2d(2),
        conv_bn(64, 128),
        GlobalPool(),
    )
    return Classifier(body, 256, num_classes)


@register("resnet9-s", "compact ResNet-9, widths 16/32/64/128 (5-epoch schedules; the reference recipe)")
def resnet9_s(num_classes: int = 10) -> nn.Module:
    return resnet9((16, 32, 64, 128), num_classes)


@register("resnet9-m", "ResNet-9, widths 32/64/128/256 (10-20 and 80-epoch schedules)")
def resnet9_m(num_classes: int = 10) -> nn.Module:
    return resnet9((32, 64, 128, 256), num_classes)


@register("resnet9-l", "ResNet-9, widths 64/128/256/512 (40 epochs and more; GPUs)")
def resnet9_l(num_classes: int = 10) -> nn.Module:
    return resnet9((64, 128, 256, 512), num_classes)


# --- inference-time folding ----------------------------------------------------------------------------------


def fuse_conv_bn(model: nn.Module) -> int:
    """Fold each BatchNorm that directly follows a convolution (inside an ``nn.Sequential``) into it.

    Inference only (eval mode): the same function with fewer layers, about a quarter less time per call on
    small models, where per-layer overhead dominates. Returns the number of pairs fused.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise InputError("fuse_conv_bn needs a model in eval mode")
    fused = 0
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, bn = module[i], module[i + 1]
            if (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats
                    and conv.out_channels == bn.num_features):
                with torch.no_grad():
                    module[i] = fuse_conv_bn_eval(conv, bn)
                module[i + 1] = nn.Identity()
                fused += 1
    return fused
