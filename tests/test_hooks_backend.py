"""The hooks and Monte Carlo curvature backends against a brute-force reference.

The reference shares no code with the library's backends or geometry: per-sample
Jacobians come from an autograd loop over samples and output dimensions (vmap cannot
run a Hugging Face model), and each pair's output-space Hessian from
``torch.func.hessian`` of the pair loss, as in ``test_curvature.py``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import hessian

from lam_plugin.calling import ModelCall
from lam_plugin.curvature.base import UnsupportedModelError
from lam_plugin.curvature.functorch import FunctorchBackend
from lam_plugin.curvature.hooks import HooksBackend, hooks_support
from lam_plugin.curvature.montecarlo import MonteCarloBackend
from lam_plugin.geometry import output_hessian
from lam_plugin.pairs import PairSelection

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MARGIN = 0.7
LABELS = torch.tensor([0, 0, 0, 1, 1, 2])


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
class TokenMLP(nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear on 3 tokens, mean over tokens, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 6))
        self.head = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).mean(dim=1))


class SmallCNN(nn.Module):
    """Reflect padding, an in-place ReLU after a convolution, a grouped strided convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, groups=2)
        self.head = nn.Linear(54, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv2(self.act(self.conv1(x)))).flatten(1))


class TokenEmbedder(nn.Module):
    """Embedding with a padding index -> Conv1d over tokens -> mean -> a Linear used twice -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8, padding_idx=0)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, ids: Tensor) -> Tensor:
        h = F.gelu(self.conv(self.emb(ids).transpose(1, 2))).mean(dim=2)
        return self.head(torch.tanh(self.mix(torch.tanh(self.mix(h)))))


def small_bert(tmp: str):
    """A 2-layer BERT (hidden 16) inside a sentence-transformers model, built offline."""
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
    )
    texts = ["w1 w2 w3", "w4 w5 w1", "w6 w7 w8 w9 w10 w11", "w3 w3", "w12 w13 w14 w2", "w20"]
    feats = model.preprocess(texts)
    x = {k: feats[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    return model.eval(), x


def _build(name: str, tmp_path_factory) -> tuple[nn.Module, object, dict[str, list[str]]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "token_mlp":
        model, x = TokenMLP(), torch.randn(6, 3, 10, generator=g)
        last, prefixes = "head", ["body.1", "body.3.bias", "head"]
    elif name == "cnn":
        model, x = SmallCNN(), torch.randn(6, 1, 8, 8, generator=g)
        last, prefixes = "head", ["conv1.weight", "conv2"]
    elif name == "embedding":
        model = TokenEmbedder()
        x = torch.randint(1, 30, (6, 7), generator=g)
        x[:, 5:] = 0  # padding
        x[0, :3] = 4  # a row repeated within a sample and across samples
        x[1, 0] = 4
        last, prefixes = "head", ["emb", "mix.weight"]
    else:
        model, x = small_bert(str(tmp_path_factory.mktemp("bert")))
        last = "0.model.encoder.layer.1.output.dense"
        prefixes = ["0.model.embeddings", "0.model.encoder.layer.0.attention.self.query",
                    "0.model.encoder.layer.1.output.LayerNorm"]
    names = [n for n, _ in model.named_parameters()]
    subsets = {
        "all": names,
        "last": [n for n in names if n.startswith(last + ".")],
        "prefixes": [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)],
    }
    return model.eval(), x, subsets


MODELS = ["token_mlp", "cnn", "embedding", "small_bert"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    built: dict[str, tuple] = {}

    def get(name: str):
        if name not in built:
            built[name] = _build(name, tmp_path_factory)
        return built[name]

    return get


# --------------------------------------------------------------------------------------------
# the brute-force reference
# --------------------------------------------------------------------------------------------
def _copy_inputs(x):
    return dict(x) if isinstance(x, Mapping) else x


def brute_jacobian(model: nn.Module, x, normalize: bool) -> tuple[Tensor, Tensor]:
    """``(J [B, D, P] over all parameters, outputs [B, D])`` by one backward pass per
    sample and output dimension."""
    params = [p for _, p in model.named_parameters()]
    leaves = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    out = ModelCall().functional(model, leaves, _copy_inputs(x))
    if normalize:
        out = F.normalize(out, dim=-1)
    rows = []
    for k in range(out.shape[0]):
        for d in range(out.shape[1]):
            grads = torch.autograd.grad(out[k, d], list(leaves.values()), retain_graph=True, allow_unused=True)
            flat = [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]
            rows.append(torch.cat(flat))
    return torch.stack(rows).view(out.shape[0], out.shape[1], -1), out.detach()


def _cosine_loss(ab: Tensor) -> Tensor:
    a, b = ab.chunk(2)
    return 1 - (a @ b) / (a.norm() * b.norm())


def _squared_loss(ab: Tensor) -> Tensor:
    a, b = ab.chunk(2)
    return 0.5 * (a - b).pow(2).sum()


def reference_diagonal(jac: Tensor, f: Tensor, labels: Tensor, geometry: str, approx: str) -> Tensor:
    """Signed ``sum_pairs diag(J_pair^T H_pair J_pair)`` of one batch (no relu)."""
    z = F.normalize(f, dim=-1)
    dim = f.shape[1]
    total = torch.zeros(jac.shape[-1], dtype=jac.dtype)
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            pos = bool(labels[i] == labels[j])
            if not pos and (float((z[i] - z[j]).pow(2).sum()) >= MARGIN or approx == "pos"):
                continue
            loss = _squared_loss if geometry == "euclidean" else _cosine_loss
            h = hessian(loss)(torch.cat([f[i], f[j]]))
            if approx == "fix":
                h = h.clone()
                h[:dim, dim:] = 0
                h[dim:, :dim] = 0
            jp = torch.cat([jac[i], jac[j]])
            term = (jp * (h @ jp)).sum(0)
            total += term if pos else -term
    return total


_REFERENCE: dict[tuple, tuple[Tensor, Tensor]] = {}


def reference(cases, name: str, dtype: torch.dtype, geometry: str) -> tuple[Tensor, Tensor]:
    """Cached ``(J, f)`` in float64 of model ``name`` (J of the normalised output for euclidean)."""
    key = (name, geometry)
    if key not in _REFERENCE:
        model, x, _ = cases(name)
        ref_model = copy.deepcopy(model).double()
        ref_x = x.double() if isinstance(x, Tensor) and x.is_floating_point() else x
        _REFERENCE[key] = brute_jacobian(ref_model, ref_x, normalize=geometry == "euclidean")
    return _REFERENCE[key]


def _select(model: nn.Module, names: list[str]) -> Tensor:
    """Columns of the all-parameter Jacobian that belong to ``names``."""
    mask = [torch.full((p.numel(),), n in names) for n, p in model.named_parameters()]
    return torch.cat(mask)


def _hessian_fn(geometry: str, approx: str):
    return lambda f: output_hessian(f, PairSelection(margin=MARGIN)(LABELS, f), geometry, approx)


def _relerr(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: two threads only add synchronisation to every small op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _as(x, dtype: torch.dtype):
    return x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x


def _hooks(model, x, names, geometry, approx, **kw) -> Tensor:
    return HooksBackend(model, ModelCall(), names, **kw).batch(x, _hessian_fn(geometry, approx))[0]


# --------------------------------------------------------------------------------------------
# exactness
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("geometry", ["arccos", "euclidean"])
@pytest.mark.parametrize("approx", ["fix", "pos", "full"])
def test_hooks_match_reference_float64(cases, name, geometry, approx):
    model, x, subsets = cases(name)
    model64 = copy.deepcopy(model).double()
    jac, f = reference(cases, name, torch.float64, geometry)
    for subset, names in subsets.items():
        ref = reference_diagonal(jac[:, :, _select(model64, names)], f, LABELS, geometry, approx)
        assert ref.abs().max() > 0, "degenerate test case: zero curvature"
        diag = _hooks(model64, _as(x, torch.float64), names, geometry, approx)
        assert diag.dtype == torch.float64 and diag.shape == ref.shape
        assert _relerr(diag, ref) <= 1e-4, subset


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("geometry", ["arccos", "euclidean"])
@pytest.mark.parametrize("approx", ["fix", "pos", "full"])
def test_hooks_match_reference_float32(cases, name, geometry, approx):
    model, x, subsets = cases(name)
    jac, f = reference(cases, name, torch.float64, geometry)
    ref = reference_diagonal(jac, f, LABELS, geometry, approx)
    diag = _hooks(model, x, subsets["all"], geometry, approx)
    assert diag.dtype == torch.float32
    assert _relerr(diag, ref) <= 1e-3


@pytest.mark.parametrize("approx", ["fix", "pos", "full"])
def test_small_memory_budget_takes_every_chunked_route(cases, approx):
    """A budget of a few hundred elements forces per-sample gradients (fix) or Jacobians
    (pos, full) instead of token pairs, chunks of one direction, of a few rows, and one
    module group per pass set; the default budget takes the token pairs."""
    model, x, subsets = cases("small_bert")
    model64 = copy.deepcopy(model).double()
    big = _hooks(model64, x, subsets["all"], "arccos", approx)
    small = _hooks(model64, x, subsets["all"], "arccos", approx, max_elements=300)
    assert _relerr(small, big) <= 1e-10


def test_token_pairs_that_do_not_fit_run_in_groups_of_samples(cases, monkeypatch):
    """Where the token-pair accumulators of the whole batch exceed the budget, groups of
    samples run apart (each with its own forward pass), and the sum is the same."""
    from lam_plugin.curvature import hooks
    from lam_plugin.curvature._hooked_forward import batch_size

    model, x, subsets = cases("small_bert")
    model64 = copy.deepcopy(model).double()
    names = subsets["last"]
    whole = _hooks(model64, x, names, "arccos", "fix")
    forwards = []
    real = hooks.hooked_forward
    monkeypatch.setattr(hooks, "hooked_forward", lambda *a, **k: forwards.append(a[3]) or real(*a, **k))
    tokens = x["input_ids"].shape[1]
    per_sample = 16 * tokens * tokens  # O T^2 of the last dense layer (O = 16)
    backend = HooksBackend(model64, ModelCall(), names, max_elements=2 * per_sample)
    backend.trim_padding = False
    grouped = backend.batch(x, _hessian_fn("arccos", "fix"))[0]
    sizes = [batch_size(b) for b in forwards]
    assert sizes == [6, 2, 2, 2]  # the whole batch, then three groups of two
    assert _relerr(grouped, whole) <= 1e-10


def test_right_padded_batches_run_in_groups_cut_to_their_length(cases, monkeypatch):
    """Samples of a right-padded batch run by decreasing length, each group cut to its
    longest sample; a model whose embedding depends on the padding runs uncut."""
    from lam_plugin.curvature import hooks

    model, x, subsets = cases("small_bert")
    model64 = copy.deepcopy(model).double()
    names = subsets["last"]
    lengths = x["attention_mask"].sum(1)
    assert int(lengths.min()) < x["input_ids"].shape[1], "degenerate test case: no padding"
    plain = HooksBackend(model64, ModelCall(), names)
    plain.trim_padding = False
    whole = plain.batch(x, _hessian_fn("arccos", "fix"))[0]
    forwards = []
    real = hooks.hooked_forward
    monkeypatch.setattr(hooks, "hooked_forward", lambda *a, **k: forwards.append(a[3]) or real(*a, **k))
    tokens = x["input_ids"].shape[1]
    cut = HooksBackend(model64, ModelCall(), names, max_elements=3 * 16 * tokens * tokens)
    trimmed = cut.batch(x, _hessian_fn("arccos", "fix"))[0]
    assert _relerr(trimmed, whole) <= 1e-10
    shapes = [tuple(b["input_ids"].shape) for b in forwards[1:]]
    assert sum(s[0] for s in shapes) == 6 and len(shapes) >= 2
    assert shapes[-1][1] < tokens  # the shortest samples ran without the batch's padding
    assert cut.trim_padding

    class PaddingCounts(nn.Module):
        """Mean over every token, the padded ones too."""

        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(100, 64)
            self.lin = nn.Linear(64, 5)  # wide inputs: token pairs are the cheaper route

        def forward(self, features):
            return self.lin(torch.tanh(self.emb(features["input_ids"]))).mean(dim=1)

    counts = PaddingCounts().double()
    ids = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}
    ref = HooksBackend(counts, ModelCall(), ["lin.weight", "lin.bias"])
    ref.trim_padding = False
    expected = ref.batch(ids, _hessian_fn("arccos", "fix"))[0]
    tried = HooksBackend(counts, ModelCall(), ["lin.weight", "lin.bias"], max_elements=2 * 5 * tokens * tokens)
    assert _relerr(tried.batch(ids, _hessian_fn("arccos", "fix"))[0], expected) <= 1e-10
    assert not tried.trim_padding


def test_unused_parameters_get_zero(cases):
    """The BERT pooler runs but the mean-pooled embedding does not use it."""
    model, x, subsets = cases("small_bert")
    names = subsets["all"]
    diag = _hooks(model, x, names, "arccos", "fix")
    sizes = [p.numel() for n, p in model.named_parameters()]
    parts = dict(zip(names, diag.split(sizes)))
    assert all(float(parts[n].abs().max()) == 0 for n in names if ".pooler." in n)
    assert float(parts["0.model.encoder.layer.1.output.dense.weight"].abs().max()) > 0


def test_vmap_cannot_run_the_small_bert(cases):
    """What makes this backend necessary: torch.func's vmap stops on Hugging Face code."""
    model, x, subsets = cases("small_bert")
    with pytest.raises(RuntimeError, match="vmap"):
        FunctorchBackend(model, ModelCall(), subsets["last"]).batch(x, _hessian_fn("arccos", "fix"))


