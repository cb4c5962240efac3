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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.config import (
    REGISTRY_SECTIONS,
    SECTION_TYPES,
    Config,
    ConfigError,
    build_section,
    check_factory_kwargs,
    check_value,
    config_hash,
    unknown_key_message,
)
from bench.registry import unknown_name_message

SPEC_KEYS = ["name", "description", "task", "seeds", "base", "variants", "profiles", "search"]
SEARCH_KEYS = ["variant", "trials", "space"]
DIST_KEYS = ["low", "high", "log", "step", "choices"]
VARIANT_KEYS = ["name", "from", "set", "reported", "note"]
PROFILE_KEYS = ["seeds", "set", "variants", "workers", "description"]
CONFIG_SECTIONS = ["model", "optim", "sched", "loss", "train", "data", "augment", "eval"]

# Factory parameters the harness supplies itself; a spec may not set them.
HARNESS_ARGS = {
    "model": ("in_channels", "num_classes"),
    "optim": ("params",),
    "sched": ("optimizer", "epochs", "steps_per_epoch"),
    "loss": (),
}


def registries() -> dict[str, Any]:
    # Imported lazily: the spec module must load quickly and without torch for --help.
    from bench.losses import LOSSES
    from bench.models import MODELS
    from bench.optim import OPTIMIZERS, SCHEDULERS

    return {"model": MODELS, "optim": OPTIMIZERS, "sched": SCHEDULERS, "loss": LOSSES}


@dataclass
class Variant:
    name: str
    index: int
    parent: str | None  # the variant this one changes (None for the first)
    ablation: bool  # True when `from:` named a parent other than the previous rung
    change: str  # what it changed, for the summary table
    reported: float | None
    config: Config  # resolved; seed is set per run


@dataclass
class Run:
    spec: str  # spec group name (with profile suffix)
    variant: Variant
    seed: int
    config: Config
    key: str  # hash of the resolved config

    @property
    def rel_dir(self) -> Path:
        return Path(self.spec) / slug(self.variant.name) / f"seed-{self.seed}"


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
    workers: int = 1  # runs trained at once (a profile's `workers:`; the CLI's --workers overrides)

    @property
    def group(self) -> str:
        """Folder name under results/runs: the spec name, plus ``@profile`` for a profile."""
        return f"{self.name}@{self.profile}" if self.profile else self.name

    def runs(self) -> list[Run]:
        out = []
        for v in self.variants:
            for seed in self.seeds:
                cfg = dataclasses.replace(v.config, seed=seed)
                out.append(Run(self.group, v, seed, cfg, run_key(cfg)))
        return out


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9+._=-]", "_", name)


def run_key(cfg: Config) -> str:
    """Hash of everything that can change a run's result (the data location and thread count cannot)."""
    d = cfg.to_dict()
    d["data"] = {k: v for k, v in d["data"].items() if k != "root"}
    d["train"] = {k: v for k, v in d["train"].items() if k != "threads"}
    return config_hash(d)


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


def describe(leaves: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()

    return ", ".join(f"{k}={fmt(v)}" for k, v in leaves.items())


# --------------------------------------------------------------------------- building configs


def build_config(task: str, raw: dict[str, Any], where: str, seed: int = 0) -> Config:
    """Validate a config dict (sections as in :class:`Config`) and build the Config."""
    from bench.tasks import TASKS

    if task not in TASKS:
        raise ConfigError(f"{where}: {unknown_name_message('task', task, TASKS)}")
    task_obj = TASKS[task]
    regs = registries()
    kwargs: dict[str, Any] = {}
    for section, value in raw.items():
        if section not in CONFIG_SECTIONS:
            raise ConfigError(unknown_key_message(where, section, CONFIG_SECTIONS))
        sw = f"{where}.{section}"
        if section in REGISTRY_SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{sw}: expected a mapping with a 'name', got {type(value).__name__}")
            value = dict(value)
            name = value.pop("name", None)
            if section == "loss" and name in (None, "default"):
                name = task_obj.default_loss
            if name is None:
                raise ConfigError(f"{sw}: missing 'name'; valid choices: {', '.join(sorted(regs[section]))}")
            name = check_value(name, str, f"{sw}.name")
            if name not in regs[section]:
                raise ConfigError(f"{sw}.name: {unknown_name_message(regs[section].kind, name, regs[section])}")
            args = check_factory_kwargs(regs[section][name], value, sw, HARNESS_ARGS[section])
            kwargs[section] = {"name": name, **args}
        else:
            kwargs[section] = build_section(SECTION_TYPES[section], value, sw)
    if "model" not in kwargs:
        raise ConfigError(f"{where}: missing 'model' section")
    kwargs.setdefault("loss", {"name": task_obj.default_loss})
    cfg = Config(task=task, seed=seed, **kwargs)
    if cfg.data.val_fraction is None:
        cfg.data.val_fraction = task_obj.default_val_fraction
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"{where}.data.val_fraction: must be in (0, 1), got {cfg.data.val_fraction}")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(cfg.train, key) < 1:
            raise ConfigError(f"{where}.train.{key}: must be >= 1, got {getattr(cfg.train, key)}")
    return cfg


