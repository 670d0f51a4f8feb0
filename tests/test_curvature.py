"""posterior.curvature against a brute-force torch.func computation of docs/design.md §2.

The reference builds per-sample Jacobians with one ``jacrev`` over the whole batch,
walks the pairs in a Python loop, and takes each pair's output-space Hessian from
``torch.func.hessian`` of the pair loss: it shares no code with the library's
geometry or backends.
"""

from __future__ import annotations

import logging

import pytest
import torch
from reference_models import MODELS, build_model
from torch.func import functional_call, hessian, jacrev

from lam_plugin import LaplaceEmbedder
from lam_plugin.curvature.base import UnsupportedModelError

MARGIN = 0.7


def _cosine_loss(ab: torch.Tensor) -> torch.Tensor:
    a, b = ab.chunk(2)
    return 1 - (a @ b) / (a.norm() * b.norm())


def _squared_loss(ab: torch.Tensor) -> torch.Tensor:
    a, b = ab.chunk(2)
    return 0.5 * (a - b).pow(2).sum()


def reference_curvature(model, names, batches, geometry, approx, output_key=None):
    model.eval()
    params = dict(model.named_parameters())
    theta0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]
    total = torch.zeros_like(theta0)
    for x, y in batches:
        def out_fn(theta, x=x):
            chunks = dict(zip(names, [c.reshape(params[n].shape) for c, n in zip(theta.split(sizes), names)]))
            out = functional_call(model, chunks, (x,))
            out = out[output_key] if output_key is not None else out
            return torch.nn.functional.normalize(out, dim=-1) if geometry == "euclidean" else out

        jac = jacrev(out_fn)(theta0)  # [B, D, P]
        f = out_fn(theta0).detach()
        z = torch.nn.functional.normalize(f, dim=-1)
        dim = f.shape[1]
        for i in range(len(y)):
            for j in range(i + 1, len(y)):
                pos = bool(y[i] == y[j])
                if not pos and float((z[i] - z[j]).pow(2).sum()) >= MARGIN:
                    continue
                if approx == "pos" and not pos:
                    continue
                loss = _squared_loss if geometry == "euclidean" else _cosine_loss
                h = hessian(loss)(torch.cat([f[i], f[j]]))
                jp = torch.cat([jac[i], jac[j]])  # [2D, P]
                if approx == "fix":
                    h = h.clone()
                    h[:dim, dim:] = 0
                    h[dim:, :dim] = 0
                term = (jp * (h @ jp)).sum(0)
                total += term if pos else -term
    return total.clamp_min(0) if approx in ("fix", "full") else total


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def _fit(model, batches, key, **kw):
    lam = LaplaceEmbedder(model, output_key=key, margin=MARGIN, progress=False, **kw)
    return lam.fit(batches)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("geometry", ["arccos", "euclidean"])
@pytest.mark.parametrize("approx", ["pos", "fix", "full"])
def test_curvature_matches_reference_float64(model_name, subset, geometry, approx):
    model, batches, key, backpack_ok = build_model(model_name, torch.float64)
    backends = ["torch.func", "auto"] + (["backpack"] if backpack_ok else [])
    ref = None
    for backend in backends:
        post = _fit(model, batches, key, subset=subset, geometry=geometry, approx=approx, backend=backend)
        if ref is None:
            ref = reference_curvature(model, post.param_names, batches, geometry, approx, key)
            assert ref.abs().max() > 0, "degenerate test case: zero curvature"
        assert post.curvature.dtype == torch.float64
        assert _relerr(post.curvature, ref) <= 1e-4, (backend, post.stats.backend)


@pytest.mark.parametrize("model_name", ["paper_cnn", "res_cnn_bn", "dict_output", "layernorm_gelu_mlp"])
@pytest.mark.parametrize("geometry", ["arccos", "euclidean"])
@pytest.mark.parametrize("approx", ["pos", "fix", "full"])
def test_curvature_matches_reference_float32(model_name, geometry, approx):
    model, batches, key, backpack_ok = build_model(model_name, torch.float32, seed=1)
    ref_model = build_model(model_name, torch.float64, seed=1)[0]
    ref_batches = [(x.double(), y) for x, y in batches]
    backends = ["torch.func"] + (["backpack"] if backpack_ok else [])
    for subset in ("all", "last_layer"):
        ref = None
        for backend in [*backends, "auto"]:
            post = _fit(model, batches, key, subset=subset, geometry=geometry, approx=approx, backend=backend)
            if ref is None:
                ref = reference_curvature(ref_model, post.param_names, ref_batches, geometry, approx, key)
            assert _relerr(post.curvature.double(), ref) <= 1e-3, (subset, backend)


