"""Reference embedding networks.

Every network is a plain :class:`torch.nn.Sequential` of standard modules, so that
curvature libraries (BackPACK, ``laplace-torch``) can walk its layers. Each factory
takes ``normalize``: when true the network ends with :class:`~lam_plugin.modules.L2Normalize`
and its outputs lie on the unit sphere.
"""

from __future__ import annotations

from torch import Tensor, nn

from lam_plugin.modules import L2Normalize

__all__ = ["DROPOUT_LAYOUTS", "ResidualBlock", "fashionmnist_net", "mlp_embedder", "small_resnet"]


def _head(layers: list[nn.Module], normalize: bool) -> nn.Sequential:
    if normalize:
        layers.append(L2Normalize(dim=-1))
    return nn.Sequential(*layers)


#: Where :func:`fashionmnist_net` puts its dropout.
DROPOUT_LAYOUTS: tuple[str, ...] = ("channel", "pool")


def fashionmnist_net(
    embedding_dim: int = 3, normalize: bool = False, dropout: float = 0.0, dropout_layout: str = "pool"
) -> nn.Sequential:
    """The paper's FashionMNIST / MNIST embedder for ``[B, 1, 28, 28]`` images.

    ``Conv2d(1, 32, 3) ReLU [Dropout2d(p)] Conv2d(32, 64, 3) ReLU MaxPool2d(2) [Dropout(p) or
    Dropout2d(p)] Flatten Linear(9216, embedding_dim) [L2Normalize]``.

    Args:
        embedding_dim: size ``D`` of the embedding.
        normalize: append an :class:`L2Normalize` layer.
        dropout: dropout probability; no dropout layer when ``0``.
        dropout_layout: ``"pool"``, one element-wise ``Dropout(p)`` after the pooling;
            ``"channel"``, the paper's network for MC dropout: ``Dropout2d(p)`` (whole
            feature maps) after the first ReLU and after the pooling.

    Dropout layers hold no parameters, so the initial weights drawn under one seed are
    the same for every ``dropout`` and ``dropout_layout``.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    if dropout_layout not in DROPOUT_LAYOUTS:
        raise ValueError(f"dropout_layout must be one of {DROPOUT_LAYOUTS}, got {dropout_layout!r}")
    channel = dropout > 0 and dropout_layout == "channel"
    layers: list[nn.Module] = [nn.Conv2d(1, 32, 3), nn.ReLU()]
    if channel:
        layers.append(nn.Dropout2d(dropout))
    layers += [nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2)]
    if dropout > 0:
        layers.append(nn.Dropout2d(dropout) if channel else nn.Dropout(dropout))
    layers += [nn.Flatten(), nn.Linear(9216, embedding_dim)]
    return _head(layers, normalize)


class ResidualBlock(nn.Module):
    """``x + body(x)`` with ``body = Conv3x3 BN ReLU Conv3x3 BN`` (shape preserving).

    The addition is a plain ``x + self.body(x)``; no activation follows it inside the
    block (:func:`small_resnet` puts a separate ``ReLU`` module after each block).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def small_resnet(
    in_channels: int = 1, embedding_dim: int = 8, width: int = 8, normalize: bool = False
) -> nn.Sequential:
    """A small residual CNN for ``[B, in_channels, H, W]`` images of any size.

    ``Conv BN ReLU ResidualBlock(w) ReLU Conv(stride 2, 2w) BN ReLU ResidualBlock(2w) ReLU
    AdaptiveAvgPool2d(1) Flatten Linear(2w, embedding_dim) [L2Normalize]``.

    Args:
        in_channels: number of image channels.
        embedding_dim: size ``D`` of the embedding.
        width: channels of the first stage (the second stage has ``2 * width``).
        normalize: append an :class:`L2Normalize` layer.
    """
    w = width
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        ResidualBlock(w),
        nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(),
        ResidualBlock(2 * w),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * w, embedding_dim),
    ]
    return _head(layers, normalize)


def mlp_embedder(
    in_features: int,
    embedding_dim: int,
    hidden: int = 32,
    normalize: bool = False,
    dropout: float = 0.0,
) -> nn.Sequential:
    """A two-hidden-layer MLP embedder for ``[B, in_features]`` vectors.

    ``Linear LayerNorm GELU [Dropout] Linear LayerNorm GELU [Dropout] Linear(hidden, embedding_dim)
    [L2Normalize]``.

    Args:
        in_features: input size.
        embedding_dim: size ``D`` of the embedding.
        hidden: width of the hidden layers.
        normalize: append an :class:`L2Normalize` layer.
        dropout: probability of the dropout after each hidden layer; none when ``0``.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    width_in = in_features
    for _ in range(2):
        layers += [nn.Linear(width_in, hidden), nn.LayerNorm(hidden), nn.GELU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width_in = hidden
    layers.append(nn.Linear(hidden, embedding_dim))
    return _head(layers, normalize)