def config_from_dict(d: dict[str, Any], where: str = "config") -> Config:
    """Rebuild a Config saved with ``Config.to_dict`` (e.g. a run's config.json)."""
    d = dict(d)
    task, seed = d.pop("task"), d.pop("seed", 0)
    cfg = build_config(task, d, where, seed)
    return cfg


# --------------------------------------------------------------------------- loading specs


def _expect(value: Any, tp: type, where: str) -> Any:
    return check_value(value, tp, where)


def _check_mapping(d: Any, allowed: list[str], where: str, what: str = "a mapping") -> None:
    """``d`` must be a dict whose keys are all in ``allowed``."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected {what}, got {type(d).__name__}")
    for key in d:
        if key not in allowed:
            raise ConfigError(unknown_key_message(where, str(key), allowed))


def load_spec(path: str | Path, profile: str | None = None, overrides: list[str] | None = None,
              seeds: list[int] | None = None) -> Spec:
    """Parse and fully validate a spec; raises ConfigError naming the file and key path."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: spec file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        return _build_spec(raw, path, profile, overrides or [], seeds)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.01", "train.epochs=2"]`` -> dotted leaves with YAML-typed values."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=2")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _build_spec(raw: Any, path: Path, profile: str | None, overrides: list[str], seeds_override: list[int] | None) -> Spec:
    _check_mapping(raw, SPEC_KEYS, "(top level)")
    for key in ("task", "base", "variants"):
        if key not in raw:
            raise ConfigError(f"missing required key {key!r}")
    name = _expect(raw.get("name", path.stem), str, "name")
    task = _expect(raw["task"], str, "task")
    seeds = _expect(raw.get("seeds", [0]), list[int], "seeds")
    base = raw["base"]
    if not isinstance(base, dict):
        raise ConfigError(f"base: expected a mapping, got {type(base).__name__}")
    build_config(task, base, "base")  # errors in base are reported as base.*, not per variant

    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ConfigError("profiles: expected a mapping of profile names")
    profile_leaves: dict[str, Any] = {}
    only: list[str] | None = None  # a profile may run a subset of the variants
    workers = 1
    if profile is not None:
        if profile not in profiles:
            raise ConfigError(f"--profile: {unknown_name_message('profile', profile, profiles)}" if profiles
                              else f"--profile {profile!r}: this spec defines no profiles")
    for pname, pdef in profiles.items():
        pw = f"profiles.{pname}"
        _check_mapping(pdef, PROFILE_KEYS, pw)
        leaves = flatten_set(pdef.get("set"), f"{pw}.set")
        build_config(task, apply_set(base, leaves, f"{pw}.set"), f"{pw}.set")
        if pname == profile:
            profile_leaves = leaves
            if "seeds" in pdef:
                seeds = _expect(pdef["seeds"], list[int], f"{pw}.seeds")
            if "variants" in pdef:
                only = _expect(pdef["variants"], list[str], f"{pw}.variants")
            workers = _expect(pdef.get("workers", 1), int, f"{pw}.workers")
    cli_leaves = parse_overrides(overrides)
    if cli_leaves:
        build_config(task, apply_set(base, cli_leaves, "--set"), "--set")
    if seeds_override is not None:
        seeds = list(seeds_override)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: need a non-empty list of distinct integers, got {seeds}")

    rawv = raw["variants"]
    if not isinstance(rawv, list) or not rawv:
        raise ConfigError("variants: expected a non-empty list")
    resolved: dict[str, dict[str, Any]] = {}
    variants: list[Variant] = []
    prev: str | None = None
    for i, v in enumerate(rawv):
        vw = f"variants[{i}]"
        _check_mapping(v, VARIANT_KEYS, vw, "a mapping with at least a 'name'")
        if "name" not in v:
            raise ConfigError(f"{vw}: missing 'name'")
        vname = _expect(v["name"], str, f"{vw}.name")
        vw = f"variants[{i}] ({vname})"
        if vname in resolved:
            raise ConfigError(f"{vw}.name: duplicate variant name {vname!r}")
        if any(slug(vname) == slug(n) for n in resolved):
            raise ConfigError(f"{vw}.name: {vname!r} maps to the same folder as an earlier variant")
        parent = prev
        ablation = False
        if "from" in v:
            parent = _expect(v["from"], str, f"{vw}.from")
            if parent not in resolved:
                why = unknown_name_message("earlier variant", parent, resolved) if resolved else "no earlier variant"
                raise ConfigError(f"{vw}.from: {why}")
            ablation = True  # an explicit `from:` is a leave-one-out check, even of the previous rung
        leaves = flatten_set(v.get("set"), f"{vw}.set")
        cfg_raw = apply_set(resolved[parent] if parent else base, leaves, f"{vw}.set")
        build_config(task, cfg_raw, f"{vw}.set")
        resolved[vname] = cfg_raw
        final = apply_set(apply_set(cfg_raw, profile_leaves, f"profiles.{profile}.set"), cli_leaves, "--set")
        config = build_config(task, final, vw)
        reported = v.get("reported")
        if reported is not None:
            reported = _expect(reported, float, f"{vw}.reported")
        change = describe(leaves) if leaves else ("(base)" if parent is None else "(no change)")
        if ablation:
            change = f"{parent} with {change}"
        if v.get("note"):
            change = f"{_expect(v['note'], str, f'{vw}.note')}: {change}" if leaves else str(v["note"])
        variants.append(Variant(vname, i, parent, ablation, change, reported, config))
        prev = vname
    search = _check_search(raw.get("search"), task, variants, profile_leaves, cli_leaves)
    if only is not None:
        names = [v.name for v in variants]
        for n in only:
            if n not in names:
                raise ConfigError(f"profiles.{profile}.variants: {unknown_name_message('variant', n, names)}")
        variants = [v for v in variants if v.name in only]
    return Spec(name=name, path=str(path), task=task, seeds=seeds, profile=profile, variants=variants,
                description=str(raw.get("description", "")), search=search, workers=workers)


