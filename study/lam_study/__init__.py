"""lam-study: the FashionMNIST study of lam-plugin (the paper's protocol, its baselines,
data loaders, reference networks, training, reports and plots).

It depends on the plug-in (``lam_plugin``); the plug-in knows nothing of it. Its
commands are ``lam-study reproduce`` and ``lam-study combine``.
"""

from lam_plugin import __version__

__all__ = ["__version__"]
