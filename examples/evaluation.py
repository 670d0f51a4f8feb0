"""What examples/text_retrieval.py and examples/image_retrieval.py share: seeding, the
out-of-distribution scores (the posterior's uncertainty against the distance to the
nearest gallery item), the printed neighbours and the result files."""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lam_plugin import Prediction, SearchResult, UncertainIndex
from lam_plugin.metrics import auroc, retrieval_metrics


def setup_logging(verbose: bool = False) -> None:
    """Timestamped INFO logging (DEBUG with ``verbose``) on stderr."""
    # force: replace any handler an imported library already gave the root logger
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: what ``UncertainIndex(..., seed=seed)`` draws
    its weight samples from, so predictions made with it share the index's samples."""
    return torch.Generator().manual_seed(seed)


def nearest_distance(queries: Tensor, gallery: Tensor) -> Tensor:
    """``[Q]`` Euclidean distance of each query embedding to its nearest gallery embedding:
    the plain out-of-distribution score of a retrieval model (higher = farther from the data)."""
    return torch.cdist(queries.double(), gallery.double()).min(dim=1).values


def ood_scores(
    pred_id: Prediction, pred_ood: Prediction, base_id: Tensor, base_ood: Tensor
) -> dict[str, dict[str, float]]:
    """AUROC (OoD positive) and mean ID / OoD value of each score: the posterior's
    ``uncertainty`` and ``output_uncertainty``, and the nearest-gallery distance ``base_*``."""
    scores = {
        "LAM uncertainty (sum of std)": (pred_id.uncertainty, pred_ood.uncertainty),
        "LAM output uncertainty (before L2)": (pred_id.output_uncertainty, pred_ood.output_uncertainty),
        "baseline: distance to nearest gallery item": (base_id, base_ood),
    }
    return {
        name: {
            "auroc": auroc(s_id, s_ood),
            "mean_id": float(s_id.double().mean()),
            "mean_ood": float(s_ood.double().mean()),
        }
        for name, (s_id, s_ood) in scores.items()
        if s_id is not None and s_ood is not None
    }


def retrieval_scores(
    index: UncertainIndex,
    queries: Prediction,
    hits: SearchResult,
    plain_gallery: Tensor,
    plain_queries: Tensor,
    gallery_labels: Tensor,
    query_labels: Tensor,
    k: int,
) -> dict[str, float]:
    """mAP@k and recall@k (k = 1, 5, 10) of the posterior means and of the plain model's
    embeddings over gallery and queries together (leave-one-out), and recall@``k`` and
    precision@1 of the index search ``hits`` of the queries in the gallery. Gallery item
    ``i`` must be row ``i`` of the index."""
    labels = torch.cat([gallery_labels, query_labels])
    gallery_mean = torch.from_numpy(index.faiss_index.reconstruct_n(0, len(index)))
    scores = {
        f"LAM mean, {name}": v
        for name, v in retrieval_metrics(torch.cat([gallery_mean, queries.mean]), labels, ks=(1, 5, 10)).items()
    }
    scores |= {
        f"plain model, {name}": v
        for name, v in retrieval_metrics(torch.cat([plain_gallery, plain_queries]), labels, ks=(1, 5, 10)).items()
    }
    found = gallery_labels[torch.from_numpy(hits.ids)] == query_labels[:, None]
    scores[f"index search, query -> gallery recall@{k}"] = float(found.any(dim=1).double().mean())
    scores["index search, query -> gallery precision@1"] = float(found[:, 0].double().mean())
    return scores


def print_neighbours(
    title: str,
    rows: Sequence[int],
    result: SearchResult,
    query_name: Callable[[int], str],
    item_name: Callable[[int], str],
) -> list[dict[str, Any]]:
    """Print each query of ``rows`` with its neighbours (id, squared distance, its standard
    deviation under the posterior, name) and return what was printed as records."""
    print(f"\n{title}")
    shown = []
    for row in rows:
        print(f"  query #{row}: {query_name(row)}")
        print(f"    uncertainty {result.query_uncertainty[row]:.4f}")
        print(f"    {'rank':>4} {'id':>6} {'d^2':>8} {'std(d^2)':>9}  neighbour")
        neighbours = []
        for j in range(result.ids.shape[1]):
            gid = int(result.ids[row, j])
            d2, var = float(result.distances[row, j]), float(result.variances[row, j])
            print(f"    {j + 1:>4} {gid:>6} {d2:>8.4f} {math.sqrt(var):>9.4f}  {item_name(gid)}")
            neighbours.append({"id": gid, "d2": d2, "var_d2": var, "item": item_name(gid)})
        shown.append(
            {"query": int(row), "text": query_name(row), "uncertainty": float(result.query_uncertainty[row]),
             "neighbours": neighbours}
        )
    return shown


def print_summary(ood: dict[str, dict[str, float]], retrieval: dict[str, float]) -> None:
    """Print the OoD table (AUROC and mean score in and out of distribution) and the retrieval metrics."""
    print("\nOut-of-distribution detection (OoD = positive class)")
    width = max(map(len, ood))
    print(f"  {'score':<{width}}  {'AUROC':>6}  {'mean ID':>10}  {'mean OoD':>10}")
    for name, v in ood.items():
        print(f"  {name:<{width}}  {v['auroc']:>6.3f}  {v['mean_id']:>10.4g}  {v['mean_ood']:>10.4g}")
    print("\nRetrieval in distribution")
    width = max(map(len, retrieval))
    for name, value in retrieval.items():
        print(f"  {name:<{width}}  {value:.4f}")


def markdown_report(title: str, setup: list[str], ood: dict[str, dict[str, float]], retrieval: dict[str, float]) -> str:
    """A short markdown page: the setup as bullet points, the OoD table, the retrieval metrics."""
    lines = [f"# {title}", "", *[f"- {line}" for line in setup], "", "## Out-of-distribution detection", ""]
    lines += ["| score | AUROC | mean ID | mean OoD |", "|---|:---:|:---:|:---:|"]
    lines += [f"| {name} | {v['auroc']:.3f} | {v['mean_id']:.4g} | {v['mean_ood']:.4g} |" for name, v in ood.items()]
    lines += ["", "## Retrieval (in distribution)", "", "| metric | value |", "|---|:---:|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in retrieval.items()]
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict[str, Any], markdown: str) -> None:
    """``out/results.json`` (strict JSON: a non-finite number is an error) and ``out/results.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    (out / "results.md").write_text(markdown)
