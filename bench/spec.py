"""Declarative ablation specs: YAML -> validated list of runs.

A spec names a task, a ``base`` configuration, an ordered list of ``variants``, the
``seeds`` and optional ``profiles``.  A variant builds on the previous one (the report's
cumulative ladder) or, with ``from: NAME``, changes one thing from a named variant (a
leave-one-out ablation).  Everything is validated here, before any training: an error
names the spec file, the key path and the valid choices, closest first.

``set`` takes nested mappings or dotted paths.  Setting a registry section's ``name``
(``model``, ``optim``, ``sched``, ``loss``) to a new value replaces that section: the old
section's keyword arguments belong to the old factory.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import files
from bench.config import (
    REGISTRY_SECTIONS,
    SECTION_TYPES,
    Config,
    ConfigError,
    NonNegInt,
    PosInt,
    TrainCfg,
    build_section,
    check_value,
    config_hash,
    raise_all,
    unknown_key_message,
)
from bench.factories import check_section
from bench.log import first_line
from bench.registry import UnknownName, unknown_name_message
from bench.tasks import TASKS

SPEC_KEYS = ["name", "description", "task", "target", "seeds", "base", "variants", "profiles", "search", "tracking"]
TRACKING_KEYS = ["mlflow"]
SEARCH_KEYS = ["variant", "trials", "space", "tuned", "profile", "objectives", "rungs"]
TUNED = "tuned"  # the variant `bench tune` writes into the file named by `search.tuned`
# What a study may optimize (`search.objectives`, `bench tune --objectives`): the task's validation metric (its own
# direction) and costs, all minimized.  Each trial records every one of them; the study optimizes those named.
OBJECTIVES: dict[str, str] = {
    "val_metric": "the task's primary metric on the validation split (best epoch)",
    "train_seconds": "the harness's measured training time of the trial (training steps only, all epochs)",
    "params": "the network's parameter count",
    "flops": "FLOPs of one forward pass of one image (FlopCounterMode; what the ONNX cost table counts)",
}
# Not offered: ONNX Runtime latency is measured by `exporters` on an exported file, which bench may not import.
NOT_OBJECTIVES = {
    "latency_ms": "ONNX Runtime latency is measured by the exporters after export (python -m exporters.onnx),"
    " which the tuner does not import; flops counts the network's cost instead"
}
DIST_KEYS = ["low", "high", "log", "step", "choices"]
VARIANT_KEYS = ["name", "from", "set", "reported", "note", "ensemble"]
ENSEMBLE_KEYS = ["of", "size"]
PROFILE_KEYS = ["seeds", "set", "variants", "as_written", "workers", "description"]
CONFIG_SECTIONS = ["model", "optim", "sched", "loss", "train", "data", "augment", "eval"]
DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class EnsembleDef:
    """A rung that trains nothing: the mean probability of ``size`` finished runs (different seeds) of the rung
    ``of`` (see :mod:`bench.ensemble`).  ``pool``: the spec's (or profile's) seeds as written, in order; the
    ensemble of seed k is seed k of ``of`` and the ``size - 1`` seeds that follow k in ``pool``, cyclically, in
    the order of their seeds (with
    ``size`` = every seed, the same ensemble for each seed: its Δ is then the ensemble against each seed alone)."""

    of: str
    size: int | None  # None: every seed of the pool
    pool: list[int] = field(default_factory=list)

    def member_seeds(self, seed: int) -> list[int]:
        pool = self.pool if seed in self.pool else [*self.pool, seed]
        i, n = pool.index(seed), self.size or len(pool)
        return sorted(pool[(i + j) % len(pool)] for j in range(n))  # one order per set: the same set, the same sums


@dataclass
class Variant:
    name: str
    index: int
    parent: str | None  # the variant this one changes (None for the first)
    ablation: bool  # True when `from:` named a parent (a leave-one-out check)
    change: str  # what it changed, in full (note and every key it sets), for the list under the summary table
    reported: float | None
    config: Config  # resolved; seed is set per run
    label: str = ""  # what it changed in at most LABEL_MAX characters, for the table itself (see short_label)
    ensemble: EnsembleDef | None = None  # a rung of seed ensembles of another rung: trained by none of its runs


@dataclass
class Run:
    spec: str  # the group the run belongs to (folder under results/runs)
    variant: Variant
    seed: int
    config: Config  # this run's own copy
    key: str  # hash of the resolved config (an ensemble's: of its config and of its members' keys)
    members: tuple[Run, ...] = ()  # an ensemble's member runs (see EnsembleDef); none for a run that trains

    @property
    def rel_dir(self) -> Path:
        return Path(self.spec) / slug(self.variant.name) / f"seed-{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.spec} {self.variant.name} seed {self.seed}"


def run_keys(runs: Iterable[Run]) -> dict[tuple[str, int], str]:
    """{(variant, seed): key} of ``runs``: the key a stored run must have to be one of them (a group's definition
    keeps them, read back by :meth:`bench.records.GroupRecord.expected_keys`)."""
    return {(r.variant.name, r.seed): r.key for r in runs}


@dataclass
class Spec:
    name: str
    path: str
    task: str
    seeds: list[int]
    profile: str | None
    variants: list[Variant]
    description: str = ""
    search: dict[str, Any] | None = None  # validated `search:` section (see bench/tune.py)
    workers: int | None = None  # runs trained at once (a profile's `workers:`; --workers overrides; None: measured)
    target: float | None = None  # the report's best number: the table's time-to-target column reads it
    overrides: dict[str, Any] = field(default_factory=dict)  # --set leaves applied to every variant
    tuned: dict[str, Any] | None = None  # the study behind the `tuned` variant (its file's `study:`), when there is one
    group_name: str | None = None  # an ad-hoc group's name (see place_in_group); None: the published group
    mlflow: bool | str | None = None  # `tracking: {mlflow: true | URI}`: log the runs to MLflow (bench/tracking.py)

    @property
    def published_group(self) -> str:
        """The group of the spec's own runs: the spec name, plus ``@profile`` for a profile."""
        return f"{self.name}@{self.profile}" if self.profile else self.name

    @property
    def group(self) -> str:
        """Folder name under results/runs."""
        return self.group_name or self.published_group

    @property
    def adhoc(self) -> bool:
        return self.group_name is not None

    def variant_names(self, asked: list[str]) -> list[str]:
        """``asked`` (a --variants list), or ConfigError naming the spec's variants for a name it does not have."""
        names = [v.name for v in self.variants]
        for n in asked:
            if n not in names:
                raise ConfigError(f"--variants: {unknown_name_message('variant', n, names)}")
        return asked

    def runs(self, variants: list[str] | None = None) -> list[Run]:
        """Every (variant, seed) run, or those of the named variants; each with its own config copy."""
        out = []
        for v in self.variants:
            if variants is None or v.name in variants:
                for seed in self.seeds:
                    out.append(self._run(v, seed))
        return out

    def _run(self, v: Variant, seed: int) -> Run:
        cfg = v.config.copy(seed=seed)
        if v.ensemble is None:
            return Run(self.group, v, seed, cfg, run_key(cfg))
        of = next(m for m in self.variants if m.name == v.ensemble.of)
        members = tuple(self._run(of, s) for s in v.ensemble.member_seeds(seed))
        return Run(self.group, v, seed, cfg, ensemble_key(cfg, [m.key for m in members]), members)


