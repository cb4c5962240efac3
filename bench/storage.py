"""The database that coordinates workers on several machines: Optuna's RDB storage (PostgreSQL,
or SQLite on one machine).

Optuna already solves what a shared grid needs: a trial is claimed by one process through the
database (a row update that only one ``WAITING -> RUNNING`` transition wins), a live worker
records a heartbeat every ``heartbeat`` seconds, a trial whose heartbeat is older than ``grace``
seconds is failed by whoever looks next, and a retry callback queues it again with the same
attributes, at most ``retries`` times.  This module only opens that storage from a URL and turns
every way of getting the URL wrong into one :class:`ConfigError` that names it.
"""

from __future__ import annotations

import fcntl
import random
import re
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna

from bench.config import ConfigError

BACKENDS = ("postgresql", "sqlite")
CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class StorageOptions:
    """``--storage URL --heartbeat S --grace-period S --retries N`` (picklable: workers reopen it)."""

    url: str
    heartbeat: int = 10  # seconds between a running trial's heartbeats
    grace: int = 60  # seconds without a heartbeat after which a trial's worker counts as dead
    retries: int = 2  # times a dead worker's run is queued again (its own errors are never retried)

    def check(self) -> None:
        if self.heartbeat < 1 or self.grace <= self.heartbeat or self.retries < 0:
            raise ConfigError(
                f"--heartbeat {self.heartbeat}, --grace-period {self.grace}, --retries {self.retries}: "
                f"need heartbeat >= 1 s, a grace period longer than the heartbeat, retries >= 0"
            )


# Everything between a scheme's "://" and the last "@" of the word (user and password, an unescaped "@" in the
# password too); in text without any scheme (a URL missing its "//"), any word:secret@.
# Not after `:///` (sqlite:///results/optuna/mnist@quick.db: a path, no user), where an @ is part of a file name.
_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(?!/)\S*@")
_BARE = re.compile(r"([^\s:/@=]+:)[^\s@]*@")


def shown(text: str) -> str:
    """``text`` (a URL, a command line holding one as ``--storage URL`` or ``--storage=URL``, or a driver's message)
    with any password hidden, for messages, logs and the summary; by pattern, not by parsing, so a malformed URL
    (a bad port, an unescaped ``@``, a missing ``//``) hides it too."""
    return _PASSWORD.sub(r"\1***@", text) if "://" in text else _BARE.sub(r"\1***@", text)


def open_storage(opts: StorageOptions) -> optuna.storages.RDBStorage:
    """Connect (creating Optuna's tables when the database is new); ConfigError naming the URL when
    it is malformed, of another kind of database, unreachable or refused."""
    import sqlalchemy
    import sqlalchemy.exc

    opts.check()
    where = f"--storage {shown(opts.url)}"
    try:
        url = sqlalchemy.engine.make_url(opts.url)
    except (sqlalchemy.exc.ArgumentError, ValueError):  # not a URL; a port that is no number
        raise ConfigError(
            f"{where}: not a database URL; expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE or sqlite:///PATH"
        ) from None
    backend = url.get_backend_name()
    if url.host and "@" in url.host:  # the driver would name the host, and with it the password's tail
        raise ConfigError(f"{where}: an unescaped '@' in the user or password; percent-encode it as %40")
    if backend not in BACKENDS:
        raise ConfigError(f"{where}: unsupported database {backend!r}; use one of {', '.join(BACKENDS)}")
    engine_kwargs: dict = {}
    if backend == "postgresql":
        if not url.database:
            raise ConfigError(f"{where}: no database name; expected postgresql://USER@HOST[:PORT]/DATABASE")
        # A firewalled host would otherwise hang for the kernel's TCP timeout (minutes) before saying anything.
        engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    elif not url.database or not Path(url.database).expanduser().resolve().parent.is_dir():
        raise ConfigError(f"{where}: expected sqlite:///PATH with PATH in an existing folder")
    for attempt in range(4):
        try:
            return _rdb(opts, engine_kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers started together on a new database (a job array) race to create Optuna's tables; PostgreSQL
            # lets one win and fails the others' CREATE TABLE.  A moment later the tables are there: try again.
            if attempt == 3:
                raise ConfigError(f"{where}: could not create Optuna's tables (other workers kept racing)") from None
            time.sleep(0.5 + random.random())
        except ModuleNotFoundError as e:
            raise ConfigError(
                f"{where}: the database driver is not installed ({e}); pip install 'psycopg[binary]' "
                f"(or psycopg2-binary, with a postgresql+psycopg2:// URL)"
            ) from None
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, RuntimeError) as e:
            # The driver's errors (unreachable, refused, no such database) and Optuna's (a schema of another Optuna
            # version is a RuntimeError): the server's own words are the useful part.  Anything else is a bug.
            if isinstance(e, RuntimeError) and "table schema" not in str(e):
                raise
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()
            if attempt < 3 and reason and "already exists" in reason[0]:  # SQLite's side of the same race
                time.sleep(0.5 + random.random())
                continue
            raise ConfigError(
                f"{where}: cannot use this database: {shown(reason[0]) if reason else type(e).__name__}"
            ) from None
    raise AssertionError("unreachable")