def test_backend_choice_and_fallback_warning(caplog):
    model, batches, key, _ = build_model("layernorm_gelu_mlp", torch.float64)
    with caplog.at_level(logging.INFO, logger="lam_plugin"):
        post = _fit(model, batches, key, subset="all", backend="auto")
    assert post.stats.backend == "hooks"
    said = [r.getMessage() for r in caplog.records if "BackPACK does not support" in r.getMessage()]
    assert len(said) == 1 and ("LayerNorm" in said[0] or "GELU" in said[0])
    assert said[0].startswith("backend auto: hooks")
    with pytest.raises(UnsupportedModelError, match="LayerNorm|GELU"):
        _fit(model, batches, key, subset="all", backend="backpack")

    cnn, cnn_batches, _, _ = build_model("paper_cnn", torch.float64)
    assert _fit(cnn, cnn_batches, None, subset="all").stats.backend == "backpack"
    assert _fit(cnn, cnn_batches, None, subset="last_layer").stats.backend == "last_layer"
    res, res_batches, _, _ = build_model("res_cnn_bn", torch.float64)
    assert _fit(res, res_batches, None, subset="all").stats.backend == "backpack"
    res_l2, res_l2_batches, _, _ = build_model("res_cnn_bn_l2", torch.float64)
    assert _fit(res_l2, res_l2_batches, None, subset="all").stats.backend == "backpack"
    nested, nested_batches, _, _ = build_model("nested_modules", torch.float64)  # containers of its own classes
    assert _fit(nested, nested_batches, None, subset="all").stats.backend == "backpack"


def test_prefix_subset_matches_reference():
    model, batches, key, _ = build_model("res_cnn_bn", torch.float64)
    post = _fit(model, batches, key, subset=["block.conv", "head.bias"], backend="backpack")
    assert post.param_names == ["block.conv.weight", "block.conv.bias", "head.bias"]
    ref = reference_curvature(model, post.param_names, batches, "arccos", "fix")
    assert _relerr(post.curvature, ref) <= 1e-4


def test_miner_pairs_count_as_given():
    """A triplet miner: every (a, p, n) adds (a, p) and (a, n), duplicates counted."""
    from pytorch_metric_learning.miners import TripletMarginMiner

    model, batches, key, _ = build_model("dict_output", torch.float64)
    miner = TripletMarginMiner(margin=10.0, type_of_triplets="all")
    post = _fit(model, batches, key, subset="all", miner=miner, approx="pos", backend="torch.func")
    # reference: explicit triplet loop, positives weighted by their number of negatives
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    total = torch.zeros_like(post.curvature)
    for x, y in batches:
        a, p, _n = lmu.get_all_triplets_indices(y)
        counts: dict[tuple[int, int], int] = {}
        for ai, pi in zip(a.tolist(), p.tolist()):
            counts[(ai, pi)] = counts.get((ai, pi), 0) + 1
        for (ai, pi), c in counts.items():
            yy = torch.full((len(y),), -1, dtype=torch.long)
            yy[ai] = yy[pi] = 7
            # one positive pair, isolated: reuse the reference on a two-item batch
            sub = [(x[[ai, pi]], torch.tensor([7, 7]))]
            total += c * reference_curvature(model, post.param_names, sub, "arccos", "pos", key)
    assert post.stats.n_positive == sum(len(lmu.get_all_triplets_indices(y)[0]) for _, y in batches)
    assert _relerr(post.curvature, total) <= 1e-6


def _clip_head_case():
    """A clip to [-1, 1] after the last Linear, and two batches: on the first it looks like
    the identity (every output within 1/8, so even the probe's weights scaled by -8 clip
    nothing), on the second it is not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3), torch.nn.Hardtanh(-1.0, 1.0)
    ).double().eval()
    with torch.no_grad():
        x = torch.randn(20000, 10, dtype=torch.float64)
        size = model[:3](x).abs().amax(1)
    small, clipped = x[size < 0.12], x[size > 1.0]
    first, second = small[:6], torch.cat([clipped[:3], small[6:9]])
    batches = [(first, torch.tensor([0, 0, 0, 1, 1, 1])), (second, torch.tensor([0, 1, 0, 1, 0, 1]))]
    return model, batches


def test_a_relu_after_the_last_layer_is_found_where_it_clips_nothing():
    """A ReLU whose inputs are all positive at the fitted weights acts as the identity
    there, but not on weight samples: the probe finds it, and sampling runs the model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4), torch.nn.ReLU())
    with torch.no_grad():
        model[2].bias.fill_(3.0)
    x, y = torch.randn(24, 10), torch.arange(24) % 3
    assert bool((model[:3](x) > 0).all())
    post = LaplaceEmbedder(model, approx="pos", normalize=False, progress=False).fit([(x, y)])
    assert post.config.head is None and post.stats.backend != "last_layer"
    z = post.sample(x[:6], n=20, generator=torch.Generator().manual_seed(0))
    weights = post.sample_weights(20, torch.Generator().manual_seed(0))
    for s in (0, 7, 19):
        w, b = weights[s].split([32, 4])
        torch.testing.assert_close(z[s], functional_call(model, {"2.weight": w.view(4, 8), "2.bias": b}, (x[:6],)))
    assert bool((z == 0).any())  # the samples do clip


