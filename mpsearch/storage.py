"""Evaluation records persisted in an Optuna study: one COMPLETE trial per evaluation.

Optuna's storages already do what we need (in memory, SQLite, PostgreSQL/MySQL, and
coordination between processes), so a record is an Optuna trial whose params are the
bits per decision, whose values are (size_bytes, metric), and whose user attributes
hold the rest. A search that restarts against the same study reads them back and
never pays for them again.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterable

import optuna
from optuna.trial import TrialState

from .errors import StorageError
from .core.records import Evaluation
from .core.space import SearchSpace, as_choice

DIRECTIONS = ["minimize", "maximize"]  # size_bytes, metric


def quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)


def open_storage(url: str | None):
    """None -> in memory; a URL -> Optuna RDB storage (sqlite:///..., postgresql://...)."""
    quiet_optuna()
    if url is None or isinstance(url, optuna.storages.BaseStorage):
        return url or optuna.storages.InMemoryStorage()
    if not isinstance(url, str) or "://" not in url:
        raise StorageError(f"storage {url!r} is not a URL (e.g. sqlite:///runs/demo/trials.db or postgresql://user@host/db)")
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=None, engine_kwargs=_engine_kwargs(url))
    except Exception as exc:  # driver missing, host unreachable, bad URL: one line for the user
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot open storage {_redact(url)}: {msg}") from None


def _reason(exc: BaseException) -> str:
    """The root cause's first line (the database's own words, e.g. "attempt to write a readonly database")."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "readonly" in text.replace("-", "").replace(" ", "").lower():
        return f"it is read-only ({text})"
    return text


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


class TrialStore:
    def __init__(self, space: SearchSpace, storage=None, study_name: str = "mpsearch", fresh: bool = False):
        self.space = space
        self.storage = open_storage(storage)
        self.study_name = study_name
        self.where = _redact(storage) if isinstance(storage, str) else "the storage"
        try:
            if fresh:
                try:
                    optuna.delete_study(study_name=study_name, storage=self.storage)
                except KeyError:
                    pass
            self.study = optuna.create_study(storage=self.storage, study_name=study_name, directions=DIRECTIONS,
                                             load_if_exists=True)
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"cannot open study {study_name!r} in {self.where}: {_reason(exc)}") from None
        with self.writing():
            self._check_space()
        self.distributions = {
            d.name: optuna.distributions.CategoricalDistribution(list(d.choices)) for d in space.decisions
        }

    def _check_space(self) -> None:
        attrs = self.study.user_attrs
        sig = self.space.signature()
        if "space" not in attrs:
            self.study.set_user_attr("space", sig)
        elif attrs["space"] != sig:
            raise StorageError(
                f"study {self.study_name!r} holds trials of another search space or model; "
                "use another --out/--study or --fresh to start over"
            )

    def load(self) -> list[Evaluation]:
        """Every evaluation stored in the study: completed ones, and failed ones that carry their error."""
        out = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            if t.state == TrialState.FAIL and "error" not in t.user_attrs:
                continue  # failed by the machinery (a dead worker, a cancelled trial), not by its evaluation
            try:
                cand = tuple(as_choice(t.params[d.name]) for d in self.space.decisions)
            except KeyError:
                continue
            out.append(record_of(t, cand))
        return sorted(out, key=lambda r: r.number)

    @contextlib.contextmanager
    def writing(self):
        """Storage failures as one line that says what went wrong (optuna's own message only guesses)."""
        try:
            yield
        except optuna.exceptions.StorageInternalError as exc:
            raise StorageError(f"cannot write to {self.where}: {_reason(exc)}") from None

    def add(self, trials: Iterable[Evaluation]) -> None:
        frozen = []
        for r in trials:
            frozen.append(optuna.trial.create_trial(
                params={d.name: as_choice(b) for d, b in zip(self.space.decisions, r.candidate)},
                distributions=self.distributions,
                values=[float(r.size_bytes), float(r.metric)] if r.ok else None,
                state=TrialState.COMPLETE if r.ok else TrialState.FAIL,
                user_attrs=trial_attrs(r),
            ))
        with self.writing():
            self.study.add_trials(frozen)


def trial_attrs(r: Evaluation, **extra) -> dict:
    """The user attributes that, with the params and values, make a stored trial one ``Evaluation``."""
    out = {"order": r.number, "avg_bits": r.avg_bits, "wall_s": r.wall_s, "strategy": r.strategy, "seed": r.seed,
           "cached": r.cached, **extra}
    if not r.ok:
        out.update({"error": r.error, "size_bytes": r.size_bytes})
    return out


def record_of(t, candidate) -> Evaluation:
    """The evaluation a COMPLETE or failed optuna trial holds (written by ``TrialStore.add`` or a worker)."""
    ua = t.user_attrs
    failed = t.state == TrialState.FAIL
    size = int(ua["size_bytes"]) if failed else int(t.values[0])
    metric = math.nan if failed else float(t.values[1])
    return Evaluation(candidate, size, float(ua["avg_bits"]), metric, float(ua.get("wall_s", 0.0)),
                      cached=bool(ua.get("cached", False)), number=ua.get("order", t.number),
                      strategy=ua.get("strategy", "?"), seed=int(ua.get("seed", 0)), resumed=True,
                      error=ua.get("error") if failed else None)