def _rdb(opts: StorageOptions, engine_kwargs: dict) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():  # the heartbeat API is marked experimental; it is what Optuna runs at scale
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            opts.url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=opts.heartbeat,
            grace_period=opts.grace,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=opts.retries),
        )


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the study's trials whose worker stopped beating; the retry callback queues them again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def trial_id(storage: optuna.storages.BaseStorage, study: optuna.Study, trial: optuna.trial.BaseTrial) -> int:
    """The storage's id of ``trial`` of ``study``, which the storage's per-trial methods take: looked up through the
    storage's interface (the trial's own ``_trial_id`` is private)."""
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)


@contextmanager
def one_asker(url: str) -> Iterator[None]:
    """Around ``study.ask()``: with an SQLite study, one process of the machine at a time (a kernel lock on
    ``<file>.ask-lock``).  Optuna hands a queued (WAITING) trial to the process whose update sets it RUNNING, after
    reading that it waits; on SQLite the read and the update are not one transaction (pysqlite begins one at the
    update), so two workers asking at once could both get the same queued trial, train it in one folder and both
    tell it (seen as a FileNotFoundError or an UpdateFinishedTrialError in tests/test_many_machines.py).
    PostgreSQL locks the row (SELECT ... FOR UPDATE): nothing to do there."""
    import sqlalchemy.engine

    database = sqlalchemy.engine.make_url(url).database if url.startswith("sqlite") else None
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.ask-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released by the kernel when the file closes, or the process dies
        yield


@contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trial_id: int) -> Iterator[None]:
    """Beat for ``trial_id`` while the block runs: Optuna's own heartbeat thread, the one
    ``study.optimize`` uses (a no-op on a storage without heartbeats).

    Optuna has no public way to beat for a trial that ``study.optimize`` does not run (its docs: the heartbeat "will
    not work" with ask and tell), so this is bench's one use of a private Optuna name;
    tests/test_many_machines.py checks that it still beats."""
    try:
        from optuna.storages._heartbeat import get_heartbeat_thread
    except ImportError as e:
        raise RuntimeError(
            f"optuna {optuna.__version__} no longer has optuna.storages._heartbeat.get_heartbeat_thread, "
            f"which bench.storage.heartbeat uses (tested with Optuna 4.9 to 5.0): {e}"
        ) from e
    with get_heartbeat_thread(trial_id, storage):
        yield


def where_it_ran(url: str) -> str:
    """Where a study ran, for a file in git: the kind of database, its host and name (an SQLite file's path on
    this machine) and never a user or password; a record for a reader, not a URL to continue from."""
    import sqlalchemy.exc

    try:
        u = sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):  # shown as given, password hidden: the record is still written
        return shown(url)
    if u.get_backend_name() == "sqlite":
        return f"SQLite file {u.database} on {socket.gethostname()}"
    host = (u.host or "localhost").rsplit("@", 1)[-1]  # an unescaped "@" of a password left its tail in the host
    return f"{u.get_backend_name()} database {u.database} on {host}{f':{u.port}' if u.port else ''}"
