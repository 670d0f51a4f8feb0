"""Quick start: wrap an embedder, fit its Laplace posterior, compare uncertainties.

Trains the paper's small FashionMNIST network for one epoch on 10,000 images (about a
minute on 2 CPU cores), fits a last-layer posterior from the contrastive loss, and
prints the uncertainty of in-distribution (FashionMNIST test) and out-of-distribution
(MNIST) images, with the AUROC of telling them apart.

    python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import logging

import torch

from lam_plugin import LaplaceEmbedder
from lam_plugin.metrics import auroc, retrieval_metrics
from lam_study.data import load_fashionmnist, load_mnist
from lam_study.models import fashionmnist_net
from lam_study.training import train_contrastive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    train = load_fashionmnist(split="train").subset(torch.arange(args.train_images))
    test = load_fashionmnist(split="test").subset(torch.arange(2000))
    ood = load_mnist(split="test").subset(torch.arange(2000))

    torch.manual_seed(0)
    model = fashionmnist_net(embedding_dim=3)  # any nn.Module: images -> [B, D]
    train_contrastive(model, train.float(), train.labels, epochs=args.epochs, batch_size=256, seed=0)

    lam = LaplaceEmbedder(model, prior_precision="marglik", max_pairs=5000)
    posterior = lam.fit(train.loader(batch_size=64))
    print(posterior.summary(train.loader(batch_size=500)))

    g = torch.Generator().manual_seed(0)
    pred_id = posterior.predict(test.float(), n=100, generator=g)
    pred_ood = posterior.predict(ood.float(), n=100, generator=g)
    print(f"\nretrieval on FashionMNIST test: {retrieval_metrics(pred_id.mean, test.labels, ks=(1, 5))}")
    print(f"mean uncertainty  FashionMNIST (in distribution): {pred_id.uncertainty.mean():.4f}")
    print(f"mean uncertainty  MNIST (out of distribution):    {pred_ood.uncertainty.mean():.4f}")
    print(f"AUROC of uncertainty for telling them apart:      {auroc(pred_id.uncertainty, pred_ood.uncertainty):.3f}")


if __name__ == "__main__":
    main()