def test_a_head_that_looks_like_the_identity_on_the_first_batch(caplog):
    """The closed form of the last layer is checked on every batch: where the model output
    is not the layer's output, the general backend takes over and the curvature stays exact."""
    model, batches = _clip_head_case()
    with caplog.at_level(logging.WARNING, logger="lam_plugin"):
        post = _fit(model, batches, None, approx="pos")
    assert post.stats.backend == "hooks" and post.config.head is None  # BackPACK lacks Hardtanh
    assert any("is not 'identity' of the output of layer '2'" in r.getMessage() for r in caplog.records)
    ref = reference_curvature(model, post.param_names, batches, "arccos", "pos")
    assert _relerr(post.curvature, ref) <= 1e-6
    # a posterior whose fit saw only unclipped outputs samples clipped ones through the model
    fast = _fit(model, batches[:1], None, approx="pos")
    assert fast.config.head == "identity"
    x = batches[1][0]
    weights = fast.sample_weights(5, torch.Generator().manual_seed(0))
    params = {n: w for n, w in zip(fast.param_names, weights[0].split([36, 3]))}
    expected = functional_call(model, {"2.weight": params["2.weight"].view(3, 12), "2.bias": params["2.bias"]}, (x,))
    got = fast.sample(x, n=5, generator=torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(got, torch.nn.functional.normalize(expected, dim=-1))
    assert (expected.abs() == 1).any()  # the clipped outputs were sampled, not refused


def test_online_leaves_the_closed_form_where_the_head_does_not_hold(caplog):
    model, batches = _clip_head_case()
    lam = LaplaceEmbedder(model, approx="pos", prior_precision=1e12, progress=False)  # sampled weights = mean
    trainer = lam.online(batches[0][0], dataset_size=12, lr=1e-9)
    trainer.step(*batches[0])
    assert trainer.backend.name == "last_layer"
    with caplog.at_level(logging.WARNING, logger="lam_plugin"):
        trainer.step(*batches[1])
    # the general backend that "auto" picks for the whole subset takes over
    assert trainer.backend.name == "hooks" and trainer.posterior().config.head is None
    assert any("hooks backend from here on" in r.getMessage() for r in caplog.records)


class _Twice(torch.nn.Module):
    """One Linear (and one Tanh) run twice: ``lin(tanh(lin(tanh(inp(x)))))``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.act, self.lin = torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.act(self.lin(self.act(self.inp(x)))))


def _tied() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh(), torch.nn.Linear(5, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model[2].weight = model[0].weight
    return model


def _conv(**kwargs) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv1d(4, 6, **kwargs), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.LazyLinear(3))


@pytest.mark.parametrize(
    ("case", "refusal"),
    [
        ("twice", "module 'act' run 2 times in the forward"),
        ("tied", "a parameter shared by modules '0' and '2' (tied weights)"),
        ("circular", "convolution '0' with padding_mode='circular'"),
        ("grouped same", "grouped convolution '0' padded 'same' unevenly (kernel (4,))"),
    ],
)
def test_what_backpack_gets_wrong_is_refused_and_auto_stays_exact(case: str, refusal: str):
    """BackPACK keeps one call's input per module, one factor per module of a shared
    parameter, and assumes zero padding placed evenly in grouped convolutions: models
    where those fail are refused by name, and "auto" takes an exact backend."""
    torch.manual_seed(0)
    if case == "twice":
        model, x = _Twice(), torch.randn(8, 5)
    elif case == "tied":
        model, x = _tied(), torch.randn(8, 5)
    else:
        kwargs = {"kernel_size": 3, "padding": 1, "padding_mode": "circular"} if case == "circular" else {}
        model, x = _conv(**(kwargs or {"kernel_size": 4, "padding": "same", "groups": 2})), torch.randn(8, 4, 7)
        model(x)  # materialise the lazy layer
    model = model.double().eval()
    batches = [(x.double(), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))]
    names = [n for n, _ in model.named_parameters()]
    want = reference_curvature(model, names, batches, "arccos", "pos")
    with pytest.raises(UnsupportedModelError, match=refusal.replace("(", r"\(").replace(")", r"\)")):
        _fit(model, batches, None, subset="all", approx="pos", backend="backpack")
    got = _fit(model, batches, None, subset="all", approx="pos")
    assert got.stats.backend != "backpack" and _relerr(got.curvature, want) < 1e-10


def test_a_last_layer_run_twice_has_no_closed_form():
    """The closed form needs the embedding to be the head of one call of the layer: a
    layer run twice is fitted and sampled through the whole model."""
    torch.manual_seed(0)
    model = _Twice().double().eval()
    batches = [(torch.randn(8, 5, dtype=torch.float64), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))]
    posterior = _fit(model, batches, None, subset="last_layer", approx="pos")
    assert posterior.stats.backend != "last_layer" and posterior.config.head is None
    want = reference_curvature(model, ["lin.weight", "lin.bias"], batches, "arccos", "pos")
    assert _relerr(posterior.curvature, want) < 1e-10
    x = batches[0][0]
    weights = posterior.sample_weights(3, torch.Generator().manual_seed(0))
    got = posterior.sample(x, n=3, generator=torch.Generator().manual_seed(0))
    for s in range(3):
        w, b = weights[s].split([16, 4])
        expected = functional_call(model, {"lin.weight": w.view(4, 4), "lin.bias": b}, (x,))
        torch.testing.assert_close(got[s], torch.nn.functional.normalize(expected, dim=-1))


def test_a_batch_redone_by_another_backend_counts_its_pairs_once():
    """The hooks backend refuses a parameter used outside its module only after the batch's
    pairs are counted; the batch is then redone by torch.func, and counted once."""

    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x) + x[:, :3] @ self.fc.weight[:, :3].T

    torch.manual_seed(0)
    batches = [(torch.randn(8, 5), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))] * 2
    want = LaplaceEmbedder(Shared(), backend="torch.func", approx="pos", progress=False).fit(batches).stats
    torch.manual_seed(0)
    got = LaplaceEmbedder(Shared(), backend="auto", approx="pos", progress=False).fit(batches).stats
    assert got.backend == "torch.func"
    assert (got.n_positive, got.n_negative_active, got.n_negative_total) == (
        want.n_positive,
        want.n_negative_active,
        want.n_negative_total,
    ) == (8, want.n_negative_active, 48)


@pytest.mark.parametrize("backend", ["hooks", "last_layer", "backpack"])
def test_online_curvature_runs_the_model_in_eval_mode(backend: str):
    """Each step's curvature pass, like a fit's, runs in eval mode: BatchNorm's statistics
    move with the training forward passes only, and dropout does not change the curvature."""
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Dropout(0.5))
    model = torch.nn.Sequential(body, torch.nn.Linear(8, 4))
    x, y = torch.randn(16, 6), torch.arange(16) % 4
    subset = "all" if backend == "backpack" else "last_layer"  # the hooks backend covers no BatchNorm weights
    trainer = LaplaceEmbedder(model, subset=subset, backend=backend, approx="pos", progress=False).online(x, dataset_size=32)
    model.train()
    for _ in range(2):
        trainer.step(x, y)
    assert int(body[1].num_batches_tracked) == 2  # one training forward per step (one weight sample)
    assert trainer.backend.name == backend
    weights = {n: p.detach() for n, p in model.named_parameters() if n in trainer.target.names}
    first, second = trainer._curvature(x, y, weights), trainer._curvature(x, y, weights)
    assert first is not None and bool((first > 0).any())
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert model.training and body[3].training  # the caller's modes are kept


def test_torch_func_refuses_modules_with_backward_hooks_by_name():
    """torch wraps a module with a full backward hook in an autograd.Function that vmap
    cannot transform: refused before any work, and "auto" takes the hooks backend."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    model[3].register_full_backward_hook(lambda *args: None)
    batches = [(torch.randn(8, 6), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))]
    with pytest.raises(UnsupportedModelError, match=r"torch.func cannot run modules with backward hooks registered \('3'\)"):
        _fit(model, batches, None, subset="all", approx="pos", backend="torch.func")
    assert _fit(model, batches, None, subset="all", approx="pos").stats.backend == "hooks"
    assert len(model[3]._backward_hooks) == 1  # the user's hook is left in place
