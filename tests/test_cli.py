"""The CLI contract: files written, resume after SIGKILL, and one-line errors with exit code 2."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from mpsearch.cli import main

ROOT = Path(__file__).resolve().parent.parent

STOPPABLE_TASK = '''
import os
import sqlite3
import time
from pathlib import Path

import torch
from mpsearch.tasks import digits


def n_stored(db):
    try:
        con = sqlite3.connect(db)
        try:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


class Stoppable(torch.nn.Module):
    """The digits CNN. With MPSEARCH_TEST_HANG=N:DB:MARKER, the first forward that finds N evaluations
    stored in DB writes MARKER and never returns, so a test can kill the search at a known point."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        hang = os.environ.get("MPSEARCH_TEST_HANG")
        if hang:
            n, db, marker = hang.split(":", 2)
            if n_stored(db) >= int(n):
                Path(marker).write_text("hanging")
                time.sleep(3600)
        return self.inner(x)


def make_task():
    task = digits.load_task()
    task.model = Stoppable(task.model)
    task.calibration = task.calibration[:1]
    task.name = "slow-digits"
    return task
'''

OTHER_MODEL_TASK = '''
import torch
from mpsearch import Task
from mpsearch.tasks import digits


def make_task():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    s = digits.splits()
    cal = [(s["calibration"][0], s["calibration"][1])]
    val = [(s["validation"][0], s["validation"][1])]
    return Task(model=model, calibration=cal, validation=val, metric="accuracy", name="tiny")


def not_a_task():
    return 42
