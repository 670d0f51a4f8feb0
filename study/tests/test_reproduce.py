"""The FashionMNIST protocol end to end on tiny synthetic data, the plots and the CLI."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

from lam_plugin import metrics as M
from lam_study import cli, plots
from lam_study import reproduce as R
from lam_study.data import DatasetNotFoundError, ImageDataset
from lam_study.reproduce import runner
from lam_study.reproduce.markdown import _cache_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic(n: int, classes: int, seed: int, kind: str = "id") -> ImageDataset:
    """28x28 uint8 images: class c is a bright horizontal band at a class-specific row
    (``kind="id"``) or a vertical band (``kind="ood"``), plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randint(0, 60, (n, 1, 28, 28), generator=g)
    for i, c in enumerate(labels.tolist()):
        pos = 2 + 5 * c
        if kind == "id":
            images[i, 0, pos : pos + 4, :] += 180
        else:
            images[i, 0, :, pos : pos + 4] += 180
    return ImageDataset(images.clamp(0, 255).to(torch.uint8), labels.long(), f"synthetic-{kind}")


@pytest.fixture(scope="module")
def data() -> R.ProtocolData:
    return R.ProtocolData(train=synthetic(200, 4, 0), test=synthetic(60, 4, 1), ood=synthetic(40, 4, 2, "ood"))


def tiny_config(**overrides) -> R.ReproduceConfig:
    methods = ["deterministic", "deep_ensemble", "pfe", "mc_dropout", "lam_posthoc", "lam_online"]
    settings = dict(
        seeds=(1,),
        methods=tuple(methods),
        epochs=1,
        batch_size=32,
        lam_batch_size=32,
        n_samples=8,
        ensemble_size=2,
        eval_batch_size=25,
        max_pairs=200,
        val_fraction=0.2,
        prior_precision="auto",  # exercises the validation choice (the default is the paper's 1)
        # the default recipe's optimiser, decay and triplet loss, at lr 1e-3: its own lr
        # (1e-3 x batch size) blows the network's outputs up on 160 synthetic images
        lr=1e-3,
        online_lr=1e-3,
        quick=True,
    )
    settings.update(overrides)
    return R.ReproduceConfig(**settings)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("run")
    config = tiny_config()
    return config, out, R.reproduce_fashionmnist(config, out, data=data, progress=False, command="test")


def test_results_json_schema(first_run):
    config, out, _result = first_run
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "fashionmnist"
    assert results["seeds"] == [1]
    assert results["quick"] is True
    assert list(results["methods"]) == [m for m in R.ALL_METHODS if m in config.methods]
    for name, row in results["methods"].items():
        assert list(row) == list(R.METRICS)
        for metric, stat in row.items():
            assert set(stat) == {"mean", "std"}
            undefined = name == "deterministic" and metric in R.UNCERTAINTY_METRICS
            if undefined:
                assert stat == {"mean": None, "std": None}
            else:
                assert isinstance(stat["mean"], float) and math.isfinite(stat["mean"]), (name, metric)
                assert stat["std"] == 0.0  # one seed
                assert 0.0 <= stat["mean"] <= 1.0
    for key in ("wall_time_s", "machine", "command", "per_seed", "config", "lam_posthoc"):
        assert key in results
    assert results["command"] == "test"
    lam = results["lam_posthoc"]
    assert lam["selection"] == "validation"
    assert lam["candidates"] == ["marglik", "1", "10", "100", "1000", "10000", "100000", "1e+06"]
    assert lam["prior_precision"] in lam["candidates"]
    assert set(lam["validation"]["1"]) == set(lam["candidates"])
    best = min(lam["candidates"], key=lambda c: lam["validation"]["1"][c]["ece"])
    assert lam["validation"]["1"][lam["prior_precision"]]["ece"] == lam["validation"]["1"][best]["ece"]
    chosen_value = lam["prior_values"]["1"][lam["prior_precision"]]
    assert results["per_seed"]["lam_posthoc"]["1"]["info_prior_precision"] == chosen_value
    assert 0.0 <= lam["curvature"]["1"]["zero_fraction"] <= 1.0
    assert results["per_seed"]["deep_ensemble"]["1"]["info_member_seeds"] == [1, 2]
    assert results["per_seed"]["lam_posthoc"]["1"]["n_samples"] == 8
    uncertain = {m for m in config.methods if m != "deterministic"}
    assert set(results["supplementary"]) == uncertain
    for name in uncertain:
        for metric in R.SUPPLEMENTARY_METRICS:
            mean = results["supplementary"][name][metric]["mean"]
            if metric == "ece_certain_dropped" and mean is None:
                # undefined when every query has confidence 1.0, as on these tiny data
                assert results["per_seed"][name]["1"]["ece_certain_dropped"] is None
                continue
            assert 0.0 <= mean <= 1.0, (name, metric)