# --------------------------------------------------------------------------------------------
# Monte Carlo
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "approx, estimator, bound", [("fix", "per-sample", 0.1), ("fix", "full-batch", 0.15), ("full", "auto", 0.2)]
)
def test_montecarlo_mean_converges_to_the_exact_diagonal(cases, approx, estimator, bound):
    model, x, subsets = cases("small_bert")
    model64, names = copy.deepcopy(model).double(), subsets["all"]
    exact = _hooks(model64, x, names, "arccos", approx)
    errors = []
    for samples in (4, 64, 256):
        mc = MonteCarloBackend(
            model64, ModelCall(), names, samples=samples, generator=torch.Generator().manual_seed(1),
            estimator=estimator,
        )
        errors.append(_relerr(mc.batch(x, _hessian_fn("arccos", approx))[0], exact))
    assert errors[2] < errors[1] < errors[0], errors
    assert errors[2] <= bound, errors


def test_montecarlo_full_batch_runs_any_module():
    """A parameter the hooks cannot cover (nn.MultiheadAttention's in_proj_weight)."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(4, 2, batch_first=True).double().eval()

    class Pool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attn

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x, x, x, need_weights=False)[0].mean(dim=1)

    model = Pool().eval()
    names = ["attn.in_proj_weight"]
    assert "MultiheadAttention" in hooks_support(model, names)
    x = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    jac, f = brute_jacobian(model, x, normalize=False)
    exact = reference_diagonal(jac[:, :, _select(model, names)], f, LABELS, "arccos", "fix")
    mc = MonteCarloBackend(model, ModelCall(), names, samples=1024, generator=torch.Generator().manual_seed(0))
    assert _relerr(mc.batch(x, _hessian_fn("arccos", "fix"))[0], exact) <= 0.1


def test_montecarlo_falls_back_to_full_batch_squares(caplog):
    """A parameter used outside its module's forward: the hooks' check fails, and
    ``estimator="auto"`` goes on with full-batch squares (``"per-sample"`` raises)."""
    model = FunctionalReuse().double()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    jac, f = brute_jacobian(model, x, normalize=False)
    names = ["fc.weight"]
    exact = reference_diagonal(jac[:, :, _select(model, names)], f, LABELS, "arccos", "fix")
    with pytest.raises(UnsupportedModelError, match="fc.weight"):
        MonteCarloBackend(model, ModelCall(), names, estimator="per-sample").batch(x, _hessian_fn("arccos", "fix"))
    mc = MonteCarloBackend(model, ModelCall(), names, samples=2048, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="lam_plugin"):
        estimate = mc.batch(x, _hessian_fn("arccos", "fix"))[0]
    assert any("full-batch" in r.getMessage() for r in caplog.records)
    assert _relerr(estimate, exact) <= 0.1


@pytest.mark.parametrize("approx", ["fix", "full"])
@pytest.mark.parametrize("backend", ["hooks", "montecarlo"])
def test_a_zero_norm_output_raises_the_floating_point_error_of_every_backend(backend, approx):
    """Design §3: a non-finite curvature is a FloatingPointError that names zero-norm
    outputs, here as with torch.func, not an ``eigh`` that fails to converge on the NaN
    directions of the output Hessian's blocks; in a fit and in an online step."""
    from lam_plugin import LaplaceEmbedder

    x, y = torch.randn(12, 10, generator=torch.Generator().manual_seed(0)), torch.arange(12) % 3
    x[0] = 0.0  # a bias-free network maps it to the zero vector
    model = nn.Sequential(nn.Linear(10, 16, bias=False), nn.Tanh(), nn.Linear(16, 4, bias=False))
    lam = LaplaceEmbedder(model, subset="all", backend=backend, approx=approx, progress=False)
    message = f"the {backend} backend produced a non-finite curvature; check the model outputs for zero-norm"
    with pytest.raises(FloatingPointError, match=message):
        lam.fit([(x, y)])
    pytest.importorskip("pytorch_metric_learning")  # the loss of online LAM
    with pytest.raises(FloatingPointError, match=message):
        lam.fit_online([(x, y)], epochs=1, dataset_size=12)


