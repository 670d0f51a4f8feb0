"""Image retrieval with uncertainty: a ResNet-style backbone with a 512-d retrieval head.

1. Train a small residual network (three stages of basic residual blocks with batch
   norm, global average pooling) whose retrieval head is ``Linear(64 -> 512)`` followed
   by an L2 normalisation, briefly, with the contrastive loss
   (:func:`lam_study.training.train_contrastive`), on FashionMNIST training images.
2. Fit its Laplace posterior with ``LaplaceEmbedder(model)`` as it is: the last layer,
   the 512-d head.
3. Index a gallery of FashionMNIST test images in an ``UncertainIndex`` and query it with
   other FashionMNIST test images (in distribution) and MNIST digits (out of
   distribution, OoD): every neighbour comes with its squared distance and that
   distance's variance under the posterior.
4. Report the AUROC of telling OoD from in-distribution queries by the posterior's
   ``predict(...).uncertainty``, next to a plain score that needs no posterior: the
   distance of the network's own embedding to its nearest gallery embedding; and the
   retrieval quality (mAP@k, recall@k) of the FashionMNIST test images.

Results go to ``--out`` (default ``runs/image``): ``results.json`` and ``results.md``.

Run::

    python examples/image_retrieval.py [--out DIR] [--epochs N] [--train-size N] [--seed S] [--quick]

The defaults take a few minutes on two CPU cores, most of it training; ``--quick`` is a
smoke run whose barely trained network's numbers mean little. Needs FashionMNIST
(Debian package ``dataset-fashion-mnist``, or the IDX files under
``$LAM_PLUGIN_DATA/fashion-mnist``) and MNIST (any source of
:func:`lam_study.data.load_mnist`).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from evaluation import (
    markdown_report,
    nearest_distance,
    ood_scores,
    print_neighbours,
    print_summary,
    retrieval_scores,
    seed_everything,
    seeded,
    setup_logging,
    write_results,
)
from torch import Tensor, nn

from lam_plugin import L2Normalize, LaplaceEmbedder, UncertainIndex
from lam_plugin.numerics import flush_denormals
from lam_study.data import ImageDataset, load_fashionmnist, load_mnist
from lam_study.data.fashionmnist import CLASSES
from lam_study.training import embed, train_contrastive

logger = logging.getLogger("image_retrieval")

K = 5  # neighbours per query (printed, and recall of the index search)
FIT_BATCH = 64  # images per batch of the posterior fit
EMBEDDING_DIM = 512


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, added to the input (projected by a 1x1
    convolution where the stride or the width changes), then a ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetEmbedder(nn.Module):
    """A ResNet-style image embedder: a 3x3 stem of stride 2, one basic block per stage
    (widths ``widths``, stride 2 from the second stage on), global average pooling, and
    the retrieval head ``Linear(widths[-1] -> dim)`` + L2 normalisation."""

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64), dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        c_ins = (widths[0], *widths[:-1])
        self.stages = nn.Sequential(
            *(BasicBlock(c_in, c_out, 1 if i == 0 else 2) for i, (c_in, c_out) in enumerate(zip(c_ins, widths)))
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(widths[-1], dim)
        self.normalize = L2Normalize()

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(self.head(self.pool(self.stages(self.stem(x)))))


@dataclass(frozen=True)
class Settings:
    """The command line."""

    out: Path
    epochs: int
    train_size: int
    fit_size: int
    gallery_size: int
    n_queries: int
    batch_size: int
    n_samples: int
    seed: int
    n_shown: int
    quick: bool


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Parse the command line and set up logging."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/image"), help="output folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 3; 1 with --quick)")
    p.add_argument("--train-size", type=int, default=None,
                   help="FashionMNIST training images (default 20000; 1000 with --quick)")
    p.add_argument("--fit-size", type=int, default=None,
                   help="training images the posterior is fitted on (default 5000; 256 with --quick)")
    p.add_argument("--gallery", type=int, default=None,
                   help="gallery images from the test split (default 5000; 300 with --quick)")
    p.add_argument("--queries", type=int, default=None,
                   help="queries of each kind, ID and OoD (default 1000; 100 with --quick)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size (%(default)s)")
    p.add_argument("--samples", type=int, default=30, help="posterior weight samples per embedding (%(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of training, the image choice and the samples (%(default)s)")
    p.add_argument("--show", type=int, default=2,
                   help="queries of each kind printed with their neighbours (%(default)s)")
    p.add_argument("--quick", action="store_true", help="a small, fast run (smoke test)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    a = p.parse_args(argv)
    setup_logging(a.verbose)

    def pick(value: int | None, default: int, quick_default: int) -> int:
        return value if value is not None else (quick_default if a.quick else default)

    s = Settings(
        out=a.out,
        epochs=pick(a.epochs, 3, 1),
        train_size=pick(a.train_size, 20_000, 1_000),
        fit_size=pick(a.fit_size, 5_000, 256),
        gallery_size=pick(a.gallery, 5_000, 300),
        n_queries=pick(a.queries, 1_000, 100),
        batch_size=a.batch_size,
        n_samples=a.samples,
        seed=a.seed,
        n_shown=a.show,
        quick=a.quick,
    )
    if min(s.epochs, s.train_size, s.fit_size, s.gallery_size, s.n_queries) < 1 or min(s.batch_size, s.n_samples) < 2:
        p.error("sizes and --epochs must be positive, --batch-size and --samples at least 2")
    if s.fit_size > s.train_size:
        p.error("--fit-size cannot exceed --train-size (the posterior is fitted on training images)")
    return s


@flush_denormals()  # a trained network's subnormal floats are many times slower on x86 CPUs
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns what it writes to ``results.json``."""
    s = parse_args(argv)
    seed_everything(s.seed)
    start = time.perf_counter()
    timings: dict[str, float] = {}

    train_all, test, mnist = load_fashionmnist(split="train"), load_fashionmnist(split="test"), load_mnist(split="test")
    if s.gallery_size + s.n_queries > len(test):
        raise SystemExit(f"--gallery + --queries must not exceed the {len(test)} FashionMNIST test images")
    rng = np.random.default_rng(s.seed)
    train = train_all.subset(torch.from_numpy(rng.permutation(len(train_all))[: s.train_size]))
    fit = train.subset(torch.arange(s.fit_size))
    order = torch.from_numpy(rng.permutation(len(test)))
    gallery = test.subset(order[: s.gallery_size])  # gallery id i = row i
    queries = test.subset(order[s.gallery_size : s.gallery_size + s.n_queries])
    ood = mnist.subset(torch.from_numpy(rng.permutation(len(mnist))[: min(s.n_queries, len(mnist))]))
    logger.info(
        "data: %d training (%d for the fit), %d gallery, %d ID queries (FashionMNIST test), %d OoD queries (%s)",
        len(train), len(fit), len(gallery), len(queries), len(ood), mnist.name,
    )

    model = ResNetEmbedder()
    t0 = time.perf_counter()
    history = train_contrastive(
        model, train.float(), train.labels, epochs=s.epochs, batch_size=s.batch_size, seed=s.seed, progress=False
    )
    timings["train"] = time.perf_counter() - t0
    model.eval()
    logger.info(
        "trained %d epoch(s) in %.0f s; loss per epoch: %s",
        s.epochs, timings["train"], ", ".join(f"{v:.4f}" for v in history.epoch_losses),
    )

    t0 = time.perf_counter()
    loader = fit.loader(batch_size=FIT_BATCH, shuffle=True, generator=torch.Generator().manual_seed(s.seed))
    posterior = LaplaceEmbedder(model, progress=False).fit(loader)
    timings["fit posterior"] = time.perf_counter() - t0
    logger.info("fitted the posterior in %.1f s: %r", timings["fit posterior"], posterior)
    print(posterior.summary(queries.float()[:500]))

    t0 = time.perf_counter()
    index = UncertainIndex(posterior, n_samples=s.n_samples, seed=s.seed, progress=False)
    index.add(gallery.loader(batch_size=512))
    timings["index gallery"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # the same weight samples for every batch, and those of the index (seeded alike)
    pred_id = posterior.predict(queries.float(), n=s.n_samples, generator=seeded(s.seed), batch_size=512)
    pred_ood = posterior.predict(ood.float(), n=s.n_samples, generator=seeded(s.seed), batch_size=512)
    res_id, res_ood = index.search(pred_id, K), index.search(pred_ood, K)
    timings["predict and search queries"] = time.perf_counter() - t0

    plain = {name: embed(model, ds.float()) for name, ds in (("gallery", gallery), ("queries", queries), ("ood", ood))}
    base_id = nearest_distance(plain["queries"], plain["gallery"])
    base_ood = nearest_distance(plain["ood"], plain["gallery"])

    def name(ds: ImageDataset, classes: Sequence[str] | None) -> Callable[[int], str]:
        return lambda i: classes[int(ds.labels[i])] if classes else f"digit {int(ds.labels[i])}"

    shown = {
        "in_distribution": print_neighbours(
            "In-distribution queries (FashionMNIST test images not in the gallery):",
            sorted(rng.choice(len(queries), min(s.n_shown, len(queries)), replace=False).tolist()),
            res_id, name(queries, CLASSES), name(gallery, CLASSES),
        ),
        "out_of_distribution": print_neighbours(
            "Out-of-distribution queries (MNIST digits):",
            sorted(rng.choice(len(ood), min(s.n_shown, len(ood)), replace=False).tolist()),
            res_ood, name(ood, None), name(gallery, CLASSES),
        ),
    }

    ood_table = ood_scores(pred_id, pred_ood, base_id, base_ood)
    retrieval = retrieval_scores(
        index, pred_id, res_id, plain["gallery"], plain["queries"], gallery.labels, queries.labels, K
    )
    print_summary(ood_table, retrieval)

    timings["total"] = time.perf_counter() - start
    sizes = {"train": len(train), "fit": len(fit), "gallery": len(gallery), "queries": len(queries), "ood": len(ood)}
    results = {
        "model": repr(model),
        "posterior": repr(posterior),
        "settings": {"epochs": s.epochs, "batch_size": s.batch_size, "n_samples": s.n_samples, "seed": s.seed,
                     "quick": s.quick},
        "training_loss": history.epoch_losses,
        "ood_set": mnist.name,
        "sizes": sizes,
        "ood": ood_table,
        "retrieval": retrieval,
        "examples": shown,
        "seconds": timings,
    }
    setup = [
        f"model: ResNet-style backbone (widths 16/32/64) + `Linear(64 -> {EMBEDDING_DIM})` + L2, "
        f"trained {s.epochs} epoch(s) with the contrastive loss; `LaplaceEmbedder(model)`, defaults",
        f"in distribution: FashionMNIST; out of distribution: MNIST ({mnist.name})",
        f"images: {', '.join(f'{n} {k}' for k, n in sizes.items())} (seed {s.seed}); {s.n_samples} weight samples",
        f"{timings['total']:.0f} s in all ({timings['train']:.0f} s training, "
        f"{timings['fit posterior']:.1f} s for the fit)",
    ]
    write_results(s.out, results, markdown_report("ResNet-style embedder on FashionMNIST", setup, ood_table, retrieval))
    logger.info("done in %.0f s; results in %s", timings["total"], s.out.resolve())
    return results


if __name__ == "__main__":
    main()