def _check_search(raw: Any, task: str, variants: list[Variant], *leaves: dict[str, Any]) -> dict[str, Any] | None:
    """Validate ``search: {variant, trials, space: {PATH: {low, high[, log, step]} | {choices: [...]}}}``.

    Every path is checked by building the tuned variant's config with the range's ends.
    """
    if raw is None:
        return None
    _check_mapping(raw, SEARCH_KEYS, "search")
    names = [v.name for v in variants]
    vname = _expect(raw.get("variant", names[-1]), str, "search.variant")
    if vname not in names:
        raise ConfigError(f"search.variant: {unknown_name_message('variant', vname, names)}")
    trials = _expect(raw.get("trials", 20), int, "search.trials")
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError("search.space: expected a non-empty mapping of SECTION.KEY to {low, high} or {choices}")
    base = next(v for v in variants if v.name == vname).config.to_dict()
    base.pop("task"), base.pop("seed")
    for lv in leaves:
        base = apply_set(base, lv, "search")
    for path, dist in space.items():
        dw = f"search.space.{path}"
        _check_mapping(dist, DIST_KEYS, dw)
        if "choices" in dist:
            ends = _expect(dist["choices"], list, f"{dw}.choices")
            if not ends or set(dist) - {"choices"}:
                raise ConfigError(f"{dw}: give either a non-empty 'choices' list or 'low' and 'high'")
        else:
            if "low" not in dist or "high" not in dist:
                raise ConfigError(f"{dw}: needs 'low' and 'high' (or 'choices')")
            ends = [_expect(dist["low"], float, f"{dw}.low"), _expect(dist["high"], float, f"{dw}.high")]
            if not ends[0] < ends[1] or (dist.get("log") and ends[0] <= 0):
                raise ConfigError(f"{dw}: need low < high (and low > 0 with log: true), got {ends}")
            if all(isinstance(dist[k], int) for k in ("low", "high")):
                ends = [dist["low"], dist["high"]]
        for end in ends:
            build_config(task, apply_set(base, {str(path): end}, "search.space"), "search.space")
    return {"variant": vname, "trials": trials, "space": space}