@pytest.mark.parametrize("approx", ["fix", "pos", "full"])
@pytest.mark.parametrize("backend", ["hooks", "montecarlo", "backpack"])
def test_a_zero_norm_output_in_no_pair_adds_nothing(backend, approx):
    """A zero-norm output whose label has no other item and whose negatives' hinges are
    inactive is in no pair: every backend gives the curvature of the other items, as
    torch.func does, rather than ``0 * NaN``."""
    from lam_plugin import LaplaceEmbedder

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8, bias=False), nn.Tanh(), nn.Linear(8, 4, bias=False)).double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 0, 1, 2])
    x[3] = 0.0

    def fit(name: str) -> Tensor:
        lam = LaplaceEmbedder(model, subset="all", backend=name, approx=approx, progress=False, mc_samples=4096)
        return lam.fit([(x, y)]).curvature

    ref, got = fit("torch.func"), fit(backend)
    assert bool(torch.isfinite(got).all()) and ref.abs().max() > 0
    assert _relerr(got, ref) <= (0.2 if backend == "montecarlo" else 1e-10)


# --------------------------------------------------------------------------------------------
# the user's model is left as it was; what the hooks cannot cover is named
# --------------------------------------------------------------------------------------------
def _state(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (list(m._forward_hooks), list(m._forward_pre_hooks), list(m._backward_hooks))
                  for n, m in model.named_modules()},
    }


