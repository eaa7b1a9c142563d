"""Hostile inputs and faults, each as a user or an adversary meets it: one line and exit 2 for bad input,
faults recorded as failed trials, nothing of the user's overwritten, no stale or dominated results."""
from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest


import mpsearch
from mpsearch.cli import main
from mpsearch.errors import BudgetError, CandidateError, PlanError

ROOT = Path(__file__).resolve().parent.parent

TASKS = '''
import torch
from torch import nn
from mpsearch import Task
from mpsearch.tasks import digits


def _digits(model=None, metric="accuracy", name="hostile"):
    base = digits.load_task()
    return Task(model=model or base.model, calibration=base.calibration[:1], validation=base.validation[:1],
                metric=metric, name=name, search_space="digits.yaml")


class Flaky(nn.Module):
    """The digits CNN whose forward raises on its 4th call after the evaluator is built (one bad candidate)."""

    def __init__(self, inner, fail_at):
        super().__init__()
        self.inner, self.calls, self.fail_at = inner, 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.calls in self.fail_at:
            raise RuntimeError("flaky forward")
        return self.inner(x)


def flaky():
    # the evaluator's own forwards: MAC count 1, references 1 + 1 (one batch per split)
    return _digits(Flaky(digits.load_model(), fail_at={3 + 4}), name="flaky")


def broken():
    return _digits(Flaky(digits.load_model(), fail_at=set(range(4, 10_000))), name="broken")


def nan_metric():
    calls = [0]

    def metric(outputs, targets):
        calls[0] += 1
        return float("nan") if calls[0] > 2 else 1.0  # the two reference scores are fine

    return _digits(metric=metric, name="nanmetric")


def sometimes_nan_metric():
    calls = [0]

    def metric(outputs, targets):
        calls[0] += 1  # the two reference scores, then every fourth candidate NaN
        return float("nan") if calls[0] > 2 and calls[0] % 4 == 0 else float((outputs.argmax(-1) == targets).float().mean())

    return _digits(metric=metric, name="sometimesnan")


class Exploding(nn.Module):
    def forward(self, x):
        return torch.full((x.shape[0], 10), float("inf")) + x.flatten(1)[:, :10] * 0 + self.w

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(10))
        self.fc = nn.Linear(64, 10)


def infinite_outputs():
    return _digits(Exploding(), metric="kl", name="infinite")


def nan_reference_metric():
    return _digits(metric=lambda o, t: float("nan"), name="nanref")


def nan_weight():
    m = digits.load_model()
    with torch.no_grad():
        m.features[0].weight[0, 0, 0, 0] = float("nan")
    return _digits(m, metric="kl", name="nanweight")


def kl_task():
    return _digits(metric="kl", name="kl")


def sqnr_task():
    return _digits(metric="sqnr", name="sqnr")


class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(64, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(self.flat(x)))))


def linear_bn():
    return _digits(LinearBN().eval(), metric="kl", name="linearbn")
'''


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    (d / "hostile_tasks.py").write_text(TASKS)
    return d / "hostile_tasks.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small budgeted digits run and its plan."""
    out = tmp_path_factory.mktemp("run")
    assert main(["search", "--model", "digits", "--strategy", "greedy", "--max-evals", "30", "--avg-bits", "3",
                 "--out", str(out), "--no-progress"]) == 0
    return out


def cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def bad(args, capsys, *fragments):
    code, out, err = cli(args, capsys)
    assert code == 2, (code, out, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f.lower() in err.lower(), err
    return err


def search_args(out, *extra, model="digits", evals=6):
    return ["search", "--model", model, "--strategy", "random", "--max-evals", evals, "--out", out, "--no-progress",
            *extra]


# ---- exit 2 for bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,option,fragment", [
    ("pso", "n_particles=0", "n_particles"), ("pso", "n_particles=abc", "n_particles"),
    ("pso", "n_particles=nan", "n_particles"), ("bayes", "sampler=foo", "sampler"),
    ("bayes", "local_share=2", "local_share"), ("bayes", "batch_size=0", "batch_size"),
    ("ilp", "solver=cplex", "solver"), ("pso", "no_such_option=1", "no option"),
])
def test_strategy_options(strategy, option, fragment, capsys, tmp_path):
    bad(["search", "--strategy", strategy, "--option", option, "--out", tmp_path], capsys, fragment)