def slug(name: str) -> str:
    """A variant name as a folder name."""
    return re.sub(r"[^A-Za-z0-9+._=-]", "_", name)


def group_slug(name: str) -> str:
    """A group name as a folder name (commas kept: ad-hoc groups list their overrides with them)."""
    return re.sub(r"[^A-Za-z0-9+._=,@-]", "_", name)


def group_file_prefix(group: str) -> str:
    """How the names of a group's figures (and Pareto front files) begin: ``mnist@quick`` -> ``mnist-quick``."""
    return group.replace("@", "-")


# Train settings that change only how fast a run goes (and floating-point rounding), never what it computes.
SPEED_KEYS = ("threads", "channels_last", "compile")


def run_key(cfg: Config) -> str:
    """Hash of the spec's resolved config of a run: what can change its result.  Where it runs is
    left out (data root, SPEED_KEYS); the device is the spec's ``train.device`` (usually ``auto``),
    whatever ``--device`` picks at run time."""
    d = cfg.to_dict()
    d["data"] = {k: v for k, v in d["data"].items() if k != "root"}
    d["train"] = {k: v for k, v in d["train"].items() if k not in SPEED_KEYS}
    return config_hash(d)


# Keys that act only once training is over, on the best epoch's weights: eval.postprocess is chosen on validation
# after the last epoch.  (eval.tta and eval.threshold are not among them: validation scores every epoch with them, so
# they choose the best epoch.)  Two runs whose configs differ only here train the same weights.
POST_TRAINING_KEYS = {"eval": ("postprocess",)}


def training_key(cfg: Config) -> str:
    """The :func:`run_key` of ``cfg`` with every :data:`POST_TRAINING_KEYS` at its default: what the run trains.
    A run whose training key is another run's :func:`run_key` trains that run's weights (``bench/derived.py``)."""
    plain = cfg.copy()
    for section, names in POST_TRAINING_KEYS.items():
        defaults = {f.name: f.default for f in dataclasses.fields(SECTION_TYPES[section])}
        setattr(plain, section, dataclasses.replace(getattr(plain, section), **{k: defaults[k] for k in names}))
    return run_key(plain)


def ensemble_key(cfg: Config, member_keys: list[str]) -> str:
    """An ensemble run's key: its own config (what it evaluates with) and its members' keys, in order."""
    return config_hash({"ensemble": run_key(cfg), "members": member_keys})


# --------------------------------------------------------------------------- set paths


def flatten_set(raw: Any, where: str) -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}, "model.batch_norm": true}`` -> ``{"optim.lr": 1e-3, "model.batch_norm": true}``."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of key paths to values, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if isinstance(value, dict):
            for sub, v in flatten_set(value, f"{where}.{key}").items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    return out


def apply_set(cfg: dict[str, Any], leaves: dict[str, Any], where: str) -> dict[str, Any]:
    """Return a copy of config dict ``cfg`` with the dotted ``leaves`` assigned."""
    cfg = copy.deepcopy(cfg)
    for path in leaves:
        parts = path.split(".")
        if parts[0] not in CONFIG_SECTIONS:
            raise ConfigError(unknown_key_message(f"{where}", parts[0], CONFIG_SECTIONS))
        if len(parts) != 2:
            raise ConfigError(f"{where}.{path}: expected SECTION.KEY (e.g. optim.lr), got {path!r}")
    # A new factory name starts its section afresh (see the module docstring).
    for section in REGISTRY_SECTIONS:
        new = leaves.get(f"{section}.name")
        if new is not None and new != cfg.get(section, {}).get("name"):
            cfg[section] = {}
    for path, value in leaves.items():
        section, key = path.split(".")
        cfg.setdefault(section, {})[key] = value
    return cfg


def describe(leaves: dict[str, Any], overridden: dict[str, tuple[Any, str]] | None = None) -> str:
    """``optim.lr=0.001, model.batch_norm=true``: what a variant sets, for the summary (floats to 4 significant
    digits: a tuned ``optim.lr=0.00797856995992107`` reads as 0.007979; the exact values are in the run's config).
    A key that ``overridden`` (key -> (value, who set it): a profile's ``set``, --set) also sets shows the value the
    run used: ``optim.lr=0.005 (--set; the spec's 0.001)``."""

    def show(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else files.yaml_scalar(v)

    over = overridden or {}
    return ", ".join(
        f"{k}={show(over[k][0])} ({over[k][1]}; the spec's {show(v)})"
        if k in over and over[k][0] != v
        else f"{k}={show(v)}"
        for k, v in leaves.items()
    )


LABEL_MAX = 46  # characters of the summary table's change column: the table fits a screen without scrolling


def short_label(text: str, limit: int = LABEL_MAX) -> str:
    """``text`` in at most ``limit`` characters: as it is when it fits, else without its parenthetical remarks,
    else as many of its clauses (split at ``:``, ``;`` or ``,`` outside brackets, so a list value stays whole) as fit,
    then ``…``; a first clause too long for that is cut at a word, then ``…``."""
    if len(text) <= limit:
        return text
    bare = re.sub(r"\s*\([^()]*\)", "", text).strip()
    if len(bare) <= limit:
        return bare
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(bare):
        depth += 1 if ch in "[{" else -1 if ch in "]}" else 0
        if ch in ":;," and depth == 0:
            parts.append(bare[start : i + 1])
            start = i + 1
    kept = ""
    for part in parts:
        if len(kept + part) + 2 > limit:
            break
        kept += part
    if kept:
        return kept.rstrip() + " …"
    return bare[: limit - 1].rsplit(" ", 1)[0].rstrip(" ,;:") + "…"


# --------------------------------------------------------------------------- building configs


def _build_section(task_obj: Any, section: str, value: Any, where: str) -> Any:
    """One checked section of a config (``where``: the config's place in the spec): a registry section's dict, or its
    dataclass."""
    if section not in CONFIG_SECTIONS:
        raise ConfigError(unknown_key_message(where, section, CONFIG_SECTIONS))
    if section in REGISTRY_SECTIONS:
        default = task_obj.default_loss if section == "loss" else None
        if section == "loss" and isinstance(value, dict) and value.get("name") == "default":
            value = {k: v for k, v in value.items() if k != "name"}
        return check_section(section, value, f"{where}.{section}", default)
    return build_section(SECTION_TYPES[section], value, f"{where}.{section}")


def build_config(task: str, raw: dict[str, Any], where: str, seed: int = 0) -> Config:
    """Validate a config dict (sections as in :class:`Config`) and build the Config."""
    try:
        task_obj = TASKS.get_or_raise(task)
    except UnknownName as e:
        raise ConfigError(f"{where}: {e}") from None
    kwargs: dict[str, Any] = {}
    errors = []
    for section, value in raw.items():  # every section's problems at once (--set optim.lr=-1 --set train.epochs=abc)
        try:
            kwargs[section] = _build_section(task_obj, section, value, where)
        except ConfigError as e:
            errors.append(str(e))
    raise_all(errors)
    if "model" not in kwargs:
        raise ConfigError(f"{where}: missing 'model' section")
    kwargs.setdefault("loss", {"name": task_obj.default_loss})
    cfg = Config(task=task, seed=seed, **kwargs)
    if cfg.data.val_fraction is None:
        cfg.data.val_fraction = task_obj.default_val_fraction
    if not DEVICE_RE.fullmatch(cfg.train.device):
        raise ConfigError(f"{where}.train.device: {cfg.train.device!r} is not a device; valid: auto, cpu, cuda, cuda:N")
    task_obj.check_config(cfg, where)
    return cfg


def config_from_dict(d: dict[str, Any], where: str = "config") -> Config:
    """Rebuild (and re-validate) a Config saved with ``Config.to_dict``, e.g. a run's config.json."""
    d = dict(d)
    task, seed = d.pop("task"), d.pop("seed", 0)
    train = d.get("train")
    if isinstance(train, dict) and train.get("compile") in ("off", False):  # runs saved before ade6f6a said "off"
        d["train"] = {**train, "compile": "none"}
    return build_config(task, d, where, seed)


# --------------------------------------------------------------------------- loading specs


def _check_mapping(d: Any, allowed: list[str], where: str, what: str = "a mapping") -> None:
    """``d`` must be a dict whose keys are all in ``allowed``."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected {what}, got {type(d).__name__}")
    for key in d:
        if key not in allowed:
            raise ConfigError(unknown_key_message(where, str(key), allowed))


def resolve_spec_path(name_or_path: str) -> Path:
    """``mnist`` -> ``ablations/mnist.yaml`` (a short name, as ``bench run mnist`` takes); a path is used as given."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists() or "/" in name_or_path:
        return p
    return Path("ablations") / f"{name_or_path}.yaml"


def load_spec(
    path: str | Path,
    profile: str | None = None,
    overrides: list[str] | None = None,
    seeds: list[int] | None = None,
    only: list[str] | None = None,
) -> Spec:
    """Parse and fully validate a spec; raises ConfigError naming the file and key path.

    ``overrides`` (``--set KEY=VALUE``) apply to every variant after the profile's ``set``;
    ``seeds`` replaces the spec's (or profile's) seeds.  The result's group is the published one:
    see :func:`place_in_group` for where runs with overrides belong.  ``only`` (``--variants``): the
    overrides must fit these variants; another variant they do not fit (a loss key of another loss, say)
    is left out of the result, so that an experiment on one rung can set that rung's own keys.
    """
    path = Path(path)
    try:
        raw = files.load_yaml(path.read_text())
    except FileNotFoundError:
        shipped = sorted(p.stem for p in Path("ablations").glob("*.yaml") if not search_output(p))  # not specs
        hint = (
            f"; specs in ablations/: {', '.join(shipped)}"
            if shipped
            else "; a short name is looked up in ./ablations: run from the repository, or give the spec's path"
        )
        raise ConfigError(f"{path}: spec file not found{hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the spec file ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(files.yaml_error(path, e)) from None
    try:
        return _build_spec(raw, path, profile, parse_overrides(overrides or []), seeds, only)
    except ConfigError as e:  # each problem on its own line, each naming the file
        # key paths under --set are joined as under any section ("--set.optim.lr"); the user typed "--set optim.lr"
        lines = str(e).replace("--set.", "--set ").splitlines()
        raise ConfigError("\n".join(f"{path}: {line}" for line in lines)) from None


# --set keys that say where and how fast a run runs, not what it computes: they act like --device,
# --data-root and the worker thread count, so they never make a run an experiment of its own.
RUNTIME_KEYS = {
    "train.device": "device",
    "train.threads": "threads",
    "data.root": "data_root",
    "train.channels_last": "channels_last",
    "train.compile": "compile",
}


def split_overrides(items: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(``--set`` items that change configs, {RUNTIME_KEYS name: value} of those that say where runs run)."""
    config, runtime = [], {}
    for item in items:
        key = item.split("=", 1)[0].strip()
        if key in RUNTIME_KEYS:
            runtime[RUNTIME_KEYS[key]] = parse_overrides([item])[key]
        else:
            config.append(item)
    types = typing.get_type_hints(TrainCfg, include_extras=True)
    for key in SPEED_KEYS:
        if key in runtime:
            runtime[key] = check_value(runtime[key], types[key], f"--set train.{key}")
    for key in ("device", "data_root"):
        if key in runtime:
            runtime[key] = str(check_value(runtime[key], str, f"--set {key}"))
    return config, runtime


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.01", "train.epochs=2"]`` -> dotted leaves with YAML-typed values."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=2")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = files.load_yaml(value)
        except yaml.YAMLError as e:
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or first_line(e)})"
            ) from None
    return out


@dataclass
class _Profile:
    """What a profile changes: the config leaves it sets, and optionally seeds, variants, workers."""

    leaves: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] | None = None
    variants: list[str] | None = None
    as_written: list[str] = field(default_factory=list)  # variants the profile's `set` leaves alone
    workers: int | None = None


def _build_spec(
    raw: Any,
    path: Path,
    profile: str | None,
    cli_leaves: dict[str, Any],
    seeds_override: list[int] | None,
    only: list[str] | None = None,
) -> Spec:
    _check_mapping(raw, SPEC_KEYS, "(top level)")
    for key in ("task", "base", "variants"):
        if key not in raw:
            raise ConfigError(f"missing required key {key!r}")
    name = check_value(raw.get("name", path.stem), str, "name")
    if slug(name) != name or name.startswith("."):
        raise ConfigError(f"name: {name!r} must be a folder name (letters, digits, + . _ = -)")
    task = check_value(raw["task"], str, "task")
    try:
        TASKS.get_or_raise(task)  # a user's task by import path is imported here, before the sections that need it
    except UnknownName as e:
        raise ConfigError(f"task: {e}") from None
    base = raw["base"]
    if not isinstance(base, dict):
        raise ConfigError(f"base: expected a mapping, got {type(base).__name__}")
    build_config(task, base, "base")  # errors in base are reported as base.*, not per variant
    names = (
        [str(v.get("name")) for v in raw["variants"] if isinstance(v, dict)]
        if isinstance(raw["variants"], list)
        else []
    )
    prof = _read_profiles(raw.get("profiles"), profile, task, base, names)
    if cli_leaves:
        apply_set(base, cli_leaves, "--set")  # SECTION.KEY; whether the key fits is each variant's to say
    seeds = check_value(raw.get("seeds", [0]), list[NonNegInt], "seeds")
    if prof.seeds is not None:
        seeds = prof.seeds
    if seeds_override is not None:
        seeds = check_value(seeds_override, list[NonNegInt], "--seeds")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: need a non-empty list of distinct integers, got {seeds}")
    tuned_variant, tuned = read_tuned(raw.get("search"), path)
    made = [tuned_variant] if tuned_variant else []
    made += [r["variant"] for r in read_rungs(raw.get("search"), path)]
    rawv = raw["variants"] + made if made and isinstance(raw["variants"], list) else raw["variants"]
    variants, misfits = _resolve_variants(
        rawv, task, base, [(prof.leaves, f"profiles.{profile}.set", prof.as_written)], cli_leaves, only
    )
    if isinstance(raw.get("search"), dict) and raw["search"].get("variant") in misfits:
        raw = {k: v for k, v in raw.items() if k != "search"}  # its variant is left out: nothing to search here
    search = _check_search(
        raw.get("search"),
        task,
        variants,
        prof.leaves,
        cli_leaves,
        profiles=list(raw["profiles"]) if isinstance(raw.get("profiles"), dict) else [],
        made={TUNED, *(str(v.get("name")) for v in made)},
    )
    if prof.variants is not None:  # a profile's list keeps the search's results: they are what the search was for
        kept = {TUNED, *(str(v.get("name")) for v in made)}
        variants = [v for v in variants if v.name in prof.variants or v.name in kept]
    _check_ensemble_seeds(
        variants,
        prof.seeds if prof.seeds is not None else check_value(raw.get("seeds", [0]), list[NonNegInt], "seeds"),
        f"profiles.{profile}" if profile else "seeds",
    )
    return Spec(
        name=name,
        path=str(path),
        task=task,
        seeds=seeds,
        profile=profile,
        variants=variants,
        description=str(raw.get("description", "")),
        search=search,
        workers=prof.workers,
        overrides=cli_leaves,
        target=_check_target(raw.get("target"), task),
        tuned=tuned,
        mlflow=_check_tracking(raw.get("tracking")),
    )


def _check_tracking(raw: Any) -> bool | str | None:
    """``tracking: {mlflow: true | URI}``: where the runs are logged besides the run store (not part of any run's
    config or key; the URI itself is checked by bench.tracking when a command uses it)."""
    if raw is None:
        return None
    _check_mapping(raw, TRACKING_KEYS, "tracking")
    value = raw.get("mlflow")
    if value is None or isinstance(value, bool):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"tracking.mlflow: expected true, false or a tracking URI (e.g. sqlite:///results/mlflow.db), got {value!r}"
        )
    return value


def tuned_path(spec_path: str | Path, search: Any) -> Path | None:
    """The file ``search.tuned`` names, relative to the spec's folder; None when the spec names none."""
    name = search.get("tuned") if isinstance(search, dict) else None
    return Path(spec_path).parent / str(name) if name else None


def search_output(path: Path) -> bool:
    """Whether a YAML file beside the specs is written by `bench tune` (``<spec>.tuned.yaml``, ``<spec>.rungs.yaml``)
    rather than a spec."""
    return path.stem.endswith((".tuned", ".rungs"))


def rungs_path(spec_path: str | Path, search: Any) -> Path | None:
    """The file ``search.rungs`` names (rungs made from trials by ``bench tune --rung NAME --trial N``), relative to
    the spec's folder; None when the spec names none."""
    name = search.get("rungs") if isinstance(search, dict) else None
    return Path(spec_path).parent / str(name) if name else None


def _read_search_file(path: Path, key: str) -> Any:
    """The YAML of a file a ``search`` key names (``key`` says which, for the error)."""
    try:
        return files.load_yaml(path.read_text())
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path} ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: {files.yaml_error(path, e)}") from None


def read_rungs(search: Any, spec_path: Path) -> list[dict[str, Any]]:
    """The entries (``{study, variant}``) of the file ``search.rungs`` names; none while it does not exist yet."""
    path = rungs_path(spec_path, search)
    if path is None or not path.exists():
        return []
    raw = _read_search_file(path, "search.rungs")
    entries = raw.get("rungs") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("variant"), dict) and isinstance(e.get("study"), dict) for e in entries
    ):
        raise ConfigError(
            f"search.rungs: {path} is not a file written by `bench tune --rung` (expected `rungs:`, a "
            f"list of `study:` and `variant:` mappings); delete it and make the rungs again"
        )
    return entries