def test_results_markdown_table(first_run):
    config, out, result = first_run
    text = (out / "results.md").read_text()
    header = "| Method | Source | mAP@1 ↑ | mAP@5 ↑ | mAP@10 ↑ | AUROC ↑ | AUPRC ↑ | AUSC ↑ | ECE ↓ |"
    assert header in text and header in result.table
    rows = [line for line in result.table.splitlines()[2:]]
    ours = [r for r in rows if "| this run (1 seed) |" in r]  # one seed: the mean alone
    assert len(ours) == len(config.methods) and config.seeds == (1,)
    det = next(r for r in ours if r.startswith("| Deterministic |"))
    assert det.count("—") == 4
    assert "| paper | 0.78 ± 0.01 | 0.73 ± 0.01 | 0.72 ± 0.01 | — | — | — | — |" in text
    assert "## Supplementary: the AUPRC and ECE as the paper's code computes them" in text
    assert "| AUPRC (trapezoid) | AUPRC (protocol) | ECE (confidence 1.0 dropped) | ECE (protocol) |" in text
    lam = next(r for r in ours if r.startswith("| LAM (post-hoc) |"))
    cells = [c.strip() for c in lam.strip("|").split("|")][2:]
    assert len(cells) == 7 and not any("±" in c for c in cells)
    assert float(cells[3]) == pytest.approx(result.results["methods"]["lam_posthoc"]["auroc"]["mean"], abs=0.005)
    assert "Post-hoc prior precision" in text and "val ECE" in text
    assert "| Method | AUROC (Σ Var u) | AUPRC (Σ Var u) | AUROC (protocol) | AUPRC (protocol) |" in text


def test_plots_are_png(first_run):
    _, out, result = first_run
    for name in ("roc.png", "pr.png", "sparsification.png", "reliability.png"):
        path = out / name
        assert path in result.files
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 2000
        from matplotlib.image import imread

        assert imread(path).ndim == 3


def test_cache_is_used_on_rerun(first_run, data):
    config, out, first = first_run
    assert first.trained, "the first run must train"
    cached = sorted(p.name for p in (out / "cache").glob("*.safetensors"))
    assert set(first.trained) == set(cached)
    assert any(name.startswith("deterministic-seed1-") for name in cached)
    assert any(name.startswith("lam_posthoc-seed1-") for name in cached)

    calls = []
    real = runner.train_contrastive
    runner.train_contrastive = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:  # every model is cached, so evaluating cached models only must succeed
        second = R.reproduce_fashionmnist(config, out, data=data, progress=False, cached_only=True)
    finally:
        runner.train_contrastive = real
    assert second.trained == [] and calls == []
    assert set(second.loaded) == set(cached)
    again = json.loads((out / "results.json").read_text())
    assert again["trained"] == []
    # the report says that its wall time excludes the training of the loaded models
    assert f"trained or fitted 0 model(s) and loaded {len(cached)} from the cache" in (out / "results.md").read_text()
    assert _cache_text({"trained": first.trained, "loaded_from_cache": []}) == ""  # a run that trained all
    # same models, same seeds: identical numbers
    for name, row in first.results["methods"].items():
        for metric, stat in row.items():
            if stat["mean"] is not None:
                assert again["methods"][name][metric]["mean"] == pytest.approx(stat["mean"], abs=1e-9), (name, metric)


def test_cached_only_refuses_to_train_and_names_the_missing_model(monkeypatch, tmp_path, data):
    calls = training_calls(monkeypatch)
    config = tiny_config(methods=("deterministic", "lam_posthoc"))
    with pytest.raises(R.CacheMissError, match=r"the deterministic network, seed 1, is not in the cache") as err:
        R.reproduce_fashionmnist(config, tmp_path, data=data, progress=False, cached_only=True)
    assert str(tmp_path / "cache" / "deterministic-seed1-") in str(err.value)
    assert calls == [] and not (tmp_path / "results.json").exists()
    # the network cached, its post-hoc fit not: that is the next miss
    R.reproduce_fashionmnist(R.with_overrides(config, methods=("deterministic",)), tmp_path, data=data, progress=False)
    with pytest.raises(R.CacheMissError, match="the post-hoc LAM curvature, seed 1"):
        R.reproduce_fashionmnist(config, tmp_path, data=data, progress=False, cached_only=True)


def test_cached_only_refuses_a_missing_refit_of_cached_online_networks(first_run, data):
    config, out, _ = first_run
    refit = R.with_overrides(config, methods=("lam_online",), online_posterior="refit", posthoc_approx="pos")
    with pytest.raises(R.CacheMissError, match="the post-hoc LAM curvature of online LAM's weights, seed 1"):
        R.reproduce_fashionmnist(refit, out, data=data, progress=False, cached_only=True)


def test_cli_cached_only_with_an_empty_cache_is_a_clean_error(monkeypatch, capsys, tmp_path, data):
    monkeypatch.setattr(R, "load_fashionmnist_protocol", lambda root=None: data)
    code = cli.main(["reproduce", "fashionmnist", "--seeds", "2", "--methods", "deterministic", "--epochs", "1",
                     "--no-progress", "--cached-only", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "is not in the cache" in err and "--cached-only" in err and "Traceback" not in err


def test_changed_config_gets_its_own_cache_entry(tmp_path, data):
    config = tiny_config(methods=("deterministic",), val_fraction=0.0, prior_precision=1.0)
    first = R.reproduce_fashionmnist(config, tmp_path, data=data, progress=False)
    second = R.reproduce_fashionmnist(R.with_overrides(config, lr=2e-3), tmp_path, data=data, progress=False)
    assert len(first.trained) == len(second.trained) == 1
    assert first.trained != second.trained
    assert not (tmp_path / "roc.png").exists()  # no method with an uncertainty: no curves


def training_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every ``train_contrastive`` call that reproduce makes from now on."""
    seen: list[dict] = []
    real = runner.train_contrastive

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "train_contrastive", spy)
    return seen


def test_keep_best_epoch_reaches_training_and_the_cache_key(monkeypatch, tmp_path, data):
    from safetensors import safe_open

    seen = training_calls(monkeypatch)
    config = tiny_config(methods=("deterministic",), epochs=2, prior_precision=1.0)
    last = R.reproduce_fashionmnist(config, tmp_path, data=data, progress=False)
    best = R.reproduce_fashionmnist(R.with_overrides(config, keep_best_epoch=True), tmp_path, data=data, progress=False)
    assert seen[0]["validation"] is None and not seen[0]["keep_best"]
    val_x, val_y = seen[1]["validation"]
    assert seen[1]["keep_best"] and len(val_y) == last.results["data"]["sizes"]["val"] == len(val_x)
    assert last.trained and best.trained and last.trained != best.trained
    with safe_open(str(tmp_path / "cache" / best.trained[0]), "pt") as f:
        assert json.loads(f.metadata()["spec"])["keep_best_epoch"] == "validation map@5"
    with safe_open(str(tmp_path / "cache" / last.trained[0]), "pt") as f:
        assert "keep_best_epoch" not in json.loads(f.metadata()["spec"])  # older keys unchanged
    assert "highest validation mAP@5 are kept" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="keep_best_epoch"):
        R.ReproduceConfig(keep_best_epoch=True, val_fraction=0.0)


def test_train_recipe_reaches_training_and_the_cache_key(monkeypatch, tmp_path, data):
    from safetensors import safe_open

    seen = training_calls(monkeypatch)
    seen_online = []
    real_online = runner.PaperLaplaceEmbedder.fit_online

    @functools.wraps(real_online)
    def spy_online(self, *args, **kwargs):
        seen_online.append(kwargs)
        return real_online(self, *args, **kwargs)

    monkeypatch.setattr(runner.PaperLaplaceEmbedder, "fit_online", spy_online)
    methods = ("deterministic", "lam_online")
    paper = tiny_config(methods=methods, val_fraction=0.0, prior_precision=1.0).with_recipe("paper")
    adam = paper.with_recipe("adam")
    assert (adam.recipe, paper.recipe) == ("adam", "paper")
    assert (paper.optimizer, paper.lr, paper.weight_decay, paper.loss_miner) == ("rmsprop", 1e-3 * 32, 1e-5, "triplets")
    assert (adam.online_lr, paper.online_lr) == (1e-3, pytest.approx(1e-3 * adam.lam_batch_size))
    assert paper.lr_decay == pytest.approx(math.exp(-0.01))
    runs = {name: R.reproduce_fashionmnist(cfg, tmp_path, data=data, progress=False)
            for name, cfg in (("adam", adam), ("paper", paper))}
    assert seen[0]["optimizer"] == "adam" and seen[0]["miner"] is None and seen[0]["lr_decay"] is None
    assert seen[1]["optimizer"] == "rmsprop" and seen[1]["weight_decay"] == 1e-5
    assert type(seen[1]["miner"]).__name__ == "TripletMarginMiner" and seen[1]["miner"].margin == adam.margin
    det = {k: [n for n in r.trained if n.startswith("deterministic")] for k, r in runs.items()}
    assert len(det["adam"]) == len(det["paper"]) == 1 and det["adam"] != det["paper"]
    with safe_open(str(tmp_path / "cache" / det["paper"][0]), "pt") as f:
        spec = json.loads(f.metadata()["spec"])
    assert (spec["optimizer"], spec["miner"], spec["weight_decay"]) == ("rmsprop", "triplets", 1e-5)
    # online LAM takes only the recipe's learning rate, which gives it a key of its own
    assert [kw["lr"] for kw in seen_online] == [adam.online_lr, paper.online_lr]
    online = {k: [n for n in r.trained if n.startswith("lam_online")] for k, r in runs.items()}
    assert online["adam"] and online["paper"] and not set(online["adam"]) & set(online["paper"])
    text = (tmp_path / "results.md").read_text()
    assert "rmsprop at lr 0.032" in text and "This is the paper's code" in text
    with pytest.raises(ValueError, match="recipe"):
        adam.with_recipe("sgd")
    assert R.with_overrides(paper, lr=0.1).recipe == "custom"
    for bad in (
        dict(optimizer="lbfgs"), dict(loss_miner="hard"), dict(lr_decay=0.0), dict(weight_decay=-1.0), dict(online_lr=0.0)
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            R.ReproduceConfig(**bad)


def test_dropout_layout_builds_its_network_and_cache_key(tmp_path, data):
    from safetensors import safe_open

    config = tiny_config(methods=("mc_dropout",), val_fraction=0.0, prior_precision=1.0)
    assert config.dropout_layout == "channel"  # the paper's network is the default
    runs = {
        layout: R.reproduce_fashionmnist(
            R.with_overrides(config, dropout_layout=layout), tmp_path / layout, data=data, progress=False
        )
        for layout in ("channel", "pool")
    }
    specs = {}
    for layout, run in runs.items():
        (name,) = run.trained
        with safe_open(str(tmp_path / layout / "cache" / name), "pt") as f:
            specs[layout] = json.loads(f.metadata()["spec"])
            keys = set(f.keys())
        # the channel network has a Dropout2d at index 2, which shifts the later layers
        assert ("3.weight" in keys) == (layout == "channel")
    assert runs["channel"].trained != runs["pool"].trained
    # "pool" networks were cached before the option existed: their key does not name it
    assert "dropout_layout" not in specs["pool"] and specs["channel"]["dropout_layout"] == "channel"
    assert "Dropout2d" in (tmp_path / "channel" / "results.md").read_text()
    assert "Dropout2d" not in (tmp_path / "pool" / "results.md").read_text()
    with pytest.raises(ValueError, match="dropout_layout"):
        R.ReproduceConfig(dropout_layout="spatial")


def spy_fit_online(monkeypatch) -> list[tuple[str, dict]]:
    """Record ``(miner name, {**kwargs, "hinge", "approx"})`` of every ``fit_online`` call,
    which then runs as usual."""
    seen: list[tuple[str, dict]] = []
    real = runner.PaperLaplaceEmbedder.fit_online

    @functools.wraps(real)
    def spy(self, loader, epochs=20, **kwargs):
        miner = self.miner if isinstance(self.miner, str) else type(self.miner).__name__
        seen.append((miner, {**kwargs, "hinge": self.hinge, "approx": self.approx}))
        return real(self, loader, epochs, **kwargs)

    monkeypatch.setattr(runner.PaperLaplaceEmbedder, "fit_online", spy)
    return seen


def test_online_options_reach_fit_online_and_the_cache_key(monkeypatch, tmp_path, data):
    from safetensors import safe_open

    seen = spy_fit_online(monkeypatch)
    base = tiny_config(methods=("lam_online",), val_fraction=0.2, online_loss_miner="all")
    code = R.with_overrides(
        base, online_loss_miner="triplets", online_relu="on_use", online_hinge=False, online_max_pairs=400
    )
    first = R.reproduce_fashionmnist(base, tmp_path, data=data, progress=False)
    second = R.reproduce_fashionmnist(code, tmp_path, data=data, progress=False)
    assert seen[0][0] == "all" and seen[0][1]["relu"] == "per_step" and seen[0][1]["hinge"] is True
    assert seen[0][1]["max_pairs"] == 200
    assert seen[1][0] == "TripletMarginMiner"
    assert (seen[1][1]["relu"], seen[1][1]["hinge"], seen[1][1]["max_pairs"]) == ("on_use", False, 400)
    assert first.trained and second.trained and not set(first.trained) & set(second.trained)
    described = (tmp_path / "results.md").read_text()
    for option in ("--online-loss-miner triplets", "--online-relu on_use", "--online-hinge off", "at most 400 Hessian"):
        assert option in described
    specs = []
    for name in (first.trained[0], second.trained[0]):
        with safe_open(str(tmp_path / "cache" / name), "pt") as f:
            specs.append(json.loads(f.metadata()["spec"]))
    # the options enter the key only with a value other than the first cached runs'
    assert not {"relu", "hinge", "loss_miner"} & set(specs[0])
    assert (specs[1]["relu"], specs[1]["hinge"], specs[1]["loss_miner"], specs[1]["max_pairs"]) == (
        "on_use", False, "triplets", 400
    )


def test_online_posterior_refit_reuses_the_network_and_fits_at_its_weights(monkeypatch, tmp_path, data):
    base = tiny_config(methods=("lam_online",), val_fraction=0.2)
    running = R.reproduce_fashionmnist(base, tmp_path, data=data, progress=False)
    assert "--online-posterior refit" not in (tmp_path / "results.md").read_text()
    fitted = []
    real_fit = runner.PaperLaplaceEmbedder.fit

    def spy(self, loader, *args, **kwargs):
        fitted.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return real_fit(self, loader, *args, **kwargs)

    monkeypatch.setattr(runner.PaperLaplaceEmbedder, "fit", spy)
    refit = R.reproduce_fashionmnist(R.with_overrides(base, online_posterior="refit"), tmp_path, data=data, progress=False)
    # the online network and its running curvature come from the cache; only the fit is new
    assert set(refit.loaded) >= set(running.trained)
    assert len(refit.trained) == 1 and refit.trained[0].endswith(".refit.safetensors")
    net_file = next(n for n in running.trained if not n.endswith(".posterior.safetensors"))
    assert refit.trained[0].split("-seed")[0] == "lam_online"
    from safetensors.torch import load_file

    cached = load_file(str(tmp_path / "cache" / net_file))
    assert len(fitted) == 1 and all(torch.equal(fitted[0][k], cached[k]) for k in cached)
    assert "--online-posterior refit" in (tmp_path / "results.md").read_text()
    a = running.results["per_seed"]["lam_online"]["1"]
    b = refit.results["per_seed"]["lam_online"]["1"]
    assert a["map@1"] == b["map@1"] and a["uncertainty_id_mean"] != b["uncertainty_id_mean"]
    # a third run loads the refit too
    again = R.reproduce_fashionmnist(R.with_overrides(base, online_posterior="refit"), tmp_path, data=data, progress=False)
    assert not again.trained and refit.trained[0] in again.loaded
    with pytest.raises(ValueError, match="online_posterior"):
        R.ReproduceConfig(online_posterior="final")


def test_online_approx_reaches_the_running_curvature_and_the_cache_key(monkeypatch, tmp_path, data):
    seen = spy_fit_online(monkeypatch)
    base = tiny_config(methods=("lam_online",), val_fraction=0.2)
    fix = R.reproduce_fashionmnist(base, tmp_path, data=data, progress=False)
    assert "`--online-approx`" not in (tmp_path / "results.md").read_text()
    runs = {"fix": fix}
    for approx in ("pos", "full"):
        runs[approx] = R.reproduce_fashionmnist(
            R.with_overrides(base, online_approx=approx), tmp_path, data=data, progress=False
        )
        assert f"(online LAM's running curvature: `{approx}`, `--online-approx`)" in (tmp_path / "results.md").read_text()
    assert [kwargs["approx"] for _, kwargs in seen] == ["fix", "pos", "full"]
    trained = [set(run.trained) for run in runs.values()]
    assert all(trained) and len(set().union(*trained)) == sum(map(len, trained))  # nothing shared
    from safetensors import safe_open

    for approx in ("pos", "full"):
        net_file = next(n for n in runs[approx].trained if not n.endswith(".posterior.safetensors"))
        with safe_open(str(tmp_path / "cache" / net_file), "pt") as f:
            assert json.loads(f.metadata()["spec"])["approx"] == approx
    with pytest.raises(ValueError, match="online_approx"):
        R.ReproduceConfig(online_approx="exact")


def test_posthoc_approx_reaches_the_fit_and_the_cache_key(monkeypatch, tmp_path, data):
    approxes = []
    real_init = runner.PaperLaplaceEmbedder.__init__

    def spy(self, model, **kwargs):
        approxes.append(kwargs["approx"])
        real_init(self, model, **kwargs)

    monkeypatch.setattr(runner.PaperLaplaceEmbedder, "__init__", spy)
    base = tiny_config(methods=("lam_posthoc",), prior_precision=1.0)
    fix = R.reproduce_fashionmnist(base, tmp_path, data=data, progress=False)
    assert "`--posthoc-approx`" not in (tmp_path / "results.md").read_text()
    pos = R.reproduce_fashionmnist(R.with_overrides(base, posthoc_approx="pos"), tmp_path, data=data, progress=False)
    assert "(the post-hoc fits: `pos`, `--posthoc-approx`)" in (tmp_path / "results.md").read_text()
    full = R.reproduce_fashionmnist(R.with_overrides(base, posthoc_approx="full"), tmp_path, data=data, progress=False)
    assert "(the post-hoc fits: `full`, `--posthoc-approx`)" in (tmp_path / "results.md").read_text()
    assert approxes == ["fix", "pos", "full"]
    fits = [[n for n in run.trained if n.startswith("lam_posthoc")] for run in (fix, pos, full)]
    assert [len(f) for f in fits] == [1, 1, 1] and len({f[0] for f in fits}) == 3
    with pytest.raises(ValueError, match="posthoc_approx"):
        R.ReproduceConfig(posthoc_approx="exact")


def test_posthoc_pairs_triplets_reach_the_fit_and_the_cache_key(monkeypatch, tmp_path, data):
    seen = []
    real_init = runner.PaperLaplaceEmbedder.__init__

    def spy(self, model, **kwargs):
        seen.append((kwargs["miner"], kwargs["hinge"], kwargs["max_pairs"]))
        real_init(self, model, **kwargs)

    monkeypatch.setattr(runner.PaperLaplaceEmbedder, "__init__", spy)
    # a wide margin: the trained tiny network separates the synthetic classes, and at the
    # default margin no triplet violates it (a fit without pairs is refused)
    base = tiny_config(methods=("lam_posthoc",), prior_precision=1.0, margin=1.9)
    every = R.reproduce_fashionmnist(base, tmp_path, data=data, progress=False)
    assert "`--posthoc-pairs triplets`" not in (tmp_path / "results.md").read_text()
    config = R.with_overrides(base, posthoc_pairs="triplets")
    triplets = R.reproduce_fashionmnist(config, tmp_path, data=data, progress=False)
    (all_miner, all_hinge, all_max), (miner, hinge, max_pairs) = seen
    assert (all_miner, all_hinge, all_max) == ("all", True, base.max_pairs)
    # the paper's post-hoc code: margin-violating triplets, no hinge test, max_pairs triplets
    assert isinstance(miner, runner.TripletMarginMiner) and miner.margin == base.margin
    assert miner.type_of_triplets == "all" and hinge is False and max_pairs == 2 * base.max_pairs
    fits = [[n for n in run.trained if n.startswith("lam_posthoc")] for run in (every, triplets)]
    assert len(fits[0]) == len(fits[1]) == 1 and fits[0] != fits[1]
    assert "`--posthoc-pairs triplets`" in (tmp_path / "results.md").read_text()
    # the two curvatures differ, and a rerun loads the triplet fit instead of fitting again
    from safetensors.torch import load_file

    curvatures = [load_file(str(tmp_path / "cache" / f[0]))["curvature"] for f in fits]
    assert curvatures[0].shape == curvatures[1].shape and not torch.equal(*curvatures)
    again = R.reproduce_fashionmnist(config, tmp_path, data=data, progress=False)
    assert not again.trained and fits[1][0] in again.loaded
    with pytest.raises(ValueError, match="posthoc_pairs"):
        R.ReproduceConfig(posthoc_pairs="triplet")


def test_config_validation():
    with pytest.raises(ValueError, match="unknown methods"):
        R.ReproduceConfig(methods=("nope",))
    with pytest.raises(ValueError, match="distinct"):
        R.ReproduceConfig(seeds=(1, 1))
    with pytest.raises(ValueError, match="validation"):
        R.ReproduceConfig(val_fraction=0.0, prior_precision="auto")
    with pytest.raises(ValueError, match="prior"):
        R.ReproduceConfig(prior_precision=-1.0)
    with pytest.raises(ValueError, match="online_curvature"):
        R.ReproduceConfig(online_curvature="quadruplets")
    with pytest.raises(ValueError, match="online_loss_miner"):
        R.ReproduceConfig(online_loss_miner="pairs")
    with pytest.raises(ValueError, match="online_relu"):
        R.ReproduceConfig(online_relu="never")
    with pytest.raises(ValueError, match="online_max_pairs"):
        R.ReproduceConfig(online_max_pairs=0)
    quick = R.ReproduceConfig.quick_run()
    assert quick.quick and quick.seeds == (1,) and set(quick.methods) == set(R.DEFAULT_METHODS)
    assert R.ReproduceConfig().seeds == (1, 2, 3, 4, 5) and "hib" not in R.DEFAULT_METHODS
    # the paper's code: post-hoc prior 1, online loss on the margin-violating triplets
    assert R.ReproduceConfig().prior_precision == 1.0 and R.ReproduceConfig().online_loss_miner == "triplets"
    # a fixed prior is compared with marglik only; "auto" chooses among the whole grid
    assert R.ReproduceConfig().candidates == ("marglik", 1.0)
    assert R.ReproduceConfig(prior_precision=5.0).candidates == ("marglik", 5.0)
    assert R.ReproduceConfig(prior_precision="marglik").candidates == ("marglik",)
    assert R.ReproduceConfig(prior_precision="auto").candidates == R.DEFAULT_PRIOR_CANDIDATES
    assert R.ReproduceConfig(prior_candidates=(3.0,)).candidates == (3.0, 1.0)


def test_paper_numbers_transcribed():
    paper = R.PAPER_FASHIONMNIST
    assert set(paper) == set(R.ALL_METHODS)
    assert paper["lam_online"]["auroc"] == (0.98, 0.01)
    assert paper["lam_online"]["ece"] == (0.02, 0.00)
    assert paper["deep_ensemble"]["map@1"] == (0.69, None)
    assert paper["deterministic"]["auroc"] is None
    assert paper["mc_dropout"]["ausc"] == (0.84, 0.06)


def test_plot_functions_directly(tmp_path):
    rng = np.random.default_rng(0)
    scores_id, scores_ood = rng.normal(0, 1, 50), rng.normal(1, 1, 40)
    mean = rng.normal(size=(40, 3))
    std = np.abs(rng.normal(size=(40, 3)))
    labels = np.arange(40) % 4
    samples = rng.normal(size=(5, 40, 3))
    paths = [
        plots.plot_roc_curves({"a": M.roc_curve(scores_id, scores_ood)}, tmp_path / "r.png", aucs={"a": 0.7}),
        plots.plot_pr_curves({"a": M.pr_curve(scores_id, scores_ood)}, tmp_path / "p.png", chance=0.44),
        plots.plot_sparsification_curves({"a": M.sparsification_curve(mean, std, labels)}, tmp_path / "s.png"),
        plots.plot_reliability_diagrams(
            {k: M.reliability_diagram(samples, labels) for k in "abcd"}, tmp_path / "sub" / "d.png"
        ),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError):
        plots.plot_roc_curves({}, tmp_path / "x.png")


# ---------------------------------------------------------------- CLI


def test_cli_parsing():
    parser = cli.build_parser()
    args = parser.parse_args(
        ["-v", "reproduce", "fashionmnist", "--seeds", "1", "2", "--quick", "--out", "o", "--methods",
         "deterministic", "lam_posthoc", "--device", "cpu", "--no-progress", "--prior-precision", "marglik"]
    )
    assert args.verbose and args.quick and args.no_progress
    assert args.seeds == [1, 2] and args.out == "o" and args.device == "cpu"
    config = cli.config_from_args(args)
    assert config.seeds == (1, 2) and config.methods == ("deterministic", "lam_posthoc") and config.quick
    assert config.prior_precision == "marglik" and config.epochs == 3

    full = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--prior-precision", "0.5"]))
    assert full == R.ReproduceConfig(prior_precision=0.5)
    one = cli.config_from_args(
        parser.parse_args(["reproduce", "fashionmnist", "--prior-precision", "marglik", "--prior-candidates", "marglik", "3"])
    )
    assert one.prior_candidates == ("marglik", 3.0) and one.candidates == ("marglik", 3.0)
    paper = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--online-curvature", "triplets"]))
    assert paper.online_curvature == "triplets" == R.ReproduceConfig().online_curvature
    design = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--online-curvature", "pairs"]))
    assert design.online_curvature == "pairs"
    code = cli.config_from_args(
        parser.parse_args(
            ["reproduce", "fashionmnist", "--online-loss-miner", "triplets", "--online-relu", "on_use",
             "--online-hinge", "off", "--online-max-pairs", "10000"]
        )
    )
    assert (code.online_loss_miner, code.online_relu, code.online_hinge, code.online_max_pairs) == (
        "triplets", "on_use", False, 10000
    )
    assert cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--online-hinge", "on"])).online_hinge
    assert R.ReproduceConfig().online_posterior == "running"
    refit = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--online-posterior", "refit"]))
    assert refit.online_posterior == "refit"
    pos = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--posthoc-approx", "pos"]))
    assert (R.ReproduceConfig().posthoc_approx, pos.posthoc_approx) == ("fix", "pos")
    online_pos = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--online-approx", "pos"]))
    assert (R.ReproduceConfig().online_approx, online_pos.online_approx) == ("fix", "pos")
    online_full = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--online-approx", "full"]))
    posthoc_full = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--posthoc-approx", "full"]))
    assert (online_full.online_approx, posthoc_full.posthoc_approx) == ("full", "full")
    paper_pairs = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--posthoc-pairs", "triplets"]))
    assert (R.ReproduceConfig().posthoc_pairs, paper_pairs.posthoc_pairs) == ("all", "triplets")
    per_epoch = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--online-relu", "per_epoch"]))
    assert per_epoch.online_relu == "per_epoch"
    recipe = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--train-recipe", "paper"]))
    assert recipe == R.ReproduceConfig().with_recipe("paper") and recipe.lr == pytest.approx(0.256)
    assert recipe.online_lr == pytest.approx(0.064)
    # the paper's recipe is the default, exactly (so its cached networks keep their keys)
    default = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist"]))
    assert default == recipe and default.recipe == "paper" and R.ReproduceConfig.quick_run().recipe == "paper"
    adam = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--train-recipe", "adam"]))
    assert (adam.optimizer, adam.lr, adam.online_lr, adam.loss_miner) == ("adam", 1e-3, 1e-3, "all")
    assert cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--keep-best-epoch"])).keep_best_epoch
    assert not cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist"])).keep_best_epoch
    own = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--train-recipe", "paper", "--online-lr", "0.01"]))
    assert own.online_lr == 0.01 and own.lr == pytest.approx(0.256) and own.recipe == "custom"
    pool = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--dropout-layout", "pool"]))
    assert pool.dropout_layout == "pool" and R.ReproduceConfig().dropout_layout == "channel"
    whole = cli.config_from_args(parser.parse_args(["reproduce", "fashionmnist", "--val-fraction", "0"]))
    assert whole.val_fraction == 0.0 and R.ReproduceConfig().val_fraction == 0.1

    for bad in (
        ["reproduce", "cifar10"],
        ["reproduce", "fashionmnist", "--methods", "nope"],
        ["reproduce", "fashionmnist", "--device", "tpu"],
        ["reproduce", "fashionmnist", "--prior-precision", "-1"],
        ["reproduce", "fashionmnist", "--prior-candidates", "auto"],
        ["reproduce", "fashionmnist", "--prior-candidates", "0"],
        ["reproduce", "fashionmnist", "--online-curvature", "quadruplets"],
        ["reproduce", "fashionmnist", "--online-relu", "never"],
        ["reproduce", "fashionmnist", "--online-hinge", "maybe"],
        ["reproduce", "fashionmnist", "--dropout-layout", "spatial"],
        ["reproduce", "fashionmnist", "--train-recipe", "sgd"],
        ["reproduce", "fashionmnist", "--val-fraction", "1"],
        ["reproduce", "fashionmnist", "--val-fraction", "-0.1"],
        ["reproduce", "fashionmnist", "--val-fraction", "a tenth"],
        [],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_cli_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("lam_plugin", "torch", "backpack", "faiss", "datasets:", "fashionmnist"):
        assert name in out


def test_cli_dataset_missing_is_a_clean_error(monkeypatch, capsys, tmp_path):
    def missing(root=None):
        raise DatasetNotFoundError("FashionMNIST was not found. Looked for: ...")

    monkeypatch.setattr(R, "load_fashionmnist_protocol", missing)
    code = cli.main(["reproduce", "fashionmnist", "--quick", "--no-progress", "--out", str(tmp_path),
                     "--methods", "deterministic"])
    err = capsys.readouterr().err
    assert code == 1
    assert "FashionMNIST was not found" in err and "Traceback" not in err


def test_cli_cuda_without_a_device_is_a_clean_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(R.torch.cuda, "is_available", lambda: False)
    code = cli.main(["reproduce", "fashionmnist", "--quick", "--no-progress", "--out", str(tmp_path),
                     "--methods", "deterministic", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no usable CUDA device" in err and "use device 'cpu'" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_cli_reproduce_in_process(monkeypatch, capsys, tmp_path, data):
    monkeypatch.setattr(R, "load_fashionmnist_protocol", lambda root=None: data)
    argv = ["reproduce", "fashionmnist", "--seeds", "3", "--out", str(tmp_path), "--methods", "deterministic",
            "--epochs", "1", "--no-progress", "--prior-precision", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| Deterministic | this run (1 seed) |" in out and "results.json" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seeds"] == [3] and results["command"].startswith("lam-study reproduce fashionmnist")