def test_help_options_lists_types_ranges_and_defaults(capsys):
    code, out, _ = cli(["search", "--strategy", "pso", "--help-options"], capsys)
    assert code == 0 and "n_particles (default 16): an integer in [1, inf]" in out


def test_negative_seed(capsys, tmp_path):
    bad(search_args(tmp_path, "--seed", "-1"), capsys, "seed")


@pytest.mark.parametrize("text,fragment", [
    ("layer_choices: 8\n", "layer_choices: input should be a valid dictionary"),
    ("limits: {x: 'a'}\n", "limits.x"),
    ("pin: ['features.0']\n", "pin: input should be a valid dictionary"),
    ("quantizer: symmetric\n", "quantizer: input should be a valid dictionary"),
    ("quantizer: {scale_bits: -3}\n", "quantizer.scale_bits"),
    ("quantizer: {clip_search: 'yes'}\n", "quantizer.clip_search: input should be a valid boolean"),
    ("include: 'features.*'\n", "include: input should be a valid list"),
    ("types: Linear\n", "types: input should be a valid list"),
    ("choices: [32]\n", "no decision to make"),
    ("bitz: [2]\n", "bitz: unknown key"),
    ("quantizer: {scheme: asymmetric, zero_point_bits: 3}\n", "zero_point_bits"),
])
def test_space_files(text, fragment, capsys, tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text(text)
    err = bad(search_args(tmp_path / "out", "--search-space", f), capsys, fragment)
    assert str(f) in err or "no decision" in fragment


def test_an_empty_space_file_is_the_documented_default(capsys, tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("")
    code, out, err = cli(search_args(tmp_path / "out", "--search-space", f), capsys)
    assert code == 0 and "6 decisions" in out


def test_plan_files(run, capsys, tmp_path):
    binary = tmp_path / "binary.json"
    binary.write_bytes(bytes(range(256)) * 4)
    for args in (["verify", binary, "--model", "digits"], ["show", binary],
                 ["export", binary, "--format", "csv", "--out", tmp_path / "x.csv"]):
        bad(args, capsys, "not a text file")
    doc = json.loads((run / "plan.json").read_text())
    no_shape = json.loads(json.dumps(doc))
    del no_shape["layers"]["features.0"]["shape"]
    (tmp_path / "noshape.json").write_text(json.dumps(no_shape))
    bad(["show", tmp_path / "noshape.json"], capsys, "layers.features.0.shape: missing")
    string_size = json.loads(json.dumps(doc))
    string_size["predicted"]["size_bytes"] = "20344"
    (tmp_path / "ssize.json").write_text(json.dumps(string_size))
    bad(["show", tmp_path / "ssize.json"], capsys, "predicted.size_bytes")
    bad(["export", tmp_path / "ssize.json", "--format", "markdown", "--out", tmp_path / "x.md"], capsys,
        "predicted.size_bytes")


def test_export_out_is_a_directory_or_the_plan_itself(run, capsys, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text((run / "plan.json").read_text())
    before = plan.read_text()
    bad(["export", plan, "--format", "csv", "--out", tmp_path], capsys, "is a directory")
    bad(["export", plan, "--format", "csv", "--out", plan], capsys, "would destroy it")
    assert plan.read_text() == before


def test_a_failed_export_leaves_nothing(run, tmp_path, monkeypatch):
    from mpsearch import exporters

    exporters._load_all()

    def half_written(plan, out, task=None):
        out.write_text("half")
        raise RuntimeError("the runtime fell over")

    monkeypatch.setitem(exporters.REGISTRY, "csv", exporters.REGISTRY["csv"].__class__(
        "csv", half_written, False, ".csv", "broken"))
    with pytest.raises(RuntimeError):
        exporters.export(mpsearch.QuantizationPlan.load(run / "plan.json"), "csv", tmp_path / "out.csv")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("task,fragment", [
    ("nan_weight", "NaN or infinite"),
    ("nan_reference_metric", "not a number to rank by"),
    ("infinite_outputs", "outputs are not finite"),
])
def test_tasks_that_cannot_be_searched(task, fragment, tasks, capsys, tmp_path):
    bad(search_args(tmp_path, model=f"{tasks}:{task}"), capsys, fragment)


@pytest.mark.parametrize("flag,value,fragment", [
    ("--avg-bits", "inf", "finite"), ("--avg-bits", "nan", "finite"), ("--avg-bits", "-2", "finite"),
    ("--budget-mb", "inf", "finite"), ("--max-failures", "2", "between 0 and 1"),
])
def test_budgets(flag, value, fragment, capsys, tmp_path):
    bad(search_args(tmp_path, flag, value), capsys, fragment)


def test_a_budget_everything_meets_is_a_warning(capsys, tmp_path):
    code, out, err = cli(search_args(tmp_path, "--budget-mb", "1e300"), capsys)
    assert code == 0 and "warning: the budget" in err and "admits every candidate" in err
    assert "admits every candidate" in json.loads((tmp_path / "summary.json").read_text())["warnings"][0]


def test_read_only_storage(run, capsys, tmp_path):
    url = f"sqlite:///file:{run / 'trials.db'}?mode=ro&uri=true"
    bad(search_args(tmp_path, "--storage", url, "--study", "x"), capsys, "read-only")


def test_plan_missing_a_layer_does_not_verify(run, capsys, tmp_path):
    doc = json.loads((run / "plan.json").read_text())
    del doc["layers"]["features.0"]
    (tmp_path / "missing.json").write_text(json.dumps(doc))
    bad(["verify", tmp_path / "missing.json", "--model", "digits"], capsys, "features.0.weight", "predicts")


# ---- python API --------------------------------------------------------------------------------------
def test_python_api_refusals(run, tmp_path):
    task = mpsearch.load_task("digits")
    from mpsearch.evaluator import Evaluator
    from mpsearch.model import space_for

    with Evaluator(task, space_for(task)) as ev:
        with pytest.raises(CandidateError):
            ev.evaluate((4.7, 4.2, 4, 4, 4, 4))
        with pytest.raises(CandidateError):
            ev.evaluate((4, 4))
    with pytest.raises(BudgetError):
        mpsearch.Budget(max_avg_bits=math.nan)
    with pytest.raises(BudgetError):
        mpsearch.Budget(max_bytes=-1)
    plan = mpsearch.QuantizationPlan.load(run / "plan.json")
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(PlanError, match="directory"):
        plan.save(d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]  # no stray temporary file


# ---- faults are data ---------------------------------------------------------------------------------
def test_a_forward_that_raises_is_a_failed_trial(tasks, capsys, tmp_path):
    code, out, err = cli(search_args(tmp_path, "--avg-bits", "4", model=f"{tasks}:flaky", evals=10), capsys)
    assert code == 0, err
    trials = pd.read_csv(tmp_path / "trials.csv")
    failed = trials[trials.error.fillna("") != ""]
    assert len(failed) == 1 and "flaky forward" in failed.error.iloc[0] and math.isnan(failed.metric.iloc[0])
    assert (trials.strategy == "random").sum() == 10  # the search went on
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["n_failed"] == 1 and "flaky forward" in s["first_error"]
    # resuming reads the failure back instead of paying for it again
    code, out, _ = cli(search_args(tmp_path, "--avg-bits", "4", model=f"{tasks}:flaky", evals=10), capsys)
    assert code == 0 and "resumed 10 stored evaluations" in out


def test_too_many_failures_stop_with_exit_1_and_keep_everything(tasks, capsys, tmp_path):
    code, out, err = cli(search_args(tmp_path, model=f"{tasks}:broken", evals=20), capsys)
    assert code == 1
    assert "evaluations failed" in err and "flaky forward" in err and "Traceback" not in err
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["stop_reason"] == "too many failed evaluations" and s["n_failed"] >= 3


def test_a_nan_metric_is_a_failed_trial(tasks, capsys, tmp_path):
    code, out, err = cli(search_args(tmp_path, model=f"{tasks}:nan_metric", evals=5, ), capsys)
    assert code == 1 and "not a number to rank by" in err  # every candidate failed


def test_some_nan_metrics_are_failed_trials_the_search_goes_on_and_never_asks_them_again(tasks, capsys, tmp_path):
    code, out, err = cli(search_args(tmp_path, "--avg-bits", "4", model=f"{tasks}:sometimes_nan_metric", evals=16),
                         capsys)
    assert code == 0, err
    trials = pd.read_csv(tmp_path / "trials.csv")
    searched = trials[trials.strategy == "random"]
    failed = searched[searched.error.fillna("") != ""]
    assert len(searched) == 16 and 2 <= len(failed) < 16
    assert all("not a number to rank by" in e for e in failed.error)
    bits = [c for c in trials.columns if c.startswith("bits:")]
    assert len(bits) == 6
    assert not searched[bits].duplicated().any(), "a candidate (failed or not) was asked twice"
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["n_failed"] == len(failed) and s["best"]["metric"] == s["best"]["metric"]  # a real plan, not NaN


def test_a_worker_fault_gets_the_same_exit_code(tasks, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "mpsearch.cli", *map(str, search_args(
        tmp_path, "--workers", "1", model=f"{tasks}:broken", evals=10))], capture_output=True, text=True, env=env,
        timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "flaky forward" in r.stderr


def test_sqnr_runs_write_strict_json(tasks, capsys, tmp_path):
    code, out, err = cli(search_args(tmp_path, "--avg-bits", "4", model=f"{tasks}:sqnr_task"), capsys)
    assert code == 0, err
    for name in ("summary.json", "plan.json"):
        text = (tmp_path / name).read_text()
        json.loads(text, parse_constant=lambda c: pytest.fail(f"{name} holds {c}"))


def test_kl_is_named_for_what_it_holds(tasks, capsys, tmp_path):
    code, out, err = cli(search_args(tmp_path, "--avg-bits", "4", model=f"{tasks}:kl_task"), capsys)
    assert code == 0, err
    assert "neg_kl" in out and "-0.0000" not in out
    assert json.loads((tmp_path / "summary.json").read_text())["metric_name"] == "neg_kl"
    from mpsearch.report import metric_label

    assert metric_label("neg_kl").startswith("-KL")


# ---- nothing stale, nothing dominated, nothing shared --------------------------------------------------
def test_a_rerun_without_a_plan_removes_the_old_one(capsys, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("layer_choices: {'classifier\\.5': [8]}\n")  # no uniform baseline below 8 bits
    out = tmp_path / "out"
    args = ["search", "--model", "digits", "--strategy", "greedy", "--search-space", space, "--avg-bits", "3",
            "--out", out, "--no-progress"]
    assert cli(args + ["--max-evals", "40"], capsys)[0] == 0
    assert (out / "plan.json").is_file()
    code, printed, _ = cli(args + ["--max-evals", "1", "--fresh"], capsys)
    assert code == 0 and "plan:  (none)" in printed
    assert not (out / "plan.json").exists() and not (out / "plan.png").exists()


def test_a_second_search_on_the_same_out_is_refused(capsys, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".mpsearch.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345")
        held.flush()
        bad(search_args(tmp_path), capsys, "another mpsearch search")
        bad(["compare", "--model", "digits", "--strategies", "random", "--seeds", "1", "--max-evals", "3",
             "--out", tmp_path, "--no-progress"], capsys, "another mpsearch search")


def test_the_chosen_plan_is_not_dominated_by_anything_the_run_printed(run):
    trials = pd.read_csv(run / "trials.csv")
    best = json.loads((run / "summary.json").read_text())["best"]
    ok = trials[trials.error.isna() & trials.feasible]
    beats = ok[(ok.size_bytes <= best["size_bytes"]) & (ok.metric >= best["metric"])
               & ((ok.size_bytes < best["size_bytes"]) | (ok.metric > best["metric"]))]
    assert beats.empty
    assert "uniform-baseline" in set(trials.strategy)  # the baselines are in the run's files too
    # front.csv is the front of everything evaluated, baselines included: no evaluated point beats it
    front = pd.read_csv(run / "front.csv")
    for _, t in trials[trials.error.isna()].iterrows():
        assert ((front.size_bytes <= t.size_bytes) & (front.metric >= t.metric)).any(), t.to_dict()


def test_a_baseline_that_beats_the_strategy_becomes_the_plan():
    from mpsearch.core.synthetic import SyntheticObjective, synthetic_space
    from mpsearch.strategies import Strategy

    class Poor(Strategy):
        name = "poor"

        def ask(self):
            return self.new([(2, 2, 2, 2, 2, 4)])  # feasible, and worse than uniform 3-bit

    obj = SyntheticObjective(synthetic_space(6, (2, 3, 4, 8)))
    with pytest.warns(mpsearch.errors.MPSearchWarning, match="uniform 3-bit"):
        res = mpsearch.optimize(None, evaluator=obj, strategy=Poor(), budget=mpsearch.Budget(max_avg_bits=3.6),
                                max_evals=5)
    assert res.best().strategy == "uniform-baseline" and res.best().candidate == (3,) * 6
    assert res.plan().provenance["chosen_from"] == "uniform-baseline"


# ---- small things ----------------------------------------------------------------------------------
def test_plan_figure_and_tables_keep_network_order_with_a_pin(tmp_path):
    from mpsearch.plan import layer_table

    space = {"choices": [2, 4, 8], "pin": {"classifier\\.5": 8}}
    res = mpsearch.optimize("digits", space=space, strategy="uniform", budget=mpsearch.Budget(max_avg_bits=5),
                            max_evals=5)
    names = [r["layer"] for r in layer_table(res.plan())]
    assert names == ["features.0", "features.2", "features.5", "classifier.1", "classifier.3", "classifier.5"]


def test_figure_titles_fit(monkeypatch, tmp_path):
    from mpsearch import report

    seen = []

    def capture(plt, fig, path, dpi):
        fig.canvas.draw()
        for ax in fig.axes:
            box = ax.title.get_window_extent()
            seen.append((box.x0, box.x1, fig.bbox.width))
        plt.close(fig)

    monkeypatch.setattr(report, "save_figure", capture)
    res = mpsearch.optimize("digits", strategy="random", max_evals=5)
    long = "digits, 100 evaluations, budget <= 3 avg bits: fronts (first seed of each strategy), " * 2
    report.plot_front(tmp_path / "f.png", {"random": res.front.points}, res.search.full_precision_bytes, "accuracy", 1.0,
                      title=long)
    assert seen and all(x0 >= 0 and x1 <= width for x0, x1, width in seen)


def test_gptqmodel_keys_only_quantizable_modules(tasks, capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli(["search", "--model", f"{tasks}:linear_bn", "--strategy", "uniform", "--max-evals", "5",
                        "--avg-bits", "4", "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    code, _, err = cli(["export", out / "plan.json", "--format", "gptqmodel", "--out", tmp_path / "q.json"], capsys)
    assert code == 0, err
    keys = json.loads((tmp_path / "q.json").read_text())["dynamic"]
    assert not any("bn" in k for k in keys), keys


def test_torchao_export_is_quiet(run, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "mpsearch.cli", "export", str(run / "plan.json"), "--format", "torchao",
                        "--out", str(tmp_path / "t.json")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr
