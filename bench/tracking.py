"""MLflow tracking: every finished run of the run store as an MLflow run (``--mlflow [URI]``).

What is logged is read back from the files a run leaves in its folder (``config.json``,
``metrics.csv``, ``result.json``, ``curves.png``), once the run is finished, rather than
from inside the training loop.  That keeps the loop free of MLflow, and it is what makes
logging robust: a run resumed after Ctrl-C or SIGKILL has its whole history in
``metrics.csv`` (live per-epoch logging would have logged the epochs before the kill twice,
or lost them), a run trained before ``--mlflow`` was given, or whose logging failed (a
server down for a moment), is logged by the next command that sees it finished, and the
per-epoch numbers in MLflow are exactly those of the table.  What it costs -- an MLflow run
appears when its run ends, not epoch by epoch -- is small next to that.

Layout in MLflow: one experiment per spec (its ``name``), one parent run per group (the
published ``mnist@quick``, an ad-hoc experiment, a tuning study), and under it one run per
(variant, seed) or tuning trial, named ``variant/sSEED``.  A run is found again by its tags
``group`` and ``config_key`` (the run's key): logging is find-or-create, so reruns, several
worker processes and several machines never log a run twice.  An MLflow run is complete once
its status is FINISHED (set last); one left RUNNING by a process killed while logging it is
deleted and logged again.

``mlflow`` is an optional extra (``pip install -e '.[mlflow]'``) and is imported only when
something is logged: importing this module loads nothing of it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import files
from bench.config import ConfigError
from bench.log import count, first_line
from bench.records import GroupRecord, read_record
from bench.storage import shown as _shown  # a URI with its password hidden

INSTALL = "pip install -e '.[mlflow]'"
DB_FILE, ARTIFACTS = "mlflow.db", "mlartifacts"  # the default store, under the results folder
# Schemes of tracking stores MLflow can write to.  A plain folder (or file:) is refused: MLflow 3 keeps that
# backend in maintenance mode and raises on it, so say it up front.
SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https")

log = logging.getLogger(__name__)


def mlflow_uri(value: str | bool | None, results: str | Path, where: str = "--mlflow") -> str | None:
    """The tracking URI that ``--mlflow [URI]`` or a spec's ``tracking.mlflow`` asks for: None when off,
    ``sqlite:///<results>/mlflow.db`` (absolute) for True or no value, else the URI given.  ConfigError (one line,
    naming ``where``) when mlflow is not installed or the URI is not one MLflow can write to."""
    if value is None or value is False:
        return None
    try:
        missing = importlib.util.find_spec("mlflow") is None  # found, not imported: that waits for the first run
    except (ImportError, ValueError):  # a broken or half-removed install
        missing = True
    if missing:
        raise ConfigError(f"{where}: MLflow is not installed; install the extra with: {INSTALL}")
    if value is True or value == "":
        return f"sqlite:///{(Path(results) / DB_FILE).resolve()}"
    uri = str(value)
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    scheme = match.group(1).split("+", 1)[0].lower() if match else ""  # postgresql+psycopg -> postgresql
    if scheme not in SCHEMES:
        raise ConfigError(
            f"{where} {_shown(uri)}: not a tracking URI MLflow can write to; give sqlite:///PATH.db (a file "
            f"on this machine), http(s)://HOST:PORT (an MLflow server) or a database URL "
            f"({', '.join(s + '://' for s in SCHEMES[1:4])}); a folder or file: URI is no longer an MLflow "
            f"store"
        )
    if scheme == "sqlite" and (not uri.startswith("sqlite:///") or uri.endswith("/")):
        raise ConfigError(
            f"{where} {uri}: a SQLite tracking URI is sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    if scheme != "sqlite" and "://" not in uri:
        raise ConfigError(f"{where} {_shown(uri)}: expected {scheme}://...")
    return uri


def open_tracker(value: str | bool | None, results: str | Path, where: str = "--mlflow") -> Tracker | None:
    """The tracker ``value`` asks for (see :func:`mlflow_uri`), connected and checked; None when off."""
    uri = mlflow_uri(value, results, where)
    if uri is None:
        return None
    tracker = Tracker.for_uri(uri, results)
    tracker.check()
    return tracker


@dataclass(frozen=True)
class Tracker:
    """Logs finished runs of a results folder to the MLflow tracking store at ``uri``.

    Plain data, so it travels to ``--workers`` processes; each process opens its own client.  Called as
    ``tracker(store, run)`` it is the runner's after-run hook (``RunOptions.after_run``)."""

    uri: str
    artifact_root: str | None = None  # where new experiments keep their artifacts; None: the server decides

    @classmethod
    def for_uri(cls, uri: str, results: str | Path) -> Tracker:
        """A tracker whose new experiments keep their artifacts in ``mlartifacts/`` beside the database for a SQLite
        file (``<results>/mlartifacts`` for the default store), wherever the server says for a server, and in
        ``<results>/mlartifacts`` for a database URL (MLflow's own default would be ``./mlruns`` of the current folder)."""
        if uri.split(":", 1)[0] in ("http", "https"):
            return cls(uri)
        folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path(results)
        return cls(uri, (folder / ARTIFACTS).resolve().as_uri())

    # ------------------------------------------------------------------ connecting

    def check(self, groups: list[dict[str, Any]] = (), create: bool = True) -> None:
        """Connect now, and find or create the experiment and parent run of each group of ``groups`` (definitions as
        :func:`group_meta` gives them), so that a wrong URI or an unreachable server is one error before anything
        trains, and so that worker processes find them instead of racing to create them.  ConfigError when the store
        cannot be used.  ``create=False``: a SQLite file that does not exist yet is left for the first run to make."""
        sqlite = Path(self.uri.removeprefix("sqlite:///")) if self.uri.startswith("sqlite:///") else None
        if not create and sqlite is not None and not sqlite.exists():
            return
        self.check_own_database()
        new_file = sqlite is not None and not sqlite.exists()
        try:
            with _mlflow_env(check=True):
                client = self._client()
                client.search_experiments(max_results=1)
                for meta in groups:
                    self._parent(client, meta)
        except Exception as e:  # whatever the store's driver or the HTTP layer raises
            if new_file:  # a store that failed leaves nothing behind: a SQLite file it began is removed
                _CLIENTS.pop(self.uri, None)
                sqlite.unlink(missing_ok=True)
            raise ConfigError(f"--mlflow {_shown(self.uri)}: cannot use this tracking store: {first_line(e)}") from None

    def check_own_database(self, storage: str | None = None) -> None:
        """ConfigError, before MLflow connects (it creates its tables on connecting), when the tracking database is
        ``storage`` (the Optuna database of --storage) or already holds another application's tables: MLflow's
        migrations would add its own there, and fail half-way on a foreign ``alembic_version``."""
        if self.uri.split(":", 1)[0] in ("http", "https"):
            return
        if storage and same_database(self.uri, storage):
            raise ConfigError(
                f"--mlflow {_shown(self.uri)}: this is the database of --storage {_shown(storage)} "
                f"(Optuna's); give MLflow a database of its own (e.g. sqlite:///results/mlflow.db, or "
                f"another database on the same server)"
            )
        foreign = _foreign_tables(self.uri)
        if foreign:
            raise ConfigError(
                f"--mlflow {_shown(self.uri)}: this database holds another application's tables "
                f"({', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}), e.g. an Optuna study's; "
                f"give MLflow a database of its own"
            )

    def _client(self) -> Any:
        client = _CLIENTS.get(self.uri)
        if client is None:
            import logging

            # A new SQLite store says "Creating initial MLflow database tables..." through these loggers.
            for name in ("mlflow.store.db.utils", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
            from mlflow import MlflowClient

            client = _CLIENTS[self.uri] = MlflowClient(tracking_uri=self.uri)
        return client

    def _experiment(self, client: Any, name: str) -> str:
        """The id of experiment ``name``, created (with its artifacts under ``artifact_root``) when missing."""
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        location = f"{self.artifact_root}/{name}" if self.artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:  # created by another process in the meantime
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _parent(self, client: Any, meta: dict[str, Any]) -> tuple[str, str]:
        """(experiment id, parent run id) of a group, from its definition (``spec.json``); found by its tags, else
        created.  Two processes creating it at once both keep the oldest and delete their own."""
        cached = _PARENTS.get((self.uri, meta["group"]))
        if cached:
            return cached
        exp_id = self._experiment(client, str(meta.get("name") or meta["group"]))
        query = f"tags.kind = 'group' and tags.`group` = '{meta['group']}'"
        found = _search(client, exp_id, query)
        if found:
            parent = _oldest(found)
        else:
            tags = {
                "kind": "group",
                "group": meta["group"],
                "role": meta.get("role", "published"),
                "spec": str(meta.get("path", "")),
                "profile": meta.get("profile") or "full",
                **({"study": meta["study"]} if meta.get("study") else {}),
            }
            if meta.get("overrides"):
                tags["overrides"] = json.dumps(meta["overrides"])
            from mlflow.entities import RunStatus

            mine = client.create_run(exp_id, tags=tags, run_name=meta["group"]).info.run_id
            client.set_terminated(mine, RunStatus.to_string(RunStatus.FINISHED))
            parent = _oldest(_search(client, exp_id, query))
            if parent != mine:
                client.delete_run(mine)
        _PARENTS[(self.uri, meta["group"])] = exp_id, parent
        return exp_id, parent

    # ------------------------------------------------------------------ logging

    def __call__(self, store: Any, run: Any) -> None:
        """After-run hook: log the run just finished (a ``bench.spec.Run`` of ``store``).  A failure is a warning, not
        the run's failure: the run is finished, and the next command with ``--mlflow`` logs it."""
        self.log_dirs([store.path(run)])

    def log_dirs(self, run_dirs: list[Path], warn: bool = True) -> list[str]:
        """Log each finished run folder (``<results>/runs/<group>/<variant>/seed-<k>``) that MLflow does not hold yet;
        the MLflow run id of each (logged now or before).  Folders that hold no finished run (unfinished, failed,
        superseded) are skipped.  A failure is one warning (``warn``), else raised."""
        ids = []
        try:
            with _mlflow_env():
                client = self._client()
                by_group: dict[Path, list[Path]] = {}
                for d in run_dirs:
                    by_group.setdefault(Path(d).parent.parent, []).append(Path(d))
                for group_dir, dirs in by_group.items():
                    group = group_dir.name
                    record = GroupRecord.from_dict(files.read_json(group_dir / "spec.json"))
                    meta = record.to_dict() | {"group": group}
                    exp_id, parent = self._parent(client, meta)
                    logged = self._logged(client, exp_id, group)
                    expected = None if record.role == "study" else record.expected_keys()
                    for d in dirs:
                        run_id = _log_run(client, exp_id, parent, meta, expected, d, logged)
                        if run_id:
                            ids.append(run_id)
        except Exception as e:
            if not warn:
                raise
            log.warning(
                f"MLflow ({_shown(self.uri)}): could not log {count(len(run_dirs), 'run')} "
                f"({type(e).__name__}: {first_line(e)}); the next command with --mlflow logs them"
            )
        return ids

    def log_group(self, results: str | Path, group: str) -> int:
        """Log every finished run folder of ``group`` (finished or pruned trials of a study too) MLflow lacks;
        how many MLflow runs the group has."""
        root = Path(results) / "runs" / group
        dirs = sorted(d for d in root.glob("*/seed-*") if d.is_dir() and "." not in d.name)
        return len(self.log_dirs(dirs))

    def _logged(self, client: Any, exp_id: str, group: str) -> dict[str, list[Any]]:
        """The group's MLflow runs (active ones) by config key."""
        out: dict[str, list[Any]] = {}
        for r in _search(client, exp_id, f"tags.kind = 'run' and tags.`group` = '{group}'"):
            out.setdefault(r.data.tags.get("config_key"), []).append(r)
        return out

    def log_artifacts(self, run_dir: Path, paths: list[Path], artifact_path: str) -> str:
        """Attach ``paths`` (e.g. an exported ONNX file) to the MLflow run of ``run_dir``, logging the run first if MLflow
        lacks it; returns its run id.  Raises when the run cannot be logged."""
        with _mlflow_env():
            ids = self.log_dirs([run_dir], warn=False)
            if not ids:
                raise ConfigError(f"{run_dir}: not a finished run; nothing to attach {artifact_path} files to")
            client = self._client()
            for p in paths:
                client.log_artifact(ids[0], str(p), artifact_path)
        return ids[0]


def group_meta(spec: Any, role: str | None = None) -> dict[str, Any]:
    """What the parent run of ``spec``'s group is made from: the fields of its ``spec.json`` that tracking reads."""
    return {
        "name": spec.name,
        "group": spec.group,
        "role": role or ("adhoc" if spec.adhoc else "published"),
        "path": spec.path,
        "profile": spec.profile,
        "overrides": spec.overrides,
    }


_CLIENTS: dict[str, Any] = {}  # one client per tracking URI and process
_PARENTS: dict[tuple[str, str], tuple[str, str]] = {}  # (uri, group) -> (experiment id, parent run id)


def _log_run(
    client: Any,
    exp_id: str,
    parent: str,
    meta: dict[str, Any],
    expected: dict[tuple[str, int], str] | None,
    d: Path,
    logged: dict[str, list[Any]],
) -> str | None:
    """Log run folder ``d`` under ``parent`` unless ``logged`` (config key -> the group's MLflow runs) holds it; its
    run id, or None when ``d`` holds no finished run (or pruned trial) whose result and config agree, or whose key is
    not the one ``expected`` (the group's :meth:`~bench.records.GroupRecord.expected_keys`; None: any) names."""
    from mlflow.entities import Metric, Param, RunStatus

    try:
        result, config = read_record(d), files.read_json(d / "config.json")
    except (OSError, ValueError):
        return None
    key = result.key
    if result.status not in ("finished", "pruned") or key != config.get("key"):
        return None
    if expected and expected.get((config.get("variant"), config.get("seed"))) != key:
        return None  # not the config the group holds now (an older run of an edited spec)
    done = [r for r in logged.get(key, []) if r.info.status == "FINISHED"]
    if done:
        return done[0].info.run_id
    # Left RUNNING by a process killed while logging it.  Nobody else is logging this run now: a worker logs its run
    # while it holds the run's claim, and a command's final pass runs once its grid has no run in anyone's hands.
    for r in logged.pop(key, []):
        client.delete_run(r.info.run_id)
    end = int((d / "result.json").stat().st_mtime * 1000)
    history = files.read_csv(d / "metrics.csv")
    seconds = result.train_time_s or sum(float(r["epoch_time"]) for r in history)
    start = end - int(1000 * (seconds + (result.test_time_s or 0)))
    variant, seed = config.get("variant") or d.parent.name, config.get("seed", d.name.removeprefix("seed-"))
    tags = {
        "kind": "run",
        "group": meta["group"],
        "config_key": key,
        "spec": str(meta.get("path", "")),
        "spec_name": str(meta.get("name", "")),
        "role": meta.get("role", "published"),
        "variant": str(variant),
        "seed": str(seed),
        "state": result.status,
        "run_dir": str(d.resolve()),
        "mlflow.parentRunId": parent,
    }
    for tag, field in (
        ("commit", "commit"),
        ("device", "device"),
        ("device_name", "device_name"),
        ("train_precision", "train_precision"),
        ("eval_precision", "eval_precision"),
        ("torch", "torch"),
    ):
        if getattr(result, field):
            tags[tag] = str(getattr(result, field))
    tags["profile"] = meta.get("profile") or "full"  # as the summary names a spec without a profile
    if "trial" in result.extra:  # a tuning trial: its number and the study it belongs to
        tags["trial"] = str(result.extra["trial"])
        tags["study"] = str(meta.get("study", ""))
    name = f"trial-{int(result.extra['trial']):04d}" if "trial" in result.extra else f"{variant}/s{seed}"
    run_id = client.create_run(exp_id, start_time=start, tags=tags, run_name=name).info.run_id
    params = [Param(k, v) for k, v in flatten(config["config"]).items()]
    metrics = []
    for row in history:  # one point per epoch, at the epoch's end
        step, at = int(row["epoch"]), start + int(1000 * float(row.get("train_seconds") or 0))
        metrics += [Metric(k, float(v), at, step) for k, v in row.items() if k != "epoch" and v not in ("", None)]
    final = {f"test_{k}": v for k, v in result.test.items()}
    final |= {f"test_raw_{k}": v for k, v in (result.test_raw or {}).items()}  # eval.postprocess: before it
    final |= {f"postprocess_{k}": v for k, v in (result.postprocess or {}).items() if not isinstance(v, str)}
    final |= {
        k: getattr(result, k)
        for k in ("val_best", "best_epoch", "epochs_run", "train_time_s", "test_time_s", "params")
        if isinstance(getattr(result, k), (int, float))
    }
    metrics += [Metric(k, float(v), end, 0) for k, v in final.items() if isinstance(v, (int, float))]
    for i in range(0, max(len(params), len(metrics)), 100):  # MLflow takes at most 100 params, 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[i : i + 100], params=params[i : i + 100])
    for f in ("curves.png", "config.json", "metrics.csv", "result.json"):
        if (d / f).is_file():
            client.log_artifact(run_id, str(d / f))
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED), end_time=end)  # last: "logged completely"
    logged[key] = [client.get_run(run_id)]
    return run_id


