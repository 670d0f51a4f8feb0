"""Combining reproduce runs: the same numbers as one run over all seeds, and clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_reproduce import synthetic

from lam_study import cli
from lam_study import reproduce as R
from lam_study.combine import combine_results, write_combined


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Seed 1 alone, seed 2 alone and seeds 1-2 together, sharing one model cache."""
    root = tmp_path_factory.mktemp("combine")
    data = R.ProtocolData(train=synthetic(200, 4, 0), test=synthetic(60, 4, 1), ood=synthetic(40, 4, 2, "ood"))
    base = R.ReproduceConfig(
        seeds=(1,), methods=("deterministic", "lam_posthoc"), epochs=1, batch_size=32, lam_batch_size=32,
        n_samples=8, eval_batch_size=25, max_pairs=200, val_fraction=0.2, quick=True, lr=1e-3,
    )
    cache = root / "cache"
    cache.mkdir()
    out = {}
    for name, seeds in (("s1", (1,)), ("s2", (2,)), ("both", (1, 2))):
        folder = root / name
        folder.mkdir()
        (folder / "cache").symlink_to(cache, target_is_directory=True)
        R.reproduce_fashionmnist(R.with_overrides(base, seeds=seeds), folder, data=data, progress=False)
        out[name] = folder / "results.json"
    return root, out


def test_combined_seeds_equal_one_run_over_them(runs):
    root, files = runs
    combined, written = write_combined([files["s1"], files["s2"]], root / "combined", command="test")
    both = json.loads(files["both"].read_text())
    assert combined["seeds"] == [1, 2] and combined["combined"] is True
    assert combined["seeds_by_method"] == {"deterministic": [1, 2], "lam_posthoc": [1, 2]}
    for method, row in both["methods"].items():
        for metric, stat in row.items():
            if stat["mean"] is None:
                assert combined["methods"][method][metric]["mean"] is None
                continue
            assert combined["methods"][method][metric]["mean"] == pytest.approx(stat["mean"], abs=1e-12)
            assert combined["methods"][method][metric]["std"] == pytest.approx(stat["std"], abs=1e-12)
    # by hand: population std of the two per-seed values
    values = [both["per_seed"]["lam_posthoc"][s]["auroc"] for s in ("1", "2")]
    assert combined["methods"]["lam_posthoc"]["auroc"]["std"] == pytest.approx(np.std(values), abs=1e-12)
    assert combined["config_differences"] == {}
    assert [s["seeds_by_method"] for s in combined["sources"]] == [
        {"deterministic": [1], "lam_posthoc": [1]},
        {"deterministic": [2], "lam_posthoc": [2]},
    ]
    on_disk = json.loads((root / "combined" / "results.json").read_text())
    assert on_disk["methods"] == json.loads(json.dumps(combined["methods"]))
    text = (root / "combined" / "results.md").read_text()
    assert "seeds 1, 2" in text and str(files["s2"]) in text and "| paper |" in text
    assert "## Supplementary: the AUPRC and ECE as the paper's code computes them" in text
    assert written == [root / "combined" / "results.json", root / "combined" / "results.md"]
    # a file of seeds 1-2 overlaps both: the same numbers, accepted
    again = combine_results([files["both"], files["s1"], files["s2"]])
    assert again["methods"] == combined["methods"]
    assert again["sources"][1]["seeds_by_method"] == {}


def _edited(path, tmp_path, name, edit):
    results = json.loads(path.read_text())
    edit(results)
    target = tmp_path / f"{name}.json"
    target.write_text(json.dumps(results))
    return target