'''


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad_input(args, capsys, fragment: str):
    code, out, err = run_cli(args, capsys)
    assert code == 2, (code, out, err)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert fragment.lower() in err.lower(), err


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A budgeted digits search, as README's demo runs it (fewer evaluations)."""
    out = tmp_path_factory.mktemp("demo")
    code = main(["search", "--model", "digits", "--strategy", "pso", "--max-evals", "40", "--avg-bits", "3",
                 "--seed", "0", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_search_writes_every_contract_file(demo_run):
    for name in ("summary.json", "trials.csv", "front.csv", "front.png", "plan.json"):
        assert (demo_run / name).stat().st_size > 0, name
    s = json.loads((demo_run / "summary.json").read_text())
    for key in ("model", "strategy", "seed", "n_evals", "wall_s", "metric_name", "reference_metric", "hypervolume",
                "hypervolume_ref", "best"):
        assert key in s, key
    assert s["n_evals"] == 40 and s["strategy"] == "pso" and s["model"] == "digits"
    for key in ("size_bytes", "avg_bits", "compression_ratio", "metric", "validation_metric"):
        assert key in s["best"], key
    assert s["best"]["avg_bits"] <= 3.0 + 1e-9
    trials = pd.read_csv(demo_run / "trials.csv")
    assert (trials.strategy == "pso").sum() == 40  # and the uniform baselines pso did not ask, evaluated by the run
    assert set(trials.strategy) <= {"pso", "uniform-baseline"}
    assert {"size_bytes", "avg_bits", "metric"} <= set(trials.columns)
    bit_cols = [c for c in trials.columns if c.startswith("bits:")]
    assert len(bit_cols) == 6
    assert not trials.duplicated(bit_cols).any()
    front = pd.read_csv(demo_run / "front.csv")
    assert 1 <= len(front) <= len(trials)
    # the front's points are evaluations of the run, and no evaluation dominates a front point (baselines included)
    for _, f in front.iterrows():
        dominated = trials[(trials.size_bytes <= f.size_bytes) & (trials.metric >= f.metric)
                           & ((trials.size_bytes < f.size_bytes) | (trials.metric > f.metric))]
        assert dominated.empty
    # the best within budget is the best feasible trial
    feasible = trials[trials.avg_bits <= 3.0 + 1e-9]
    assert s["best"]["metric"] == pytest.approx(feasible.metric.max())


def test_show_verify_export_on_the_demo_plan(demo_run, capsys, tmp_path):
    code, out, _ = run_cli(["show", demo_run / "plan.json"], capsys)
    assert code == 0 and "features.0" in out and "classifier.5" in out
    code, out, _ = run_cli(["verify", demo_run / "plan.json", "--model", "digits", "--json"], capsys)
    assert code == 0
    r = json.loads(out)
    plan = json.loads((demo_run / "plan.json").read_text())
    assert r["size_bytes"] == plan["predicted"]["size_bytes"]
    assert r["metric"] == pytest.approx(plan["predicted"]["validation_metric"], abs=1e-6)
    for key in ("size_bytes", "avg_bits", "metric_name", "metric", "predicted_metric"):
        assert key in r
    code, out, _ = run_cli(["export", demo_run / "plan.json", "--format", "csv", "--out", tmp_path / "plan.csv"], capsys)
    assert code == 0
    table = pd.read_csv(tmp_path / "plan.csv")
    assert table["bytes"].sum() <= plan["predicted"]["size_bytes"]
    assert set(table["layer"]) == set(plan["layers"])


def _complete_trials(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT t.trial_id, p.param_name, p.param_value FROM trials t JOIN trial_params p ON p.trial_id = t.trial_id "
            "WHERE t.state = 'COMPLETE' ORDER BY t.trial_id, p.param_name").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()
    by_trial: dict[int, list] = {}
    for tid, name, value in rows:
        by_trial.setdefault(tid, []).append((name, value))
    return [tuple(v) for v in by_trial.values()]


@pytest.mark.parametrize("strategy", ["random", "pso"])
def test_sigkill_then_resume_finishes_with_exactly_max_evals(tmp_path, strategy):
    task_file = tmp_path / "stoppable_task.py"
    task_file.write_text(STOPPABLE_TASK)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mpsearch.cli", "search", "--model", f"{task_file}:make_task", "--strategy", strategy,
           "--max-evals", "40", "--avg-bits", "3", "--seed", "1", "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    db, marker = out / "trials.db", tmp_path / "hanging"
    proc = subprocess.Popen(cmd, env={**env, "MPSEARCH_TEST_HANG": f"10:{db}:{marker}"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240  # generous: the search hangs by itself once 10 evaluations are stored
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no hang"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stored_before = _complete_trials(db)
    assert len(stored_before) == 10

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    stored = _complete_trials(db)
    assert len(stored) == 40, "exactly --max-evals evaluations in total"
    assert len(set(stored)) == 40, "no candidate evaluated twice"
    s = json.loads((out / "summary.json").read_text())
    assert s["n_evals"] == 40
    assert s["n_resumed"] == len(stored_before)
    trials = pd.read_csv(out / "trials.csv")
    trials = trials[trials.strategy == strategy]
    assert int((~trials.resumed).sum()) == 40 - len(stored_before)


def test_fresh_discards_stored_trials(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["search", "--model", "digits", "--strategy", "random", "--max-evals", "12", "--out", out, "--no-progress"]
    assert run_cli(args, capsys)[0] == 0
    assert run_cli(args, capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["n_resumed"] == 12
    assert run_cli(args + ["--fresh"], capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["n_resumed"] == 0


def test_compare_writes_files_and_matches_single_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    code, _, err = run_cli(["compare", "--model", "digits", "--strategies", "random,pso,uniform", "--seeds", "3",
                            "--max-evals", "20", "--avg-bits", "3", "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    for name in ("comparison.csv", "comparison.md", "comparison.tex", "hypervolume.png", "fronts.png"):
        assert (out / name).stat().st_size > 0, name
    runs = pd.read_csv(out / "comparison.csv")
    assert len(runs) == 9 and set(runs.strategy) == {"random", "pso", "uniform"}
    assert (runs[runs.strategy != "uniform"].n_evals == 20).all()
    # a per-run summary from `search` agrees with the comparison's row for the same strategy and seed
    single = tmp_path / "single"
    assert run_cli(["search", "--model", "digits", "--strategy", "pso", "--max-evals", "20", "--avg-bits", "3",
                    "--seed", "2", "--out", single, "--no-progress"], capsys)[0] == 0
    s = json.loads((single / "summary.json").read_text())
    row = runs[(runs.strategy == "pso") & (runs.seed == 2)].iloc[0]
    assert row.hypervolume == pytest.approx(s["strategy_hypervolume"], rel=1e-12)  # the strategy's own trials
    assert s["hypervolume"] >= s["strategy_hypervolume"]  # the run's front adds the uniform baselines
    assert row.best_metric == pytest.approx(s["best"]["metric"], rel=1e-12)
    assert row.best_validation_metric == pytest.approx(s["best"]["validation_metric"], rel=1e-12)
    md = (out / "comparison.md").read_text()
    hv = runs[runs.strategy == "random"].hypervolume
    assert f"{hv.mean():.4f} ± {hv.std(ddof=1):.4f}" in md


# ---- bad input: one line on stderr, exit code 2 ------------------------------------------------
@pytest.fixture(scope="module")
def user_tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "other.py").write_text(OTHER_MODEL_TASK)
    (d / "broken.py").write_text("import not_a_module_anywhere\n")
    (d / "bad.yaml").write_text("choices: [2, 3\ninclude: ]]\n")
    (d / "nomatch.yaml").write_text("include: ['no\\.such\\.layer']\n")
    return d


def test_unknown_model(capsys, tmp_path):
    assert_bad_input(["search", "--model", "resnet9000", "--out", tmp_path], capsys, "unknown model")


def test_unknown_strategy(capsys, tmp_path):
    assert_bad_input(["search", "--strategy", "annealing", "--out", tmp_path], capsys, "unknown strategy")


def test_unknown_export_format(demo_run, capsys, tmp_path):
    assert_bad_input(["export", demo_run / "plan.json", "--format", "tflite", "--out", tmp_path / "x"], capsys,
                     "unknown export format")


def test_module_function_that_does_not_import(user_tasks, capsys, tmp_path):
    assert_bad_input(["search", "--model", f"{user_tasks / 'broken.py'}:make_task", "--out", tmp_path], capsys,
                     "cannot import")
    assert_bad_input(["search", "--model", "no_such_module_xyz:make", "--out", tmp_path], capsys, "cannot import")


def test_function_returning_wrong_type(user_tasks, capsys, tmp_path):
    assert_bad_input(["search", "--model", f"{user_tasks / 'other.py'}:not_a_task", "--out", tmp_path], capsys,
                     "must return mpsearch.Task")


def test_malformed_yaml(user_tasks, capsys, tmp_path):
    assert_bad_input(["search", "--search-space", user_tasks / "bad.yaml", "--out", tmp_path], capsys, "malformed YAML")


def test_space_matching_no_layer(user_tasks, capsys, tmp_path):
    assert_bad_input(["search", "--search-space", user_tasks / "nomatch.yaml", "--out", tmp_path], capsys,
                     "matches no layer")


def test_infeasible_budget_states_smallest_size(capsys, tmp_path):
    code, out, err = run_cli(["search", "--avg-bits", "1.5", "--out", tmp_path], capsys)
    assert code == 2 and "smallest possible model" in err and "2.115 average bits" in err  # scales count
    assert_bad_input(["search", "--budget-mb", "0.001", "--out", tmp_path], capsys, "smallest possible model")


def test_non_positive_max_evals(capsys, tmp_path):
    assert_bad_input(["search", "--max-evals", "0", "--out", tmp_path], capsys, "must be a positive integer")
    assert_bad_input(["search", "--max-evals", "-5", "--out", tmp_path], capsys, "must be a positive integer")


def test_plan_for_another_model(demo_run, user_tasks, capsys):
    assert_bad_input(["verify", demo_run / "plan.json", "--model", f"{user_tasks / 'other.py'}:make_task"], capsys,
                     "fingerprint")


def test_unreadable_or_corrupt_plan(demo_run, capsys, tmp_path):
    assert_bad_input(["show", tmp_path / "missing.json"], capsys, "cannot read plan")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text((demo_run / "plan.json").read_text()[:200])
    assert_bad_input(["verify", corrupt, "--model", "digits"], capsys, "corrupt plan")
    future = json.loads((demo_run / "plan.json").read_text())
    future["version"] = 7
    (tmp_path / "v7.json").write_text(json.dumps(future))
    assert_bad_input(["show", tmp_path / "v7.json"], capsys, "unsupported plan version")
    bad_bits = json.loads((demo_run / "plan.json").read_text())
    bad_bits["layers"]["features.0"]["bits"] = 40
    (tmp_path / "bits.json").write_text(json.dumps(bad_bits))
    assert_bad_input(["show", tmp_path / "bits.json"], capsys, "layers.features.0.bits: input should be less than or equal to 16")


def test_unknown_or_unreachable_storage(capsys, tmp_path):
    assert_bad_input(["search", "--max-evals", "2", "--storage", "nosuchdb://x/y", "--out", tmp_path], capsys,
                     "cannot open storage")
    assert_bad_input(["search", "--max-evals", "2", "--storage", "not a url", "--out", tmp_path], capsys, "not a URL")
    assert_bad_input(["search", "--max-evals", "2", "--storage", "sqlite:////nonexistent/dir/x.db", "--out", tmp_path],
                     capsys, "cannot open storage")


def test_output_directory_not_writable(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_bad_input(["search", "--out", blocker / "sub"], capsys, "cannot write to output directory")


def test_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mpsearch.cli", "search", "--model", "nope", "--out", str(tmp_path)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_ctrl_c_writes_what_was_computed_and_exits_130(tmp_path, capsys, monkeypatch):
    """A KeyboardInterrupt inside the 8th evaluation: the search stops, the run's files are written with the 7
    evaluations done, and the exit code is 130."""
    from mpsearch.evaluator import Evaluator

    real, calls = Evaluator.evaluate, [0]

    def interrupted(self, candidate, split="calibration"):
        calls[0] += 1
        if calls[0] == 8:
            raise KeyboardInterrupt
        return real(self, candidate, split)

    monkeypatch.setattr(Evaluator, "evaluate", interrupted)
    out = tmp_path / "run"
    code = main(["search", "--model", "digits", "--strategy", "random", "--max-evals", "20", "--avg-bits", "4",
                 "--out", str(out), "--no-progress"])
    assert code == 130
    s = json.loads((out / "summary.json").read_text())
    assert s["stop_reason"] == "interrupted" and s["n_evals"] == 7
    trials = pd.read_csv(out / "trials.csv")
    assert (trials.strategy == "random").sum() == 7