def _same(a: dict, b: dict) -> bool:
    def eq(u, v):
        if isinstance(u, dict):
            return u.keys() == v.keys() and all(eq(u[k], v[k]) for k in u)
        if isinstance(u, Tensor):
            return isinstance(v, Tensor) and torch.equal(u, v)
        return u == v

    return eq(a, b)


@pytest.mark.parametrize("name", ["cnn", "small_bert"])
def test_the_model_is_left_as_it_was(cases, name):
    model, x, subsets = cases(name)
    model = copy.deepcopy(model)
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[1].grad = torch.ones_like(params[1])
    handle = model.register_forward_hook(lambda *args: None)
    before = _state(model)
    x_before = dict(x) if isinstance(x, Mapping) else x.clone()
    names = subsets["all"]
    for approx in ("fix", "full"):
        HooksBackend(model, ModelCall(), names).batch(x, _hessian_fn("arccos", approx))
        MonteCarloBackend(model, ModelCall(), names, samples=2).batch(x, _hessian_fn("arccos", approx))
    assert _same(_state(model), before)
    if isinstance(x, Mapping):  # sentence-transformers writes its outputs into the dict it is given
        assert list(x) == list(x_before)
    handle.remove()


class FunctionalReuse(nn.Module):
    """``fc.weight`` also enters the output outside ``fc``'s forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + 0.5 * F.linear(x, self.fc.weight)


class NeverRuns(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.spare = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class BatchCoupled(nn.Module):
    """Subtracts the batch mean: the samples interact."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return torch.tanh(h - h.mean(dim=0))


def test_what_the_hooks_cannot_cover_is_named():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    fix = _hessian_fn("arccos", "fix")
    with pytest.raises(UnsupportedModelError, match="'fc.weight'"):
        HooksBackend(FunctionalReuse(), ModelCall(), ["fc.weight"]).batch(x, fix)
    with pytest.raises(UnsupportedModelError, match="'spare'.*did not run"):
        HooksBackend(NeverRuns(), ModelCall(), ["fc.weight", "spare.weight"]).batch(x, fix)
    with pytest.raises(UnsupportedModelError, match="interact"):
        HooksBackend(BatchCoupled(), ModelCall(), ["fc.weight"]).batch(x, fix)
    gelu = nn.Sequential(nn.Linear(4, 4), nn.PReLU())
    assert "'1' (PReLU)" in hooks_support(gelu, ["0.weight", "1.weight"])
    assert hooks_support(gelu, ["0.weight", "0.bias"]) is None
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    tied[1].weight = tied[0].weight
    assert "shared" in hooks_support(tied, ["0.weight"])
    assert "max_norm" in hooks_support(nn.Embedding(5, 4, max_norm=1.0), ["weight"])
    with pytest.raises(UnsupportedModelError, match="PReLU"):
        HooksBackend(gelu, ModelCall(), ["1.weight"])


# --------------------------------------------------------------------------------------------
# through LaplaceEmbedder
# --------------------------------------------------------------------------------------------
def test_laplace_embedder_fit_with_the_hooks_backend(cases):
    from lam_plugin import LaplaceEmbedder

    model, x, subsets = cases("small_bert")
    model64 = copy.deepcopy(model).double()
    labels = [torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([1, 1, 1, 1, 1, 0])]
    batches = [(x, labels[0]), ({k: v.flip(0) for k, v in x.items()}, labels[1])]
    post = LaplaceEmbedder(model64, subset="all", backend="hooks", margin=MARGIN, progress=False).fit(batches)
    assert post.stats.backend == "hooks"
    assert post.param_names == subsets["all"]
    total = torch.zeros_like(post.curvature)
    for xb, yb in batches:
        jac, f = brute_jacobian(model64, xb, normalize=False)
        total += reference_diagonal(jac, f, yb, "arccos", "fix")
    assert (total > 0).any() and (total < 0).any(), "degenerate test case: the relu changes nothing or all"
    assert _relerr(post.curvature, total.clamp_min(0)) <= 1e-4


def test_a_sentence_transformers_model_with_no_option(cases):
    """``LaplaceEmbedder(model)`` as a new user writes it: the last Linear the embedding
    uses (not the unused pooler), the hooks backend chosen and named, the exact diagonal,
    and predict / index on the features dicts, the model and the batches left as they were."""
    from lam_plugin import LaplaceEmbedder, UncertainIndex

    model, x, _ = cases("small_bert")
    model64 = copy.deepcopy(model).double()
    before = {n: p.detach().clone() for n, p in model64.state_dict().items()}
    keys = set(x)
    batches = [(x, torch.tensor([0, 0, 0, 0, 1, 1])), ({k: v.flip(0) for k, v in x.items()}, torch.tensor([1, 1, 0, 0, 1, 0]))]
    post = LaplaceEmbedder(model64, margin=MARGIN, progress=False).fit(batches)
    last = "0.model.encoder.layer.1.output.dense"
    assert post.param_names == [f"{last}.weight", f"{last}.bias"]
    assert post.stats.backend == "hooks"
    names = [n for n, _ in model64.named_parameters()]
    where = [i for i, n in enumerate(names) if n.startswith(last + ".")]
    total = 0
    for xb, yb in batches:
        jac, f = brute_jacobian(model64, xb, normalize=False)
        sizes = [p.numel() for p in model64.parameters()]
        offsets = torch.tensor([0, *sizes]).cumsum(0)
        cols = torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in where])
        total = total + reference_diagonal(jac[..., cols], f, yb, "arccos", "fix")
    assert _relerr(post.curvature, total.clamp_min(0)) <= 1e-4
    pred = post.predict(x, n=4, generator=torch.Generator().manual_seed(0))
    assert pred.mean.shape == (6, 16) and bool((pred.uncertainty > 0).all())
    index = UncertainIndex(post, n_samples=4, progress=False).add([x, x])
    hits = index.search(x, k=2)
    assert hits.ids.shape == (6, 2) and (hits.variances >= 0).all()
    assert set(x) == keys
    after = model64.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