def test_runs_without_the_paper_convention_metrics_still_combine(runs, tmp_path):
    """Results files written before ``auprc_trapezoid`` and ``ece_certain_dropped`` existed."""
    _, files = runs
    newer = ("auprc_trapezoid", "ece_certain_dropped")

    def drop(results):
        for rows in [*results["per_seed"].values(), *({"": r} for r in results["supplementary"].values())]:
            for row in rows.values():
                for key in newer:
                    row.pop(key, None)

    older = _edited(files["s1"], tmp_path, "older", drop)
    combined, _ = write_combined([older, files["s2"]], tmp_path / "out", command="test")
    stats = combined["supplementary"]["lam_posthoc"]
    assert all(stats[key] == {"mean": None, "std": None} for key in newer)  # missing on seed 1
    assert stats["auroc_output_var"]["mean"] is not None
    text = (tmp_path / "out" / "results.md").read_text()
    assert "## Supplementary: OoD detection scored before the normalisation" in text
    assert "as the paper's code computes them" not in text  # no method has them on every seed


def test_conflicting_numbers_are_refused(runs, tmp_path):
    _, files = runs

    def shift(r):
        r["per_seed"]["lam_posthoc"]["1"]["auroc"] += 0.01

    other = _edited(files["s1"], tmp_path, "other", shift)
    with pytest.raises(ValueError, match="lam_posthoc seed 1 .* different results .*auroc"):
        combine_results([files["both"], other])


def test_other_data_is_refused(runs, tmp_path):
    _, files = runs

    def data(r):
        r["data"]["fingerprint"] = "0" * 16

    with pytest.raises(ValueError, match="its data"):
        combine_results([files["s1"], _edited(files["s2"], tmp_path, "data", data)])
    with pytest.raises(ValueError, match="quick"):
        combine_results([files["s1"], _edited(files["s2"], tmp_path, "full", lambda r: r.update(quick=False))])


def test_config_differences_are_refused_unless_allowed(runs, tmp_path):
    _, files = runs

    def layout(r):
        r["config"]["dropout_layout"] = "pool"

    other = _edited(files["s2"], tmp_path, "layout", layout)
    with pytest.raises(ValueError, match="dropout_layout = 'channel' in .*, 'pool' in"):
        combine_results([files["s1"], other])
    combined = combine_results([files["s1"], other], allow_config_differences=True)
    assert combined["config_differences"]["deterministic"]["dropout_layout"] == {
        str(files["s1"]): "channel", str(other): "pool"
    }


def test_fields_older_runs_lack_stand_for_their_old_behaviour(runs, tmp_path):
    _, files = runs

    def older(r):  # written before keep_best_epoch existed: the last epoch was kept
        del r["config"]["keep_best_epoch"]

    old = _edited(files["s2"], tmp_path, "older", older)
    assert combine_results([files["s1"], old])["config_differences"] == {}
    best = _edited(files["s1"], tmp_path, "best", lambda r: r["config"].update(keep_best_epoch=True))
    with pytest.raises(ValueError, match="keep_best_epoch = True in .*, False in"):
        combine_results([best, old])
    # an older run without the layout field had the element-wise dropout after the pooling
    no_layout = _edited(files["s2"], tmp_path, "nolayout", lambda r: r["config"].pop("dropout_layout"))
    with pytest.raises(ValueError, match="dropout_layout = 'channel' in .*, 'pool' in"):
        combine_results([files["s1"], no_layout])


def test_bad_inputs(runs, tmp_path):
    _, files = runs
    with pytest.raises(ValueError, match="at least two"):
        combine_results([files["s1"]])
    with pytest.raises(FileNotFoundError, match="no such results file"):
        combine_results([files["s1"], tmp_path / "missing.json"])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not a JSON file"):
        combine_results([files["s1"], tmp_path / "bad.json"])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="missing dataset, per_seed"):
        combine_results([files["s1"], tmp_path / "other.json"])


