"""Config sections -> objects: the one place a registry section (``{"name": ..., **kwargs}``) is
split into a factory and its keyword arguments, both to check a spec and to build a run.

A section names a factory of its registry; its other keys are the factory's keyword
arguments, checked against the signature (types and ranges, see ``bench.config``).  The
arguments in :data:`HARNESS_ARGS` are supplied by the harness and may not come from a spec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench.config import Config, ConfigError, check_factory_kwargs, check_value
from bench.losses import LOSSES, LossFn
from bench.models import MODELS
from bench.optim import OPTIMIZERS, SCHEDULERS
from bench.registry import Registry, UnknownName

REGISTRIES: dict[str, Registry] = {"model": MODELS, "optim": OPTIMIZERS, "sched": SCHEDULERS, "loss": LOSSES}

# Factory parameters the harness supplies itself; a spec may not set them.
HARNESS_ARGS = {
    "model": ("in_channels", "num_classes"),
    "optim": ("params",),
    "sched": ("optimizer", "epochs", "steps_per_epoch"),
    "loss": (),
}


def factory(section: str, d: dict[str, Any]) -> tuple[Callable[..., Any], dict[str, Any]]:
    """(factory, keyword arguments) of a validated section dict ``{"name": ..., **kwargs}``."""
    kwargs = dict(d)
    return REGISTRIES[section].get_or_raise(kwargs.pop("name")), kwargs


def check_section(section: str, raw: Any, where: str, default_name: str | None = None) -> dict[str, Any]:
    """Validate a registry section of a spec: ``{"name": NAME, **kwargs}`` with NAME in the registry
    (``default_name`` when absent) and kwargs that the factory accepts; returns the checked dict."""
    reg = REGISTRIES[section]
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'name', got {type(raw).__name__}")
    raw = dict(raw)
    name = raw.pop("name", None) or default_name
    if name is None:
        raise ConfigError(f"{where}: missing 'name'; valid choices: {', '.join(reg.names())}")
    name = check_value(name, str, f"{where}.name")
    try:
        fn = reg.get_or_raise(name)
    except UnknownName as e:
        raise ConfigError(f"{where}.name: {e}") from None
    return {"name": name, **check_factory_kwargs(fn, raw, where, HARNESS_ARGS[section], needs=HARNESS_ARGS[section])}


def build_model(cfg: Config, **task_args: Any) -> nn.Module:
    """The run's network; ``task_args`` are the task's ``model_kwargs`` (in_channels, num_classes)."""
    fn, kwargs = factory("model", cfg.model)
    return fn(**task_args, **kwargs)


def build_loss(cfg: Config) -> LossFn:
    fn, kwargs = factory("loss", cfg.loss)
    return fn(**kwargs)


def build_optimizer(cfg: Config, model: nn.Module, steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
    """(optimizer, scheduler stepped once per iteration) for ``model``."""
    fn, kwargs = factory("optim", cfg.optim)
    opt = fn(model.parameters(), **kwargs)
    fn, kwargs = factory("sched", cfg.sched)
    return opt, fn(opt, cfg.train.epochs, steps_per_epoch, **kwargs)
