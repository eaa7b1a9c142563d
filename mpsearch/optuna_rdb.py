"""The Optuna internals that workers need, in one place.

Optuna's public storage API has no conditional state change ("WAITING to RUNNING only if
still WAITING"), no multi-statement transaction, and no public trial id on a ``FrozenTrial``.
Workers need all three on a relational storage, so this adapter reaches under the public
API, and nothing else in mpsearch does:

* ``RDBStorage`` sits under optuna's ``_CachedStorage`` wrapper (``storage._backend``);
* ``optuna.storages._rdb.models`` (the tables) and ``storage._create_scoped_session``;
* ``RDBStorage._set_trial_{attr,param,value}_without_commit`` write inside one transaction;
* ``FrozenTrial._trial_id``.

These exist in Optuna 5.0, the range pyproject pins (``optuna>=5.0,<5.1``) and the tests
cover (tests/test_workers.py, on SQLite and PostgreSQL). Journal and in-memory storages take
optuna's own public calls instead.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Sequence

import optuna
from optuna.trial import TrialState

WORKER_ATTR = "mpsearch_worker"  # trial system attribute: host:pid of the worker that claimed the trial


def frozen_trial_id(trial) -> int:
    """The storage's id of a ``FrozenTrial`` (optuna keeps it private)."""
    return trial._trial_id


def rdb_backend(storage):
    """The RDBStorage under optuna's cache wrapper, or None for other storages."""
    inner = getattr(storage, "_backend", storage)
    return inner if isinstance(inner, optuna.storages.RDBStorage) else None


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # optuna stores naive UTC


def swap_state(storage, trial_id: int, old: TrialState, new: TrialState, claimant: str | None = None) -> bool:
    """Atomically move a trial from ``old`` to ``new``; False when it was not in ``old`` any more.

    With ``claimant`` (a claim) the same transaction records the trial's heartbeat, so a
    claimed trial is never RUNNING without one (optuna ignores RUNNING trials that have no
    heartbeat), and the system attribute ``mpsearch_worker`` (who evaluates it).
    """
    backend = rdb_backend(storage)
    if backend is None:  # journal or in-memory storage: optuna's own update (atomic under their locks)
        if new == TrialState.RUNNING and old == TrialState.WAITING:
            return storage.set_trial_state_values(trial_id, TrialState.RUNNING)
        try:
            if storage.get_trial(trial_id).state != old:
                return False
            return storage.set_trial_state_values(trial_id, new)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    table = models.TrialModel.__table__
    values = {"state": new}
    if new == TrialState.RUNNING and old == TrialState.WAITING:
        values["datetime_start"] = _utcnow()
    elif new.is_finished():
        values["datetime_complete"] = _utcnow()
    with _create_scoped_session(backend.scoped_session) as session:
        res = session.execute(sqlalchemy.update(table).where(table.c.trial_id == trial_id, table.c.state == old)
                              .values(**values))
        if res.rowcount != 1:
            return False
        if claimant is not None:
            backend._set_trial_attr_without_commit(session, models.TrialSystemAttributeModel, trial_id, WORKER_ATTR,
                                                   claimant)
            hb = models.TrialHeartbeatModel.where_trial_id(trial_id, session, for_update=True)
            if hb is None:
                session.add(models.TrialHeartbeatModel(trial_id=trial_id))
            else:
                hb.heartbeat = session.execute(sqlalchemy.func.now()).scalar()
    return True


class TrialLost(Exception):
    """The trial is not ours any more (the driver failed it as stale, or cancelled it)."""


def complete(storage, trial_id: int, params: dict[str, int], distributions: dict, user_attrs: dict,
             values: Sequence[float] | None) -> None:
    """Params, user attributes, values and COMPLETE in one transaction, only if the trial is still RUNNING.

    ``values=None`` records an evaluation that failed: the same, with the FAIL state and no values."""
    state = TrialState.COMPLETE if values is not None else TrialState.FAIL
    backend = rdb_backend(storage)
    if backend is None:
        try:
            for name, bits in params.items():
                dist = distributions[name]
                storage.set_trial_param(trial_id, name, dist.to_internal_repr(bits), dist)
            for k, v in user_attrs.items():
                storage.set_trial_user_attr(trial_id, k, v)
            if not storage.set_trial_state_values(trial_id, state, values=None if values is None else list(values)):
                raise TrialLost(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise TrialLost(trial_id) from None
        return
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    table = models.TrialModel.__table__
    with _create_scoped_session(backend.scoped_session) as session:
        # A no-op update that takes the row's write lock (the database's, on SQLite) while the
        # trial is still RUNNING: the driver cannot fail it between this check and the commit.
        res = session.execute(sqlalchemy.update(table).where(table.c.trial_id == trial_id,
                                                             table.c.state == TrialState.RUNNING)
                              .values(state=TrialState.RUNNING))
        if res.rowcount != 1:
            raise TrialLost(trial_id)
        for name, bits in params.items():
            dist = distributions[name]
            backend._set_trial_param_without_commit(session, trial_id, name, dist.to_internal_repr(bits), dist, dist)
        for k, v in user_attrs.items():
            backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, k, v)
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
        for i, v in enumerate(values or ()):
            backend._set_trial_value_without_commit(session, trial, i, float(v))
        session.execute(sqlalchemy.update(table).where(table.c.trial_id == trial_id)
                        .values(state=state, datetime_complete=_utcnow()))


