"""Small models that exercise every curvature path (importable by the tests)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lam_plugin import L2Normalize


def paper_cnn(dim: int = 3, normalize: bool = True) -> nn.Sequential:
    """The paper's FashionMNIST network (28x28 inputs)."""
    layers: list[nn.Module] = [
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(9216, dim),
    ]
    if normalize:
        layers.append(L2Normalize())
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.bn(self.conv(x)))


class ResCNN(nn.Module):
    """Residual CNN with BatchNorm (to be used in eval mode) and adaptive average pooling."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = ResBlock(4)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.head = nn.Linear(16, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.flat(self.pool(self.block(self.stem(x)))))


class NormMLP(nn.Module):
    """MLP with LayerNorm and GELU (not supported by BackPACK)."""

    def __init__(self, d_in: int = 10, dim: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DictModel(nn.Module):
    """Returns a dict; the embedding is under "embedding" and the last Linear feeds it."""

    def __init__(self, d_in: int = 10, dim: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, 12), nn.Tanh())
        self.aux = nn.Linear(12, 2)
        self.proj = nn.Linear(12, dim)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.body(x)
        return {"logits": self.aux(h), "embedding": self.proj(h)}


class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.fc(x))


class NestedModules(nn.Module):
    """Containers of the user's own classes calling modules only (no functional
    operation), with a Tanh after the last Linear."""

    def __init__(self, d_in: int = 10, dim: int = 4) -> None:
        super().__init__()
        self.block = Block(d_in, 12)
        self.fc = nn.Linear(12, dim)
        self.out = nn.Tanh()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.fc(self.block(x)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def reference_batches(kind: str, dtype: torch.dtype, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Two batches of six random inputs (``kind``: "image28", "image8" or "vector")."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, 28, 28) if kind == "image28" else (1, 8, 8) if kind == "image8" else (10,)
    # label mixes that leave some parameters with a positive signed sum and others
    # with a negative one, so that the relu of "fix" and "full" is exercised
    labels = [torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([1, 1, 1, 1, 1, 0])]
    return [(torch.randn(6, *shape, generator=g, dtype=dtype), y) for y in labels]


# name -> (factory, input kind, output_key, whether BackPACK supports every module)
MODELS: dict[str, tuple[Callable[[], nn.Module], str, str | None, bool]] = {
    "paper_cnn": (lambda: paper_cnn(3, normalize=True), "image28", None, True),
    "res_cnn_bn": (lambda: randomize_bn(ResCNN(4)), "image8", None, True),
    # residual "+" sends BackPACK through its converter, which must keep L2Normalize whole
    "res_cnn_bn_l2": (lambda: nn.Sequential(randomize_bn(ResCNN(4)), L2Normalize()), "image8", None, True),
    "layernorm_gelu_mlp": (lambda: NormMLP(10, 4), "vector", None, False),
    "dict_output": (lambda: DictModel(10, 3), "vector", "embedding", True),
    "nested_modules": (lambda: NestedModules(10, 4), "vector", None, True),
}


def build_model(
    name: str, dtype: torch.dtype, seed: int = 0
) -> tuple[nn.Module, list[tuple[Tensor, Tensor]], str | None, bool]:
    """``(model in eval mode, batches, output_key, backpack_ok)`` for one entry of :data:`MODELS`."""
    factory, kind, key, backpack_ok = MODELS[name]
    torch.manual_seed(seed)
    model = factory().to(dtype).eval()
    return model, reference_batches(kind, dtype, seed), key, backpack_ok
