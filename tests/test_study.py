"""The study: its config, its statistics, and scripts/study.py end to end on tiny models (two folds, two arms)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from mllm.errors import ConfigError, MllmError
from mllm.study.config import cell_config, load_study
from mllm.study.stats import compare, fold_bootstrap, reading, t_interval, t_test_p

from .conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"


def write_study(tmp: Path, **update) -> Path:
    raw = {
        "study": "tiny-study", "experiment": str(TINY), "folds": 2, "store": str(tmp / "store"), "trials": 3,
        "mask_seeds": 2, "bootstrap_samples": 200, "results": str(tmp / "docs" / "RESULTS.md"),
        "set": ["data.max_rows=120", "finetune.members=2", "evaluate.bootstrap_samples=100"],
        "arms": [{"name": "soup", "title": "two seed members", "set": ["finetune.strategy=seeds"]},
                 {"name": "ref", "reference": True, "set": ["finetune.strategy=seeds", "finetune.members=1",
                                                            "finetune.learning_rate=0.003"]},
                 {"name": "shards", "set": ["finetune.strategy=shards", "finetune.include_full=false"],
                  "full_member": "soup", "bigger": "ref"}],
        "notes": ["The cross-domain part did not run in this test."],
        **update,
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --- config ---------------------------------------------------------------------------------------------------


def test_study_config_names_the_arm_and_field_at_fault(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path))
    cfg = cell_config(study, study.arm("shards"), 1)
    assert (cfg.name, cfg.data.folds, cfg.data.fold, cfg.finetune.strategy) == ("tiny-study-shards-f1", 2, 1, "shards")
    assert cfg.search.n_trials == 3 and cfg.tracking.tracking_uri.endswith("store/mlflow.db")
    assert cfg.tracking.artifact_location == str(tmp_path / "store" / "artifacts")  # the store is one folder
    with pytest.raises(ConfigError, match=r"arms\[shards\]: .*finetune.strategy"):
        load_study(write_study(tmp_path, arms=[{"name": "shards", "set": ["finetune.strategy=halves"]}]))
    with pytest.raises(ConfigError, match="full_member: 'soup' is not an earlier arm"):
        load_study(write_study(tmp_path, arms=[{"name": "shards", "full_member": "soup"}]))
    with pytest.raises(ConfigError, match="--arm nope: no such arm"):
        study.arm("nope")
    with pytest.raises(ConfigError, match="folds"):
        load_study(write_study(tmp_path, folds=1))


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_configs_validate(path: Path) -> None:
    study = load_study(path)
    assert study.experiment.is_file() and all(cell_config(study, a, study.folds - 1) for a in study.arms)


def test_study_script_refuses_bad_input_with_exit_code_2(tmp_path: Path) -> None:
    script = REPO / "scripts" / "study.py"
    missing = subprocess.run([sys.executable, str(script), str(tmp_path / "none.yaml")], capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr and len(missing.stderr.splitlines()) == 1
    bad_fold = subprocess.run([sys.executable, str(script), str(write_study(tmp_path)), "--fold", "2"],
                              capture_output=True, text=True)
    assert bad_fold.returncode == 2 and "--fold 2: the study has folds 0..1" in bad_fold.stderr


def test_a_cell_key_ignores_operational_settings_and_separates_bf16(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 cells keep the key they had before model.precision existed (so a committed study resumes at a newer
    mllm), a storage wait changes no figure, and a bf16 cell is another cell."""
    from mllm.study import cell as studycell

    monkeypatch.setattr(studycell, "resolve_precision", lambda model: model.precision)  # any machine has both here
    study = load_study(write_study(tmp_path))
    arm = study.arms[0]
    cfg = cell_config(study, arm, 0)

    def key(precision: str, wait: int = 180) -> str:
        changed = cfg.model_copy(update={"model": cfg.model.model_copy(update={"precision": precision}),
                                         "search": cfg.search.model_copy(update={"storage_wait_s": wait})})
        return studycell.cell_key(study, arm, changed, "fingerprint")

    assert key("fp32") == key("fp32", wait=5) != key("bf16")


# --- statistics -----------------------------------------------------------------------------------------------


def test_t_interval_and_p_match_scipy() -> None:
    from scipy import stats

    values = [0.02, -0.01, 0.05]
    mean, lo, hi = t_interval(values)
    ref = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values)) and (lo, hi) == pytest.approx(ref)
    assert t_test_p(values) == pytest.approx(stats.ttest_1samp(values, 0).pvalue)
    assert t_test_p([0.0, 0.0]) == 1.0 and np.isnan(t_interval([0.3])[1])


