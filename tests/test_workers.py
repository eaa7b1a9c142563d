"""Several workers on one search through a shared Optuna storage (SQLite file and PostgreSQL).

Every run checks the same invariants: exactly the requested number of COMPLETE trials, no
candidate completed twice, nothing left WAITING or RUNNING, and every candidate the search
recorded is a COMPLETE trial. The kill test SIGKILLs a worker in the middle of an evaluation:
its trial must go stale (heartbeat 1 s, grace 2 s), be failed and re-queued, and be finished
by the other worker.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pg import postgres_fixture

ROOT = Path(__file__).resolve().parent.parent
N_EVALS = 40

TASK_FILE = textwrap.dedent('''
    """digits with hooks that put a worker at a known point, read off the shared storage (no timing).

    A worker is evaluating when the study holds a RUNNING trial it claimed (``mpsearch_worker``
    = host:pid); the evaluator's own forwards while it is built happen before any claim.
    MPSEARCH_TEST_FAIL: every evaluation raises.
    MPSEARCH_TEST_HANG=MARKER: an evaluation after the first one completed writes MARKER and
    never returns (a worker that is surely mid-evaluation).
    MPSEARCH_TEST_RENDEZVOUS=DIR: the first evaluation waits until another process has reached
    its own (both workers demonstrably hold a trial at once).
    """
    import os
    import socket
    import sys
    import time
    from pathlib import Path

    import optuna
    from optuna.trial import TrialState

    from mpsearch.tasks import Task, digits

    ME = f"{socket.gethostname()}:{os.getpid()}"


    def _arg(flag):
        return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else None


    def _trials():
        url, study = _arg("--storage"), _arg("--study")
        if not url or not study:  # not a worker process
            return []
        try:
            return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)
        except KeyError:  # the driver, before it created the study
            return []


    class HookedDigits(digits.DigitsCNN):
        met = False

        def forward(self, x):
            if any(os.environ.get(k) for k in ("MPSEARCH_TEST_FAIL", "MPSEARCH_TEST_HANG", "MPSEARCH_TEST_RENDEZVOUS")):
                self._hooks(_trials())
            return super().forward(x)

        def _hooks(self, trials):
            evaluating = any(t.state == TrialState.RUNNING and t.system_attrs.get("mpsearch_worker") == ME
                             for t in trials)
            if not evaluating:
                return
            if os.environ.get("MPSEARCH_TEST_FAIL"):
                raise RuntimeError("deliberate failure in the worker")
            marker = os.environ.get("MPSEARCH_TEST_HANG")
            done = sum(1 for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("worker") == ME)
            if marker and done >= 1:
                Path(marker).write_text(ME)
                time.sleep(3600)
            meet = os.environ.get("MPSEARCH_TEST_RENDEZVOUS")
            if meet and not HookedDigits.met:
                HookedDigits.met = True
                Path(meet, str(os.getpid())).write_text("")
                deadline = time.monotonic() + 120
                while len(list(Path(meet).iterdir())) < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)


    def make_task():
        base = digits.load_task()
        model = HookedDigits()
        model.load_state_dict(base.model.state_dict())
        return Task(model=model.eval(), calibration=base.calibration, validation=base.validation,
                    metric="accuracy", name="hookeddigits", search_space="digits.yaml")
''')


@pytest.fixture(scope="session")
def pg_server():
    yield from postgres_fixture()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("pg_server").url


@pytest.fixture
def slow_task(tmp_path) -> str:
    path = tmp_path / "slow_task.py"
    path.write_text(TASK_FILE)
    return f"{path}:make_task"


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    env.pop("MPSEARCH_WORKER_PARENT", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def _start_worker(url: str, study: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mpsearch.cli", "worker", "--storage", url, "--study", study],
                            env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _check_study(url: str, study_name: str, n: int, recorded=None) -> optuna.Study:
    study = optuna.load_study(study_name=study_name, storage=url)
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] == n, states
    assert states[TrialState.WAITING] == 0 and states[TrialState.RUNNING] == 0, states
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == n, "a candidate was completed twice"
    for t in complete:  # the record TrialStore writes, by the worker
        assert t.params == t.system_attrs["fixed_params"]
        assert {"avg_bits", "wall_s", "strategy", "seed", "cached", "order"} <= set(t.user_attrs)
        assert len(t.values) == 2 and t.values[0] > 0
    if recorded is not None:
        names = list(complete[0].params)
        stored = {tuple(int(t.params[k]) for k in names) for t in complete}
        assert set(recorded) == stored and len(recorded) == n
    return study


def test_cli_search_with_two_workers(storage_url, slow_task, tmp_path):
    study = f"cli-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "run"
    meet = tmp_path / "rendezvous"
    meet.mkdir()
    r = subprocess.run([sys.executable, "-m", "mpsearch.cli", "search", "--model", slow_task, "--strategy", "random",
                        "--max-evals", str(N_EVALS), "--workers", "2", "--storage", storage_url, "--study", study,
                        "--out", str(out), "--no-progress"], env=_env(MPSEARCH_TEST_RENDEZVOUS=str(meet)),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    import pandas as pd

    df = pd.read_csv(out / "trials.csv")
    assert (df.strategy == "random").sum() == N_EVALS
    s = _check_study(storage_url, study, N_EVALS)
    workers = Counter(t.user_attrs["worker"] for t in s.trials)
    assert len(workers) == 2, workers  # both local workers held a trial at once (the rendezvous)
    assert len(list(meet.iterdir())) == 2
    assert s.user_attrs["done"] is True
    assert s.user_attrs["worker_task"]["model"] == slow_task
    # The loop's records and the stored ones agree: resuming reads all of them back, computes nothing.
    from mpsearch.tasks import load_task
    from mpsearch.search import Termination, search
    from mpsearch.model import space_for
    from mpsearch.evaluator import Evaluator

    task = load_task("digits")
    space = space_for(task)
    res = search(Evaluator(task, space), "random", Termination(max_evals=N_EVALS), seed=0,
                 storage=storage_url, study_name=study)
    assert res.n_resumed == N_EVALS


def test_worker_killed_mid_evaluation(storage_url, slow_task, tmp_path):
    from mpsearch.evaluator import Evaluator
    from mpsearch.tasks import load_task
    from mpsearch.search import Termination, search
    from mpsearch.model import space_for
    from mpsearch.optuna_rdb import WORKER_ATTR
    from mpsearch.workers import QueueExecutor

    study_name = f"kill-{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "victim-hangs"
    # the victim works alone until it hangs inside its second evaluation; only then is it killed and the
    # survivor started, so the order of events does not depend on how fast either process starts
    victim = _start_worker(storage_url, study_name, MPSEARCH_TEST_HANG=str(marker))
    workers = {"survivor": None}
    task = load_task(slow_task)
    space = space_for(task)
    ex = QueueExecutor(storage_url, slow_task, n_local=0, heartbeat_s=1, grace_s=2, strategy="pso", seed=0)
    killed = {}

    def killer():
        """SIGKILL the victim once it says it hangs inside an evaluation (after completing one), then start the survivor."""
        deadline = time.monotonic() + 150  # generous: the victim reaches that point by itself
        while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if marker.exists():
            me = marker.read_text()
            trials = optuna.load_study(study_name=study_name, storage=storage_url).get_trials(deepcopy=False)
            running = [t for t in trials if t.state == TrialState.RUNNING and t.system_attrs.get(WORKER_ATTR) == me]
            victim.send_signal(signal.SIGKILL)
            killed["trial"] = running[0].number if running else None
        workers["survivor"] = _start_worker(storage_url, study_name)

    th = threading.Thread(target=killer, daemon=True)
    try:
        th.start()
        res = search(Evaluator(task, space), "pso", Termination(max_evals=N_EVALS), seed=0,
                     storage=storage_url, study_name=study_name, executor=ex)
    finally:
        ex.close()
        th.join(timeout=10)
        for p in (victim, workers["survivor"]):
            try:
                if p is not None:
                    p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    assert killed.get("trial") is not None, "the victim never reached its hang inside an evaluation"
    assert victim.wait(timeout=30) == -signal.SIGKILL
    survivor = workers["survivor"]
    out = survivor.communicate(timeout=60)[0]
    assert survivor.returncode == 0, out[-3000:]
    assert res.n_evals == N_EVALS and res.stop_reason == "max evaluations"
    study = _check_study(storage_url, study_name, N_EVALS, [t.candidate for t in res.trials])
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, "the killed worker's trial was not failed as stale"
    retried = [t for t in trials if t.system_attrs.get("failed_trial") is not None]
    assert any(t.state == TrialState.COMPLETE and t.system_attrs["failed_trial"] == killed["trial"] for t in retried)
    assert ex.n_enqueued == N_EVALS
    # strategy and seed of the loop travel with each trial
    assert {t.user_attrs["strategy"] for t in trials if t.state == TrialState.COMPLETE} == {"pso"}


def test_claims_are_exclusive(tmp_path):
    """Many claimers racing for the same WAITING trials: each trial is claimed exactly once."""
    from mpsearch.optuna_rdb import frozen_trial_id, swap_state

    url = f"sqlite:///{tmp_path / 'claims.db'}"
    study = optuna.create_study(storage=url, study_name="claims")
    for i in range(60):
        study.enqueue_trial({"x": i})
    ids = [frozen_trial_id(t) for t in study.get_trials(deepcopy=False)]
    won: dict[int, list[str]] = {i: [] for i in ids}
    barrier = threading.Barrier(4)

    def claimer(name):
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        barrier.wait()
        for tid in ids:
            if swap_state(storage, tid, TrialState.WAITING, TrialState.RUNNING, claimant=name):
                won[tid].append(name)

    threads = [threading.Thread(target=claimer, args=(f"c{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(v) == 1 for v in won.values()), {k: v for k, v in won.items() if len(v) != 1}
    trials = optuna.load_study(study_name="claims", storage=url).get_trials(deepcopy=False)
    assert all(t.state == TrialState.RUNNING for t in trials)
    assert all(t.system_attrs["mpsearch_worker"] == won[frozen_trial_id(t)][0] for t in trials)


def test_a_failed_evaluation_in_a_worker_is_a_failed_trial(slow_task, tmp_path):
    """The same fault as in process: a failed record with its error, the search goes on until too many fail."""
    from mpsearch.evaluator import Evaluator
    from mpsearch.tasks import load_task
    from mpsearch.search import Termination, search
    from mpsearch.model import space_for
    from mpsearch.workers import QueueExecutor

    url = f"sqlite:///{tmp_path / 'err.db'}"
    worker = _start_worker(url, "err", MPSEARCH_TEST_FAIL="1")
    task = load_task(slow_task)
    space = space_for(task)
    ex = QueueExecutor(url, slow_task, heartbeat_s=1, grace_s=2)
    try:
        res = search(Evaluator(task, space), "random", Termination(max_evals=10), storage=url, study_name="err",
                     executor=ex)
    finally:
        ex.close()
    out = worker.communicate(timeout=60)[0]
    assert worker.returncode == 0, out[-3000:]
    assert res.stop_reason == "too many failed evaluations" and res.n_failed == res.n_evals >= 3
    assert all("deliberate failure" in t.error for t in res.trials)
    study = optuna.load_study(study_name="err", storage=url)
    assert not study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    errored = [t for t in failed if "error" in t.user_attrs]  # the others: queued, then cancelled at the stop
    assert len(errored) >= res.n_evals and all("deliberate failure" in t.user_attrs["error"] for t in errored)


def test_queue_executor_rejects_in_memory_storage():
    from mpsearch.errors import StorageError
    from mpsearch.workers import QueueExecutor

    with pytest.raises(StorageError):
        QueueExecutor("sqlite:///:memory:", "digits", n_local=1)