def test_cli_combine(runs, tmp_path, capsys):
    _, files = runs
    assert cli.main(["combine", str(files["s1"]), str(files["s2"]), "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "lam_posthoc: seeds 1 2" in out and (tmp_path / "c" / "results.md").exists()
    assert json.loads((tmp_path / "c" / "results.json").read_text())["command"].startswith("lam-study combine")
    assert cli.main(["combine", str(files["s1"]), str(tmp_path / "nope.json"), "--out", str(tmp_path / "d")]) == 2
    assert "no such results file" in capsys.readouterr().err


def test_a_method_of_one_seed_is_shown_without_a_spread(runs, tmp_path):
    _, files = runs

    def only_deterministic(results):
        for key in ("methods", "per_seed", "supplementary"):
            results.get(key, {}).pop("lam_posthoc", None)

    s2 = _edited(files["s2"], tmp_path, "s2det", only_deterministic)
    combined, _ = write_combined([files["s1"], s2], tmp_path / "c")
    assert R.seed_counts(combined) == {"deterministic": 2, "lam_posthoc": 1}
    rows = {line.split("|")[1].strip(): line for line in (tmp_path / "c" / "results.md").read_text().splitlines()
            if "| this run" in line}
    posthoc, det = rows[R.METHOD_LABELS["lam_posthoc"]], rows[R.METHOD_LABELS["deterministic"]]
    assert "this run (1 seed)" in posthoc and "±" not in posthoc
    auroc = combined["methods"]["lam_posthoc"]["auroc"]["mean"]
    assert f"{auroc:.2f}" in posthoc
    assert "this run |" in det and "±" in det


def test_results_table_spread_follows_the_seed_count():
    row = {m: {"mean": 0.5, "std": 0.0} for m in R.METRICS}
    assert "0.50 ± 0.00" in R.results_table({"lam_online": row}, paper=None)
    assert "0.50 ± 0.00" in R.results_table({"lam_online": row}, paper=None, n_seeds={"lam_online": 2})
    one = R.results_table({"lam_online": row}, paper=None, n_seeds={"lam_online": 1})
    assert "±" not in one and "| 0.50 |" in one and "(1 seed)" in one


def test_a_combined_file_combines_again_as_its_sources(runs, tmp_path):
    _, files = runs
    s2_det = _edited(files["s2"], tmp_path, "s2det", lambda r: [r[k].pop("lam_posthoc", None)
                                                                 for k in ("methods", "per_seed", "supplementary")])
    first, _ = write_combined([files["s1"], s2_det], tmp_path / "first")
    assert first["sources"][0]["config"] == json.loads(files["s1"].read_text())["config"]
    # seed 2 of post-hoc LAM joins later: the same table as combining the three runs at once
    again = combine_results([tmp_path / "first" / "results.json", files["s2"]])
    at_once = combine_results([files["s1"], s2_det, files["s2"]])
    assert again["methods"] == at_once["methods"] and again["per_seed"] == at_once["per_seed"]
    assert again["config_differences"] == {}
    assert [s["file"] for s in again["sources"]] == [
        f"{tmp_path / 'first' / 'results.json'} ← {files['s1']}",
        f"{tmp_path / 'first' / 'results.json'} ← {s2_det}",
        str(files["s2"]),
    ]
    assert again["sources"][2]["seeds_by_method"] == {"lam_posthoc": [2]}
    # the configurations of the sources are still checked
    pool = _edited(files["s2"], tmp_path, "pool", lambda r: r["config"].update(dropout_layout="pool"))
    with pytest.raises(ValueError, match=r"lam_posthoc: dropout_layout = 'channel' in .*first.*s1.*'pool' in"):
        combine_results([tmp_path / "first" / "results.json", pool])


def test_a_combined_file_without_source_configurations_is_not_trusted(runs, tmp_path):
    _, files = runs
    _first, _ = write_combined([files["s1"], files["s2"]], tmp_path / "first")

    def older(results):  # written before the sources kept their configuration
        for source in results["sources"]:
            del source["config"]

    old = _edited(tmp_path / "first" / "results.json", tmp_path, "old", older)
    # alone, or with runs that add nothing to its methods, nothing is compared
    assert combine_results([old, files["both"]])["config_differences"] == {}
    # what its own combination allowed is kept, and must be allowed again
    allowed = {"lam_posthoc": {"prior_precision": {"a": 1.0, "b": "marglik"}}}
    old_allowed = _edited(old, tmp_path, "old_allowed", lambda r: r.update(config_differences=allowed))
    with pytest.raises(ValueError, match="lam_posthoc: prior_precision = 1.0 in a, 'marglik' in b"):
        combine_results([old_allowed, files["both"]])
    assert combine_results([old_allowed, files["both"]], allow_config_differences=True)[
        "config_differences"] == allowed
    s3 = _edited(files["s2"], tmp_path, "s3", lambda r: r.update(per_seed={
        m: {"3": {k: v + 1e-3 if isinstance(v, float) else v for k, v in rows["2"].items()}}
        for m, rows in r["per_seed"].items()}))
    with pytest.raises(ValueError, match=r"deterministic: config = not recorded in .*old.*'recorded' in .*s3"):
        combine_results([old, s3])
    combined = combine_results([old, s3], allow_config_differences=True)
    assert combined["seeds_by_method"]["lam_posthoc"] == [1, 2, 3]
    assert set(combined["config_differences"]["lam_posthoc"]["config"].values()) == {None, "recorded"}


def test_a_combined_file_whose_sources_name_missing_seeds_is_refused(runs, tmp_path):
    _, files = runs
    write_combined([files["s1"], files["s2"]], tmp_path / "first")
    broken = _edited(tmp_path / "first" / "results.json", tmp_path, "broken",
                     lambda r: r["per_seed"]["lam_posthoc"].pop("2"))
    with pytest.raises(ValueError, match="source .*s2.* lists seeds that the file's per_seed lacks"):
        combine_results([broken, files["s1"]])


def test_only_takes_some_methods_of_a_file(runs, tmp_path):
    _, files = runs

    def shift(r):  # another configuration of lam_posthoc on seed 1: would conflict
        r["per_seed"]["lam_posthoc"]["1"]["auroc"] += 0.01

    other = _edited(files["s1"], tmp_path, "other", shift)
    with pytest.raises(ValueError, match="different results"):
        combine_results([files["both"], other])
    combined = combine_results([files["both"], other], only={other: ["deterministic"]})
    both = json.loads(files["both"].read_text())
    assert combined["methods"] == both["methods"]
    assert [s["seeds_by_method"] for s in combined["sources"]] == [
        {"deterministic": [1, 2], "lam_posthoc": [1, 2]},
        {},  # its deterministic seed 1 is the first file's already
    ]
    # only lam_posthoc of seed 2's file, deterministic of seed 1's
    only = {files["s1"]: ["deterministic"], files["s2"]: ["lam_posthoc"]}
    mixed = combine_results([files["s1"], files["s2"]], only=only)
    assert mixed["seeds_by_method"] == {"deterministic": [1], "lam_posthoc": [2]}
    assert mixed["per_seed"]["lam_posthoc"]["2"] == both["per_seed"]["lam_posthoc"]["2"]
    with pytest.raises(ValueError, match="has no results of mc_dropout .it has deterministic, lam_posthoc"):
        combine_results([files["s1"], files["s2"]], only={files["s1"]: ["mc_dropout"]})
    with pytest.raises(ValueError, match="not among the results files"):
        combine_results([files["s1"], files["s2"]], only={tmp_path / "x.json": ["deterministic"]})
    with pytest.raises(ValueError, match="no method named"):
        combine_results([files["s1"], files["s2"]], only={files["s1"]: []})


def test_cli_combine_only(runs, tmp_path, capsys):
    _, files = runs
    argv = ["combine", str(files["s1"]), str(files["s2"]), "--out", str(tmp_path / "c"),
            "--only", f"{files['s2']}=lam_posthoc", "--only", f"{files['s1']}=deterministic,lam_posthoc"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "deterministic: seeds 1\n" in out and "lam_posthoc: seeds 1 2" in out
    with pytest.raises(SystemExit):
        cli.main(["combine", str(files["s1"]), str(files["s2"]), "--out", str(tmp_path / "d"), "--only", "nomethods"])
    assert "expected FILE=METHOD" in capsys.readouterr().err


def test_repeated_only_options_merge_per_file_without_duplicates():
    pairs = [("a.json", ["pfe", "pfe"]), ("b.json", ["hib"]), ("a.json", ["mc_dropout", "pfe"])]
    assert cli._merged_only(pairs) == {"a.json": ["pfe", "mc_dropout"], "b.json": ["hib"]}