def read_tuned(search: Any, spec_path: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the raw `tuned` variant, its study's summary) from the file ``search.tuned`` names, or (None, None)
    while the file does not exist yet (``bench tune`` writes it)."""
    path = tuned_path(spec_path, search)
    if path is None or not path.exists():
        return None, None
    raw = _read_search_file(path, "search.tuned")
    if not isinstance(raw, dict) or not isinstance(raw.get("variant"), dict) or not isinstance(raw.get("study"), dict):
        raise ConfigError(
            f"search.tuned: {path} is not a file written by `bench tune` (expected `study:` and "
            f"`variant:` mappings); delete it and tune again"
        )
    if raw["variant"].get("name") != TUNED:
        raise ConfigError(f"search.tuned: {path}: variant.name must be {TUNED!r}")
    return raw["variant"], raw["study"]


def _check_target(raw: Any, task: str) -> float | None:
    """``target``: a value of the task's primary metric as the spec writes it (0.992 for 99.2 %)."""
    if raw is None:
        return None
    metric = TASKS[task].metrics[0]
    value = check_value(raw, float, "target")
    if not metric.low <= value <= metric.high:
        raise ConfigError(
            f"target: {metric.key} must be in [{metric.low:g}, {metric.high:g}] as the spec writes it "
            f"(e.g. 0.992 for 99.2 %), got {raw}"
        )
    return value


def _read_profiles(
    profiles: Any, profile: str | None, task: str, base: dict[str, Any], variant_names: list[str]
) -> _Profile:
    """Validate every profile (a typo in an unused profile is still an error); return the chosen one."""
    profiles = profiles or {}
    if not isinstance(profiles, dict):
        raise ConfigError("profiles: expected a mapping of profile names")
    if profile is not None and profile not in profiles:
        raise ConfigError(
            f"--profile: {unknown_name_message('profile', profile, profiles)}"
            if profiles
            else f"--profile {profile!r}: this spec defines no profiles"
        )
    chosen = _Profile()
    for pname, pdef in profiles.items():
        profile_where = f"profiles.{pname}"
        _check_mapping(pdef, PROFILE_KEYS, profile_where)
        leaves = flatten_set(pdef.get("set"), f"{profile_where}.set")
        build_config(task, apply_set(base, leaves, f"{profile_where}.set"), f"{profile_where}.set")
        workers = pdef.get("workers")
        workers = None if workers is None else check_value(workers, PosInt, f"{profile_where}.workers")
        this = _Profile(leaves, workers=workers)
        if "seeds" in pdef:
            this.seeds = check_value(pdef["seeds"], list[NonNegInt], f"{profile_where}.seeds")
        if "variants" in pdef:
            this.variants = check_value(pdef["variants"], list[str], f"{profile_where}.variants")
        # A variant whose whole point is its budget (the `fast` recipe) keeps it in a short profile.
        this.as_written = check_value(pdef.get("as_written", []), list[str], f"{profile_where}.as_written")
        for key, names in (("variants", this.variants or []), ("as_written", this.as_written)):
            for n in names:
                if n not in variant_names:
                    raise ConfigError(f"{profile_where}.{key}: {unknown_name_message('variant', n, variant_names)}")
        if pname == profile:
            chosen = this
    return chosen


def _resolve_variants(
    rawv: Any,
    task: str,
    base: dict[str, Any],
    overlays: list[tuple[dict[str, Any], str, list[str]]],
    cli_leaves: dict[str, Any],
    only: list[str] | None,
) -> tuple[list[Variant], dict[str, ConfigError]]:
    """The ladder: each variant builds on the previous one, or on ``from:``; then every overlay
    ``(leaves, where, spared)`` (the profile's ``set`` sparing its ``as_written`` variants) and ``--set``'s
    ``cli_leaves`` are applied to each resolved config but those of the variants an overlay spares.

    Returns the variants and the *misfits*: with ``only`` (``--variants``), the variants not in it whose config
    ``--set`` does not fit, each with its error, left out (and the ensembles of a misfit).  Without ``only`` a
    misfit is an error, which names the variants that the key fits."""
    if not isinstance(rawv, list) or not rawv:
        raise ConfigError("variants: expected a non-empty list")
    metric = TASKS[task].metrics[0]
    resolved: dict[str, dict[str, Any]] = {}
    variants: list[Variant] = []
    misfits: dict[str, ConfigError] = {}
    prev: str | None = None
    for i, v in enumerate(rawv):
        variant_where = f"variants[{i}]"
        _check_mapping(v, VARIANT_KEYS, variant_where, "a mapping with at least a 'name'")
        if "name" not in v:
            raise ConfigError(f"{variant_where}: missing 'name'")
        vname = check_value(v["name"], str, f"{variant_where}.name")
        variant_where = f"variants[{i}] ({vname})"
        if vname in resolved:
            raise ConfigError(f"{variant_where}.name: duplicate variant name {vname!r}")
        if any(slug(vname) == slug(n) for n in resolved):
            raise ConfigError(f"{variant_where}.name: {vname!r} maps to the same folder as an earlier variant")
        parent, ablation = prev, "from" in v  # an explicit `from:` is a leave-one-out check, even of the previous rung
        ens = _check_ensemble(v, variant_where, variants) if "ensemble" in v else None
        if ens is not None:
            parent = ens.of
        elif ablation:
            parent = check_value(v["from"], str, f"{variant_where}.from")
            if parent not in resolved:
                later = (
                    " (a variant builds on one above it)"
                    if parent in {str(x.get("name")) for x in rawv[i:] if isinstance(x, dict)}
                    else ""
                )
                why = (
                    unknown_name_message("earlier variant", parent, resolved)
                    if resolved
                    else f"{parent!r} is not an earlier variant; there is none before this one"
                ) + later
                raise ConfigError(f"{variant_where}.from: {why}")
        leaves = flatten_set(v.get("set"), f"{variant_where}.set")
        cfg_raw = apply_set(resolved[parent] if parent else base, leaves, f"{variant_where}.set")
        build_config(task, cfg_raw, f"{variant_where}.set")
        resolved[vname] = cfg_raw
        final = cfg_raw
        for overlay, overlay_where, spared in overlays:
            if vname not in spared:
                final = apply_set(final, overlay, overlay_where)
        if cli_leaves:
            try:
                with_set = apply_set(final, cli_leaves, "--set")
                build_config(task, with_set, "--set")
                final = with_set
            except ConfigError as e:
                if only is None or vname in only:
                    raise _misfit_error(e, vname, rawv, task, base, overlays, cli_leaves) from None
                misfits[vname] = e  # resolved without --set, so the rungs after it still build on it
        reported = v.get("reported")
        if reported is not None:
            reported = check_value(reported, float, f"{variant_where}.reported")
            if not metric.low <= reported <= metric.high:
                raise ConfigError(
                    f"{variant_where}.reported: {metric.key} must be in "
                    f"[{metric.low:g}, {metric.high:g}] as the spec writes it (e.g. 0.982 for 98.2 %), "
                    f"got {reported}"
                )
        applied = {  # what overrides the variant's own keys in its runs, so its change text says what they used
            k: (value, "profile")
            for overlay, _, spared in overlays
            if vname not in spared
            for k, value in overlay.items()
        }
        if vname not in misfits:
            applied.update({k: (value, "--set") for k, value in cli_leaves.items()})
        change = describe(leaves, applied) if leaves else ("(base)" if parent is None else "(no change)")
        if ablation:
            change = f"{parent} with {change}"
        if ens is not None:
            what = f"{ens.size} seeds" if ens.size else "every seed"
            change = f"mean of {what} of {ens.of}" + (f", {describe(leaves, applied)}" if leaves else "")
        label = change
        if v.get("note"):
            note = label = check_value(v["note"], str, f"{variant_where}.note")
            change = f"{note}: {change}" if leaves else note
        variants.append(
            Variant(
                vname,
                i,
                parent,
                ablation,
                change,
                reported,
                build_config(task, final, variant_where),
                short_label(label),
                ens,
            )
        )
        prev = vname
    for v in variants:  # an ensemble of a left-out rung has no members
        if v.ensemble is not None and v.ensemble.of in misfits:
            misfits.setdefault(v.name, misfits[v.ensemble.of])
    kept = [v for v in variants if v.name not in misfits]
    if not kept:
        raise next(iter(misfits.values()))
    return kept, misfits


def _misfit_error(
    e: ConfigError,
    vname: str,
    rawv: list[Any],
    task: str,
    base: dict[str, Any],
    overlays: list[tuple[dict[str, Any], str, list[str]]],
    cli_leaves: dict[str, Any],
) -> ConfigError:
    """``e`` (--set does not fit variant ``vname``) as it is when --set fits no variant; else naming ``vname`` and
    the variants it fits, to be trained alone with ``--variants``."""
    try:
        kept, _ = _resolve_variants(rawv, task, base, overlays, cli_leaves, only=[])
    except ConfigError:  # it fits none
        return e
    names = [v.name for v in kept]
    return ConfigError(
        f"--set does not fit {vname}: {e}\n--set fits only {', '.join(names)}: train them alone with --variants "
        + " ".join(names)
    )


def _check_ensemble(v: dict[str, Any], where: str, earlier: list[Variant]) -> EnsembleDef:
    """``ensemble: {of: NAME, size: N}`` of a variant: ``of`` an earlier rung that trains, ``size`` at least 2 (unset:
    every seed); its ``set`` may change only ``eval`` keys (how the members' outputs are scored, e.g. ``eval.tta``)."""
    raw = v["ensemble"]
    _check_mapping(raw, ENSEMBLE_KEYS, f"{where}.ensemble", "a mapping {of: VARIANT, size: N}")
    if "from" in v:
        raise ConfigError(f"{where}.from: an ensemble builds on the rung its `ensemble.of` names; leave `from` out")
    if "of" not in raw:
        raise ConfigError(f"{where}.ensemble.of: missing (the rung whose seeds it averages)")
    of = check_value(raw["of"], str, f"{where}.ensemble.of")
    trained = [x.name for x in earlier if x.ensemble is None]
    if of not in trained:
        raise ConfigError(
            f"{where}.ensemble.of: {unknown_name_message('earlier variant that trains', of, trained)}"
            if trained
            else f"{where}.ensemble.of: {of!r}: there is no earlier variant that trains"
        )
    size = raw.get("size")
    if size is not None and check_value(size, PosInt, f"{where}.ensemble.size") < 2:
        raise ConfigError(f"{where}.ensemble.size: an ensemble needs at least 2 members, got {size}")
    for key in flatten_set(v.get("set"), f"{where}.set"):
        if not key.startswith("eval."):
            raise ConfigError(
                f"{where}.set.{key}: an ensemble trains nothing; its `set` may change only eval keys (e.g. eval.tta)"
            )
    return EnsembleDef(of, size)


def _check_ensemble_seeds(variants: list[Variant], seeds: list[int], where: str) -> None:
    """Each ensemble rung's pool of seeds (the spec's or profile's as written) and the rung it averages present."""
    names = {v.name for v in variants}
    for v in variants:
        if v.ensemble is None:
            continue
        v.ensemble.pool = list(seeds)
        if v.ensemble.size is not None and v.ensemble.size > len(seeds):
            raise ConfigError(
                f"variants[{v.index}] ({v.name}).ensemble.size: {v.ensemble.size} members need as many "
                f"seeds; {where} has {len(seeds)} ({', '.join(map(str, seeds))})"
            )
        if v.ensemble.of not in names:
            raise ConfigError(f"{where}.variants: {v.name} averages the seeds of {v.ensemble.of}, which is not listed")


def _check_search(
    raw: Any,
    task: str,
    variants: list[Variant],
    *leaves: dict[str, Any],
    profiles: list[str] = (),
    made: set[str] = frozenset(),
) -> dict[str, Any] | None:
    """Validate ``search: {variant, trials, space: {PATH: {low, high[, log, step]} | {choices: [...]}}, tuned, profile,
    objectives, rungs}``; ``profile`` (one of ``profiles``; none: the full budget) is the budget of the study that writes
    ``tuned``; ``objectives`` (default ``[val_metric]``) what the study optimizes (two or more: a multi-objective study
    and its Pareto front); ``rungs`` the file of rungs made from trials.  ``made``: the variants the search wrote.
    A choice may be a list (``model.widths: {choices: [[8, 16], [16, 32]]}``): the network's shape.

    Every path is checked by building the tuned variant's config with the range's ends.
    """
    if raw is None:
        return None
    _check_mapping(raw, SEARCH_KEYS, "search")
    for key in ("tuned", "rungs"):
        if key in raw:
            check_value(raw[key], str, f"search.{key}")
    objectives = check_objectives(raw.get("objectives", ["val_metric"]), "search.objectives")
    if raw.get("profile") is not None and raw["profile"] not in profiles:  # the budget of the published study
        raise ConfigError(f"search.profile: {unknown_name_message('profile', str(raw['profile']), profiles)}")
    # what trains, but the search's own results
    names = [v.name for v in variants if v.name not in made and v.ensemble is None]
    vname = check_value(raw.get("variant", names[-1]), str, "search.variant")
    if vname not in names:
        raise ConfigError(f"search.variant: {unknown_name_message('variant', vname, names)}")
    trials = check_value(raw.get("trials", 20), PosInt, "search.trials")
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError("search.space: expected a non-empty mapping of SECTION.KEY to {low, high} or {choices}")
    base = next(v for v in variants if v.name == vname).config.to_dict()
    base.pop("task"), base.pop("seed")
    for lv in leaves:
        base = apply_set(base, lv, "search")
    for path, dist in space.items():
        dist_where = f"search.space.{path}"
        _check_mapping(dist, DIST_KEYS, dist_where)
        if "choices" in dist:
            ends = check_value(dist["choices"], list, f"{dist_where}.choices")
            if not ends or set(dist) - {"choices"}:
                raise ConfigError(f"{dist_where}: give either a non-empty 'choices' list or 'low' and 'high'")
        else:
            if "low" not in dist or "high" not in dist:
                raise ConfigError(f"{dist_where}: needs 'low' and 'high' (or 'choices')")
            ends = [
                check_value(dist["low"], float, f"{dist_where}.low"),
                check_value(dist["high"], float, f"{dist_where}.high"),
            ]
            if not ends[0] < ends[1] or (dist.get("log") and ends[0] <= 0):
                raise ConfigError(f"{dist_where}: need low < high (and low > 0 with log: true), got {ends}")
            if all(isinstance(dist[k], int) for k in ("low", "high")):
                ends = [dist["low"], dist["high"]]
        for end in ends:
            build_config(task, apply_set(base, {str(path): end}, "search.space"), "search.space")
    return {
        "variant": vname,
        "trials": trials,
        "space": space,
        "tuned": raw.get("tuned"),
        "profile": raw.get("profile"),
        "objectives": objectives,
        "rungs": raw.get("rungs"),
    }


def check_objectives(raw: Any, where: str) -> list[str]:
    """A list of names of :data:`OBJECTIVES` holding ``val_metric`` (a study that ignores the metric has nothing to
    trade a cost against), without repeats; returned with ``val_metric`` first, the costs in the order given."""
    names = check_value(raw, list[str], where)
    for name in names:
        if name in NOT_OBJECTIVES:
            raise ConfigError(f"{where}: {name} is not offered: {NOT_OBJECTIVES[name]}")
        if name not in OBJECTIVES:
            raise ConfigError(f"{where}: {unknown_name_message('objective', name, list(OBJECTIVES))}")
    if "val_metric" not in names or len(set(names)) != len(names):
        raise ConfigError(
            f"{where}: need val_metric and each objective once, got {', '.join(names) or 'none'} "
            f"(valid: {', '.join(OBJECTIVES)})"
        )
    return ["val_metric", *(n for n in names if n != "val_metric")]


# --------------------------------------------------------------------------- groups


def place_in_group(spec: Spec, published: Spec, group: str | None = None) -> Spec:
    """The group that ``spec`` (the spec with this invocation's ``--set`` and ``--seeds``) trains into,
    as a Spec whose variants and seeds are the group's whole scope.  ``published`` is the same spec
    and profile as written.

    Runs whose config is the spec's own (the same key as the published spec's run of that variant
    and seed) belong to the published group ``name[@profile]``, whose table ``results/summary.md``
    publishes; its scope is the whole spec and profile, whatever subset an invocation trains.
    Anything else (an override that changes a config, a seed the spec does not list) goes to an
    ad-hoc group, ``group`` if given, else one named after the overrides (and the seeds, when they
    are not the spec's), so that an experiment can never change a published table.  The caller
    trains the runs of the returned spec whose seeds are in ``spec.seeds``.
    """
    mine = run_keys(spec.runs()).items() <= run_keys(published.runs()).items()
    if mine and group is None:
        return published
    subset = set(spec.seeds) <= set(published.seeds)  # then the scope is the spec's seeds, as for a published group
    if group is None:
        group = f"{published.group}--{_adhoc_label(spec, published, subset)}"
    elif not re.fullmatch(r"[A-Za-z0-9+._=,-]+(@[A-Za-z0-9+._=,-]*--[A-Za-z0-9+._=,-]+)?", group) or group.startswith(
        "."
    ):
        # "@" only as in the names bench makes (mnist@quick--train.epochs=1), never a published group's mnist@quick
        raise ConfigError(
            f"--group {group!r}: must be a non-empty folder name made of letters, digits and + . _ = , - "
            f"(an @ only as in SPEC@PROFILE--LABEL)"
        )
    elif "@" in group and not group.startswith(f"{published.group}--"):
        raise ConfigError(  # it would read as an experiment of another spec or profile
            f"--group {group}: an @ names SPEC@PROFILE, and these runs are {published.group}'s: "
            f"name the group {published.group}--LABEL" + ("" if "@" in published.group else " or anything without an @")
        )
    elif group == spec.name:
        raise ConfigError(
            f"--group {group}: that name is the published group of {spec.path}; runs whose configs are "
            f"not the spec's own ({_adhoc_label(spec, published, subset)}) need a group of their own"
        )
    elif group in (owners := published_groups([Path("ablations"), Path(spec.path).parent])):
        raise ConfigError(
            f"--group {group}: that name is the published group of {owners[group]}, which `bench run` "
            f"would then refuse to train; choose a name of its own"
        )
    return dataclasses.replace(spec, group_name=group, seeds=published.seeds if subset else spec.seeds)


def published_groups(folders: list[Path]) -> dict[str, Path]:
    """The published group names (``name`` and ``name@profile``) of the specs in ``folders`` -> their spec file; a
    file that is no readable spec (a tuned file, broken YAML) names none: its own command reports it."""
    out: dict[str, Path] = {}
    for path in sorted({p.resolve() for folder in folders for p in folder.glob("*.y*ml")}):
        try:
            raw = files.load_yaml(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(raw, dict) or search_output(path):
            continue
        name = str(raw.get("name", path.stem))
        profiles = raw.get("profiles") if isinstance(raw.get("profiles"), dict) else {}
        out.update({g: path for g in [name, *(f"{name}@{p}" for p in profiles)]})
    return out


def _adhoc_label(spec: Spec, published: Spec, subset: bool) -> str:
    """``train.epochs=2,model.width=8[,seeds=5]``: the overrides (and seeds the spec does not list)
    that make a group ad hoc, shortened with a hash when long."""
    parts = [f"{k}={files.yaml_scalar(v)}" for k, v in spec.overrides.items()]
    if not subset:
        parts.append("seeds=" + "-".join(map(str, spec.seeds)))
    label = group_slug(",".join(parts).replace(" ", "").replace("@", "_")) or "adhoc"
    if len(label) > 60:
        label = label[:50] + "-" + hashlib.sha256(label.encode()).hexdigest()[:8]
    return label