def test_fold_bootstrap_resamples_within_folds_and_pairs_the_models() -> None:
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 3, 200), rng.integers(0, 3, 300)]
    perfect = [y.copy() for y in labels]
    assert np.all(fold_bootstrap(labels, perfect, 3, 300) == 1.0)  # a perfect model is perfect in every resample
    noisy = [np.where(rng.random(len(y)) < 0.3, rng.integers(0, 3, len(y)), y) for y in labels]
    same = compare(labels, noisy, noisy, 3, 300)
    assert same.point == 0 and same.boot_ci == (0.0, 0.0) and same.p_boot == 1.0
    better = compare(labels, perfect, noisy, 3, 500)
    assert better.point > 0.2 and better.boot_ci[0] > 0 and better.p_boot < 0.01 and better.mde > 0
    # The point is the mean of the per-fold differences, not the difference on the pooled reviews.
    assert better.point == pytest.approx(np.mean(better.per_fold))
    assert reading(better, 0.05, better.p_boot).startswith("better; better by more than 0.05")
    assert reading(same, 0.05, 1.0) == "not distinguishable at this size; equivalent within +-0.05"


def _shifted(y: np.ndarray, wrong: float, seed: int) -> np.ndarray:
    """Predictions with a `wrong` share of errors (a fixed model: the same array in every resample)."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(len(y)) < wrong, (y + 1) % 3, y)


def test_equivalent_only_where_the_training_variance_interval_fits_the_margin() -> None:
    rng = np.random.default_rng(3)
    labels = [rng.integers(0, 3, 3000) for _ in range(3)]
    base = [_shifted(y, 0.3, 10 + f) for f, y in enumerate(labels)]
    # The merge swings from fold to fold (+-0.07 accuracy: a new fine-tuning each fold) but averages to ~0: the
    # review-only interval is narrow and inside +-0.05, the interval with training variance is not.
    swing = [_shifted(y, w, 20 + f) for f, (y, w) in enumerate(zip(labels, (0.23, 0.37, 0.3), strict=True))]
    c = compare(labels, swing, base, 3, 2000)
    assert abs(c.point) < 0.02 and -0.05 < c.boot_ci90[0] and c.boot_ci90[1] < 0.05  # reviews alone: equivalent
    assert c.hier_ci90[0] < -0.05 or c.hier_ci90[1] > 0.05  # training variance counted: not shown
    assert c.train_ci90[0] <= c.hier_ci90[0] and c.train_ci90[1] >= c.hier_ci90[1]  # the hull of both intervals
    assert "equivalent" not in reading(c, 0.05, c.p_train)
    assert c.mde > 2.8 * c.se  # the MDE counts training variance too
    # Steady folds: both intervals fit and the reading says equivalent.
    steady = [_shifted(y, 0.3, 30 + f) for f, y in enumerate(labels)]
    e = compare(labels, steady, base, 3, 2000, test_train=0.65)
    assert "equivalent within +-0.05" in reading(e, 0.05, e.p_train)
    # The corrected t (Nadeau & Bengio): variance (1/J + n_test/n_train) s^2 over J folds, J - 1 df.
    from scipy import stats

    d = np.array(e.per_fold)
    half = stats.t.ppf(0.975, 2) * np.sqrt((1 / 3 + 0.65) * d.var(ddof=1))
    assert e.nb_ci == pytest.approx((d.mean() - half, d.mean() + half))
    # A reference trained at several seeds: the seeds' spread widens the interval; its point is the seeds' mean.
    seeds = [[_shifted(y, w, 40 + f) for w in (0.22, 0.3, 0.38)] for f, y in enumerate(labels)]
    one = compare(labels, steady, [s[1] for s in seeds], 3, 2000)
    many = compare(labels, steady, seeds, 3, 2000)
    width = lambda x: x.hier_ci[1] - x.hier_ci[0]  # noqa: E731
    assert width(many) > 1.5 * width(one)
    from mllm.evaluation.metrics import macro_f1

    assert many.per_fold[0] == pytest.approx(macro_f1(labels[0], steady[0], 3)
                                             - np.mean([macro_f1(labels[0], p, 3) for p in seeds[0]]))


# --- end to end -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_study_runs_resumes_and_publishes_from_its_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from mllm import search
    from mllm.merging import scorer
    from mllm.study import cell as studycell
    from mllm.study import work as studywork
    from mllm.study.runner import run_study, write_report
    from mllm.study.store import export_store, import_store

    monkeypatch.chdir(tmp_path)
    study = load_study(write_study(tmp_path))
    events: list[str] = []
    real_scorer, real_search = scorer.Scorer, search.run

    class Recording(real_scorer):  # type: ignore[misc, valid-type]
        def __init__(self, cfg, base_dir, member_dirs, reviews=None, member_rows=None):
            events.append("validation" if reviews is None else "test")
            super().__init__(cfg, base_dir, member_dirs, reviews, member_rows)

    def recording_search(*args, **kwargs):
        events.append("search")
        return real_search(*args, **kwargs)

    monkeypatch.setattr(studywork, "Scorer", Recording)
    monkeypatch.setattr(studycell.search, "run", recording_search)
    ids = run_study(study)
    # Per cell: validation, the search, and only then the test split (the reference arm: members, no search).
    per_fold = ["validation", "search", "test", "validation", "test", "validation", "search", "test"]
    assert len(ids) == 6 and events == per_fold * 2
    assert run_study(study) == ids and events.count("test") == 6  # finished cells are reused

    client = MlflowClient(cell_config(study, study.arms[0], 0).tracking.tracking_uri)
    runs = [client.get_run(i) for i in ids]
    assert {r.info.status for r in runs} == {"FINISHED"}
    # Every review of the subsample is tested exactly once over the folds.
    tested = sum(int(r.data.params["test_rows"]) for r in runs if r.data.tags["mllm.arm"] == "soup")
    assert {r.data.tags["mllm.arm"] for r in runs} == {"soup", "ref", "shards"}
    rows = sum(int(r.data.params[f"{s}_rows"]) for s in ("train", "validation", "test") for r in runs[:1])
    assert tested == rows

    out = write_report(study, "study.yaml")
    text = out.read_text()
    assert "## Arm `ref`" not in text and "reference arm" in text
    for heading in ("## Summary", "## Protocol", "## Arm `soup`", "## Arm `shards`", "## Wall time",
                    "## Appendix: run ids", "searched merge minus the best member", "full-data member",
                    "bigger model", "DARE-TIES (mean of 2 mask seeds)", "The cross-domain part did not run",
                    "searched merge minus the uniform soup", "searched merge minus the greedy soup",
                    "the full-data member (seeds)", "95% training variance", "95% reviews only",
                    "Optimism of what was chosen on validation", "## How the searched merge is chosen (no test read)",
                    "| best-all |", "| crossfit |", "| one_se |", "| uniform soup |", "searched: best-all"):
        assert heading in text, heading
    assert (out.parent / "results" / "tiny-study-soup.png").stat().st_size > 1000
    appendix = text[text.index("## Appendix"):]
    ids_listed = set(re.findall(r"`([0-9a-f]{32})`", appendix))
    assert set(ids) <= ids_listed and len(ids_listed) > 40
    for run_id in ids_listed:  # the appendix resolves in the study's store
        assert client.get_run(run_id).info.status == "FINISHED"
    # The table's numbers are the runs' numbers.
    soup0 = next(r for r in runs if r.data.tags["mllm.arm"] == "soup" and r.data.tags["mllm.fold"] == "0")
    searched = client.search_runs([soup0.info.experiment_id],
                                  f"tags.mllm.study_model = 'searched' and tags.mlflow.parentRunId = "
                                  f"'{soup0.info.run_id}'")[0]
    line = next(x for x in text.splitlines() if x.startswith("| searched merge |"))
    assert f"{searched.data.metrics['test_macro_f1']:.4f}" == line.split("|")[2].strip()
    assert searched.data.params["policy"] == "best" and searched.data.params["chosen_on"] == "search rows"
    # The cell's search chose the trial the cell reports: one NLL guard reference for both.
    search_run = client.search_runs([soup0.info.experiment_id], f"tags.mllm.stage = 'search' and "
                                    f"tags.mlflow.parentRunId = '{soup0.info.run_id}'")[0]
    assert search_run.data.tags["chosen_trial"] == searched.data.params["trial"]
    # Its optimism row is validation minus test of the same runs (fold 0 is the first fold column).
    soup = text[text.index("## Arm `soup`"):text.index("## Arm `shards`")]
    row = next(x for x in soup.splitlines() if x.startswith("| searched merge | ") and "+" in x.split("|")[2])
    m = searched.data.metrics
    assert row.split("|")[2].strip() == f"{m['val_macro_f1'] - m['test_macro_f1']:+.4f}"
    # The cell kept every complete trial's per-review validation scores, from which the policy table is made.
    import json as _json

    kept = _json.loads(Path(client.download_artifacts(soup0.info.run_id, "trials.json", str(tmp_path))).read_text())
    assert len(kept["trials"]) >= 1 and len(kept["trials"][0]["pred"]) == len(kept["labels"])
    assert not set(kept["search_rows"]) & set(kept["holdout_rows"])

    # The light store (databases and small artifacts, no weights) rebuilds the same report in another directory,
    # with the original store gone, and the study resumes there without recomputing anything.
    experiment_root = Path(client.get_experiment(runs[0].info.experiment_id).artifact_location)
    foreign = experiment_root / "0123456789abcdef0123456789abcdef" / "artifacts" / "not-this-study.txt"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("a run of another store that shares this artifact root")
    archive = export_store(study, tmp_path / "light.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert not [n for n in names if n.endswith((".safetensors", "not-this-study.txt")) or n.startswith("/")]
    assert any(n.endswith("predictions.csv") for n in names)
    with pytest.raises(MllmError, match="exists"):
        import_store(study, archive)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = write_study(elsewhere)
    shutil.rmtree(tmp_path / "store")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "study.py"), str(moved),
                           "--import", str(archive), "--report-only"], capture_output=True, text=True, cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"[1-9]\d* registered versions without weights will be rebuilt", done.stdout)
    relocated = MlflowClient(f"sqlite:///{elsewhere}/store/mlflow.db")
    for run_id in ids:  # artifacts now resolve under the new directory
        assert relocated.get_run(run_id).info.artifact_uri.startswith(str(elsewhere / "store"))
    resumed = subprocess.run([sys.executable, str(REPO / "scripts" / "study.py"), str(moved),
                              "--no-report"], capture_output=True, text=True, cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count(", reused") == 6 and "finetune" not in resumed.stdout  # nothing recomputed
    again = (elsewhere / "docs" / "RESULTS.md").read_text()
    def tables(doc: str) -> str:
        return doc[doc.index("## Arm `soup`"):doc.index("## Wall time")]

    assert tables(again) == tables(text)

    # A rerun of the choice (another key: more trials) retrains the members the light store has no weights for,
    # finds them equal to the finished cell's, takes its fixed models over instead of scoring them again, and says
    # where they came from.
    rerun = write_study(elsewhere, trials=4)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "study.py"), str(rerun), "--arm", "soup",
                           "--fold", "0", "--no-report"], capture_output=True, text=True, cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "its fixed models are taken over" in done.stdout
    new_cell = relocated.search_runs([soup0.info.experiment_id], "tags.`mllm.stage` = 'study-cell'",
                                     order_by=["attributes.start_time DESC"])[0]
    assert new_cell.info.run_id != soup0.info.run_id and new_cell.data.params["trials"] == "4"

    def child(cell_id: str, name: str):
        return relocated.search_runs([soup0.info.experiment_id], f"tags.mllm.study_model = '{name}' and "
                                     f"tags.mlflow.parentRunId = '{cell_id}'")[0]

    for name in ("uniform", "ties", "member:1", "dare_ties:0"):
        old, new = child(soup0.info.run_id, name), child(new_cell.info.run_id, name)
        assert new.data.params["reused_from"] == old.info.run_id, name
        assert new.data.metrics["test_macro_f1"] == old.data.metrics["test_macro_f1"]
    assert "reused_from" not in child(new_cell.info.run_id, "searched").data.params

    # An extra merge added to an arm after its cells ran is scored on a light store too: the cell's members have no
    # weights there, so they are trained again, checked to reproduce the cell's, and merged.
    extra = write_study(elsewhere, arms=[*yaml.safe_load(moved.read_text())["arms"][:2],
                                         {**yaml.safe_load(moved.read_text())["arms"][2], "merges": ["regmean"]}])
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "study.py"), str(extra), "--arm", "shards",
                           "--fold", "0", "--no-report"], capture_output=True, text=True, cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "members trained again reproduce the cell's" in done.stdout and "added to cell run" in done.stdout

    # Which policy the report calls the searched merge is read when it is written (every cell scores them all):
    # another search.choice reuses every cell and heads the table with that policy's choices.
    base_set = ["data.max_rows=120", "finetune.members=2", "evaluate.bootstrap_samples=100"]
    other = write_study(elsewhere, set=[*base_set, "search.choice=one_se"])
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "study.py"), str(other)], capture_output=True,
                          text=True, cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count(", reused") == 6 and "trials finished" not in done.stdout  # nothing searched again
    text = (elsewhere / "docs" / "RESULTS.md").read_text()
    assert "the search's choice (one_se)" in text and "| searched: crossfit |" in text
