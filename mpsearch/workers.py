"""Scale out: one search, several evaluating processes, coordinated through an Optuna storage.

The driver (``mpsearch search --workers N``, or ``search(..., executor=QueueExecutor(...))``)
runs the strategy as usual, but instead of evaluating a batch itself it enqueues each
candidate as a WAITING Optuna trial (``study.enqueue_trial``: the bits sit in the trial's
``fixed_params`` system attribute). Workers (``mpsearch worker --storage URL --study NAME``,
on this machine or any machine that reaches the same storage) claim WAITING trials one at a
time, evaluate them, and complete them with exactly the record ``TrialStore`` writes: params
= bits per decision, values = [size_bytes, metric], user attributes avg_bits, wall_s,
strategy, seed, cached, order. The driver polls until every candidate of the batch is
COMPLETE and hands the evaluations to the loop in the order the strategy asked them.

Nothing here is a queue of our own; the storage is the queue:

* claiming is one conditional ``UPDATE trials SET state=RUNNING WHERE trial_id=? AND
  state=WAITING``; only the worker whose update changes a row owns the trial. (Optuna's
  ``set_trial_state_values(RUNNING)`` is atomic on PostgreSQL/MySQL through ``SELECT ... FOR
  UPDATE`` but not on SQLite, where the read and the write are separate statements.) The
  same transaction records the trial's first heartbeat.
* a worker records a heartbeat every ``heartbeat_s`` seconds from a thread while it
  evaluates; the driver calls ``optuna.storages.fail_stale_trials`` periodically, so the
  trial of a worker that died (SIGKILL, lost machine) is failed and re-queued as a new
  WAITING trial by ``RetryHeartbeatStaleTrialCallback`` (same fixed params and user attributes).
* completing is one transaction that first locks the trial with a conditional update
  (still RUNNING), then writes params, user attributes, values and the COMPLETE state, so a
  trial the driver failed as stale is never completed as well: a candidate has at most one
  COMPLETE trial.
* study user attributes carry what a worker needs: ``worker_task`` (the ``--model`` spec,
  the search-space file, heartbeat settings) and ``done`` (set when the driver closes;
  workers exit once it is set and nothing is WAITING). Workers never create trials of
  their own (no ``study.ask()``), so an empty queue costs nothing.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import optuna
from optuna.trial import TrialState

from .core.records import Evaluation
from .core.space import Candidate, as_choice
from .errors import MPSearchError, StorageError
from .optuna_rdb import TrialLost, complete, frozen_trial_id, swap_state
from .storage import _engine_kwargs, _redact, open_storage, quiet_optuna, record_of, trial_attrs

STUDY_TASK = "worker_task"  # study user attribute: what a worker loads (model spec, space file, heartbeats)
STUDY_DONE = "done"  # study user attribute: set when the driver closes
STUDY_WORKER_ERROR = "worker_error"  # study user attribute: the last worker that could not start, and why
TRIAL_ERROR = "mpsearch_error"  # trial system attribute: why a worker could not evaluate it at all
PARENT_ENV = "MPSEARCH_WORKER_PARENT"  # local workers exit when this process goes away
HEARTBEAT_ENV = "MPSEARCH_HEARTBEAT_S"
GRACE_ENV = "MPSEARCH_GRACE_S"
DEFAULT_HEARTBEAT_S = 5
DEFAULT_MAX_RETRY = 3
_LIVE = (TrialState.WAITING, TrialState.RUNNING)


# ---- storage ----------------------------------------------------------------------------------
def heartbeat_storage(url: str, heartbeat_s: int, grace_s: int | None = None, max_retry: int | None = DEFAULT_MAX_RETRY):
    """An RDB storage with heartbeats on, whose stale RUNNING trials are re-queued (up to ``max_retry`` times).

    ``storage.open_storage`` opens storages with heartbeats off; the driver needs them on to
    fail and re-queue the trials of dead workers.
    """
    quiet_optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=int(heartbeat_s), grace_period=int(grace_s) if grace_s else None,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
                engine_kwargs=_engine_kwargs(url))
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StorageError(f"cannot open storage {_redact(url)}: {msg}") from None


def _fail_with_error(storage, trial_id: int, message: str) -> None:
    try:
        storage.set_trial_system_attr(trial_id, TRIAL_ERROR, message[:2000])
    except optuna.exceptions.UpdateFinishedTrialError:
        return
    swap_state(storage, trial_id, TrialState.RUNNING, TrialState.FAIL)


def _fail_stale(study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _fixed_candidate(trial, names: Sequence[str]) -> Candidate | None:
    fp = trial.system_attrs.get("fixed_params")
    if not isinstance(fp, dict):
        return None
    try:
        return tuple(as_choice(fp[n]) for n in names)
    except (KeyError, TypeError, ValueError):
        return None


# ---- the driver's side ---------------------------------------------------------------------------
class QueueExecutor:
    """Executor (see ``search.LocalExecutor``) that evaluates through workers sharing the study's storage.

    ``model`` is the task spec the workers load (built-in name, ``module:function`` or
    ``file.py:function``); ``search_space`` the space file (None: the task's own).
    ``n_local`` worker processes are started on this machine once the study exists; more may
    join from anywhere with ``mpsearch worker --storage URL --study NAME``.
    """

    def __init__(self, storage_url: str, model: str, search_space: str | None = None, n_local: int = 0,
                 heartbeat_s: int | None = None, grace_s: int | None = None, max_retry: int | None = DEFAULT_MAX_RETRY,
                 poll_s: float = 0.01, max_poll_s: float = 0.2, worker_env: dict | None = None,
                 strategy: str = "?", seed: int = 0, log: Callable[[str], None] | None = None):
        if not isinstance(storage_url, str) or "://" not in storage_url:
            raise StorageError("workers need a database URL to share (sqlite:///PATH or postgresql://...)")
        if storage_url.startswith("sqlite") and (":memory:" in storage_url or storage_url.rstrip("/") == "sqlite:"):
            raise StorageError("workers cannot share an in-memory SQLite database; use a file or a server")
        if n_local < 0:
            raise MPSearchError(f"--workers must be zero or positive, got {n_local}")
        self.url = storage_url
        self.model = model
        self.search_space = search_space
        self.n_local = int(n_local)
        self.heartbeat_s = int(heartbeat_s or os.environ.get(HEARTBEAT_ENV) or DEFAULT_HEARTBEAT_S)
        grace = grace_s or os.environ.get(GRACE_ENV)
        self.grace_s = int(grace) if grace else 4 * self.heartbeat_s
        if self.grace_s <= self.heartbeat_s:
            raise MPSearchError(f"grace period ({self.grace_s} s) must exceed the heartbeat interval ({self.heartbeat_s} s)")
        self.max_retry = max_retry
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.worker_env = dict(worker_env or {})
        self._attrs = {"strategy": strategy, "seed": int(seed)}  # user attributes of every enqueued trial
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.processes: list[subprocess.Popen] = []
        self.study = None
        self.names: list[str] = []
        self._ours: set[Candidate] = set()  # enqueued by us and not yet complete
        self.n_enqueued = 0
        self.wait_s = 0.0  # time spent inside run() waiting for results

    # protocol ------------------------------------------------------------------------------------
    def attach(self, store) -> None:
        self.storage = heartbeat_storage(self.url, self.heartbeat_s, self.grace_s, self.max_retry)
        self.study = optuna.load_study(study_name=store.study_name, storage=self.storage)
        self.study_name = store.study_name
        self.names = [d.name for d in store.space.decisions]
        self.study.set_user_attr(STUDY_TASK, {"model": self.model, "search_space": self.search_space,
                                             "heartbeat_s": self.heartbeat_s, "grace_s": self.grace_s})
        self.study.set_user_attr(STUDY_DONE, False)
        self.study.set_user_attr(STUDY_WORKER_ERROR, None)
        self._worker_error = None
        self._start_local()

    def run(self, candidates: Sequence[Candidate], on_result: Callable[[Evaluation, bool], None],
            should_stop: Callable[[], bool]) -> None:
        if not candidates:
            return
        t_start = time.perf_counter()
        todo = [tuple(as_choice(b) for b in c) for c in candidates]
        want = set(todo)
        # Adopt a live trial of the same candidate (left by an earlier driver) instead of queueing it twice.
        trials = self.study.get_trials(deepcopy=False)
        live = {}
        for t in trials:
            if t.state in _LIVE:
                c = _fixed_candidate(t, self.names)
                if c in want:
                    live[c] = t
        floor = min([t.number for t in live.values()], default=len(trials))
        base_order = self._order_base()
        for i, c in enumerate(todo):
            if c in live:
                continue
            self.study.enqueue_trial(dict(zip(self.names, c)), user_attrs={**self._attrs, "order": base_order + i})
            self.n_enqueued += 1
        self._ours |= want
        done: dict[Candidate, Evaluation] = {}
        delivered = 0
        delay = self.poll_s
        last_check = time.monotonic()
        try:
            while delivered < len(todo):
                new = self._collect(want, done, floor)
                while delivered < len(todo) and todo[delivered] in done:
                    on_result(done[todo[delivered]], True)
                    self._ours.discard(todo[delivered])
                    delivered += 1
                if delivered >= len(todo):
                    break
                if should_stop():
                    self._cancel(set(todo[delivered:]) - set(done))
                    for c in todo[delivered:]:  # what finished anyway still counts, in asked order
                        if c in done:
                            on_result(done[c], True)
                            self._ours.discard(c)
                    return
                now = time.monotonic()
                if now - last_check >= self.heartbeat_s:
                    last_check = now
                    _fail_stale(self.study)
                    self._check_workers()
                delay = self.poll_s if new else min(delay * 1.5, self.max_poll_s)
                time.sleep(delay)
        finally:
            self.wait_s += time.perf_counter() - t_start

    def close(self) -> None:
        """Cancel what is still queued, tell workers the search is done, and wait for local ones."""
        if self.study is not None:
            try:
                if self._ours:
                    self._cancel(self._ours)
                self.study.set_user_attr(STUDY_DONE, True)
            except Exception as exc:  # closing must not hide the error that brought us here
                self.log(f"mpsearch: could not mark study done: {type(exc).__name__}: {exc}")
        deadline = time.monotonic() + max(10.0, 2.0 * self.max_poll_s + 5.0)
        for p in self.processes:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # helpers -------------------------------------------------------------------------------------
    def set_provenance(self, strategy: str, seed: int) -> None:
        """User attributes every enqueued trial carries (the loop's strategy and seed)."""
        self._attrs = {"strategy": strategy, "seed": int(seed)}

    def _order_base(self) -> int:
        return sum(1 for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def _collect(self, want: set, done: dict, floor: int) -> bool:
        """Read trials from ``floor`` on; fill ``done`` with completed candidates. True when something new completed."""
        best: dict[Candidate, object] = {}
        rank = {TrialState.COMPLETE: 3, TrialState.RUNNING: 2, TrialState.WAITING: 1, TrialState.FAIL: 0}
        for t in self.study.get_trials(deepcopy=False)[floor:]:
            c = _fixed_candidate(t, self.names)
            if c is None or c not in want or c in done:
                continue
            r = rank.get(t.state, -1)
            prev = best.get(c)
            if prev is None or r > rank.get(prev.state, -1) or (r == rank.get(prev.state, -1) and t.number > prev.number):
                best[c] = t
        new = False
        for c, t in best.items():
            if t.state == TrialState.COMPLETE:
                done[c] = record_of(t, c)
                new = True
            elif t.state == TrialState.FAIL and "error" in t.user_attrs:  # the evaluation failed: a record too
                done[c] = record_of(t, c)
                new = True
            elif t.state == TrialState.FAIL:
                err = t.system_attrs.get(TRIAL_ERROR)
                if err:
                    raise MPSearchError(f"a worker could not evaluate {list(c)}: {err}")
                n = len(t.system_attrs.get("retry_history", [])) + 1
                raise MPSearchError(f"candidate {list(c)} failed {n} time(s): its workers stopped sending heartbeats "
                                    f"(died or lost the storage) and the retries ran out")
        missing = want - set(best) - set(done)
        if missing:
            raise MPSearchError(f"{len(missing)} queued candidate(s) vanished from study {self.study_name!r}")
        return new

    def _cancel(self, cands: set) -> None:
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if _fixed_candidate(t, self.names) in cands:
                swap_state(self.storage, frozen_trial_id(t), TrialState.WAITING, TrialState.FAIL)

    def _start_local(self) -> None:
        if not self.n_local or self.processes:
            return
        env = dict(os.environ)
        env.update(self.worker_env)
        env[PARENT_ENV] = str(os.getpid())
        # Split the cores among the workers unless the user said otherwise.
        threads = max(1, (os.cpu_count() or 1) // self.n_local)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.setdefault("MKL_NUM_THREADS", str(threads))
        cmd = [sys.executable, "-m", "mpsearch.cli", "worker", "--storage", self.url, "--study", self.study_name]
        for _ in range(self.n_local):
            self.processes.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))

    def _check_workers(self) -> None:
        err = self.study.user_attrs.get(STUDY_WORKER_ERROR)
        if err and err != self._worker_error:
            self._worker_error = err
            self.log(f"mpsearch: worker {err.get('worker')} could not start: {err.get('error')}")
        self._check_local()

    def _check_local(self) -> None:
        if self.processes and all(p.poll() is not None for p in self.processes):
            codes = sorted({p.returncode for p in self.processes})
            raise MPSearchError(f"all {len(self.processes)} local workers exited (exit codes {codes}); "
                                "see their messages above")


def _abs_model_spec(model: str) -> str:
    """``path/to/task.py:fn`` with an absolute path, so workers started elsewhere find the file."""
    target, sep, fn = model.rpartition(":")
    if sep and (target.endswith(".py") or "/" in target) and Path(target).is_file():
        return f"{Path(target).resolve()}:{fn}"
    return model


def local_pool(model: str, search_space: str | None, url: str, n_workers: int, strategy: str,
               seed: int) -> QueueExecutor:
    """``mpsearch search --workers N``: N worker processes on this machine, sharing ``url``."""
    from .model.space_files import resolve_space_file

    if n_workers < 0:
        raise MPSearchError(f"--workers must be zero or positive, got {n_workers}")
    space_file = str(resolve_space_file(search_space).resolve()) if search_space else None
    return QueueExecutor(url, _abs_model_spec(model), space_file, n_local=n_workers, strategy=strategy, seed=seed)


# ---- the worker's side ---------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _heartbeat_loop(storage, trial_id: int, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        try:
            storage.record_heartbeat(trial_id)
        except Exception as exc:  # a missed beat is not fatal; a stale trial is re-queued by the driver
            print(f"mpsearch worker: heartbeat failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def _parent_gone() -> bool:
    parent = os.environ.get(PARENT_ENV)
    return bool(parent) and str(os.getppid()) != parent


def run_worker(storage_url: str, study_name: str, *, wait_s: float = 300.0, poll_s: float = 0.01,
               max_poll_s: float = 0.2, max_trials: int | None = None, verbose: bool = True) -> int:
    """Evaluate queued trials of ``study_name`` until the driver says done and nothing waits. Returns an exit code."""
    from .evaluator import Evaluator
    from .model.space_files import space_for
    from .tasks import load_task

    def say(msg: str) -> None:
        if verbose:
            print(f"mpsearch worker {socket.gethostname()}:{os.getpid()}: {msg}", file=sys.stderr, flush=True)

    storage = open_storage(storage_url)
    study = _wait_for_study(storage, study_name, wait_s)
    if study is None:
        raise MPSearchError(f"study {study_name!r} with a worker task did not appear in {_redact(storage_url)} "
                            f"within {wait_s:.0f} s; start the search (the driver) first")
    attrs = study.user_attrs
    wt = attrs[STUDY_TASK]
    me = f"{socket.gethostname()}:{os.getpid()}"
    try:
        task = load_task(wt["model"])
        space = space_for(task, wt.get("search_space"))
        if attrs.get("space") != space.signature():
            raise MPSearchError(f"study {study_name!r} was made for another search space or model than "
                                f"{wt['model']!r} gives here (check the model and the search-space file)")
        evaluator = Evaluator(task, space)
    except Exception as exc:  # tell the driver too: it may be waiting for workers that will never come
        try:
            study.set_user_attr(STUDY_WORKER_ERROR, {"worker": me, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        except Exception:
            pass
        raise
    names = [d.name for d in space.decisions]
    dists = {d.name: optuna.distributions.CategoricalDistribution(list(d.choices)) for d in space.decisions}
    interval = float(wt.get("heartbeat_s") or DEFAULT_HEARTBEAT_S)

    def stop_on_signal(signum, frame):
        raise _Stop()

    old = signal.signal(signal.SIGTERM, stop_on_signal)
    n_done = 0
    delay = poll_s
    current: int | None = None
    try:
        while max_trials is None or n_done < max_trials:
            if _parent_gone():
                say("driver process is gone; exiting")
                break
            waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            claimed = None
            for t in waiting:
                if swap_state(storage, frozen_trial_id(t), TrialState.WAITING, TrialState.RUNNING, claimant=me):
                    claimed = t
                    break
            if claimed is None:
                if not waiting and study.user_attrs.get(STUDY_DONE):
                    break
                time.sleep(delay)
                delay = min(delay * 1.5, max_poll_s)
                continue
            delay = poll_s
            current = frozen_trial_id(claimed)
            cand = _fixed_candidate(claimed, names)
            stop = threading.Event()
            beat = threading.Thread(target=_heartbeat_loop, args=(storage, current, interval, stop), daemon=True)
            beat.start()
            try:
                if cand is None:
                    raise MPSearchError(f"trial {claimed.number} has no bits for decisions {names}")
                ev = evaluator.evaluate(cand)
            except (_Stop, KeyboardInterrupt):
                raise
            except Exception as exc:
                stop.set()
                _fail_with_error(storage, current, f"{type(exc).__name__}: {exc}")
                say(f"trial {claimed.number} failed: {type(exc).__name__}: {exc}")
                current = None
                continue
            finally:
                stop.set()
                beat.join()
            given = claimed.user_attrs  # order, strategy and seed, from the driver
            ua = trial_attrs(replace(ev, number=given.get("order", -1), strategy=given.get("strategy", "?"),
                                     seed=int(given.get("seed", 0))), worker=me)
            if not ev.ok:
                say(f"trial {claimed.number}: the evaluation failed: {ev.error}")
            try:
                complete(storage, current, dict(zip(names, ev.candidate)), dists, ua,
                         [float(ev.size_bytes), float(ev.metric)] if ev.ok else None)
                n_done += 1
            except TrialLost:
                say(f"trial {claimed.number} was failed as stale before it completed; its retry counts instead")
            current = None
    except (_Stop, KeyboardInterrupt):
        if current is not None:  # give the trial back at once rather than after the grace period
            swap_state(storage, current, TrialState.RUNNING, TrialState.WAITING)
        say("stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    say(f"{n_done} evaluations done")
    return 0


def _wait_for_study(storage, study_name: str, wait_s: float):
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
            if STUDY_TASK in study.user_attrs:
                return study
        except KeyError:
            pass
        if time.monotonic() >= deadline or _parent_gone():
            return None
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