def flatten(config: dict[str, Any]) -> dict[str, str]:
    """A run's resolved config (``config.json``'s ``config``) as MLflow params: ``{"optim.lr": "0.001", "task": "mnist",
    "model.widths": "[8, 16]"}`` (strings; lists and mappings as JSON)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            for kk, vv in flatten(v).items():
                out[f"{k}.{kk}"] = vv
        else:
            out[k] = v if isinstance(v, str) else json.dumps(v)
    return out


def _oldest(runs: list[Any]) -> str:
    """The id of the run created first (ties by id), the one every process agrees on."""
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id


def _search(client: Any, exp_id: str, query: str) -> list[Any]:
    """Every run of ``exp_id`` matching ``query`` (all pages), deleted ones left out."""
    out, token = [], None
    while True:
        page = client.search_runs([exp_id], query, max_results=1000, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def same_database(a: str, b: str) -> bool:
    """Whether two database URLs name the same database (driver, user and password aside)."""
    import sqlalchemy.exc

    try:
        ua, ub = sqlalchemy.engine.make_url(a), sqlalchemy.engine.make_url(b)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return False
    if ua.get_backend_name() != ub.get_backend_name():
        return False
    if ua.get_backend_name() == "sqlite":
        return bool(ua.database and ub.database) and Path(ua.database).resolve() == Path(ub.database).resolve()
    return (ua.host or "localhost", ua.port, ua.database) == (ub.host or "localhost", ub.port, ub.database)


MLFLOW_TABLES = {"experiments", "runs", "alembic_version"}  # an MLflow store has these (and more) once created


def _foreign_tables(uri: str) -> list[str]:
    """Tables of an existing tracking database that show it belongs to another application (an MLflow store has
    ``experiments``; an empty or missing database has none); [] when it cannot be inspected (the check that follows
    says why)."""
    import sqlalchemy

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []  # inspecting would create the file
    try:
        engine = sqlalchemy.create_engine(
            uri, connect_args={"connect_timeout": 5} if uri.startswith("postgresql") else {}
        )
        try:
            tables = sqlalchemy.inspect(engine).get_table_names()
        finally:
            engine.dispose()
    except (sqlalchemy.exc.SQLAlchemyError, ModuleNotFoundError):
        return []
    return [] if not tables or "experiments" in tables else sorted(set(tables) - MLFLOW_TABLES) or sorted(tables)


class _mlflow_env:
    """MLflow's settings while bench checks and logs, unless the user set them: MLflow retries an unreachable server
    for minutes by default (here: a few seconds; when checking before anything runs, one try of 5 s), and prints two
    "View run" lines to stdout for every run it ends on a server (stdout is bench's one line per finished run; the
    summary line names the store instead)."""

    SETTINGS = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }
    CHECK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}

    def __init__(self, check: bool = False):
        self.settings = self.SETTINGS | (self.CHECK if check else {})

    def __enter__(self) -> None:
        self.set = [k for k in self.settings if k not in os.environ]
        os.environ.update({k: self.settings[k] for k in self.set})

    def __exit__(self, *exc: Any) -> None:
        for k in self.set:
            os.environ.pop(k, None)
