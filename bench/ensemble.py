"""Seed ensembles: a rung that trains nothing, made of the finished runs (different seeds) of another rung.

A spec's variant ``ensemble: {of: +tta, size: 3}`` (see :class:`bench.spec.EnsembleDef`: which seeds make the
ensemble of each seed) is evaluated once its members are finished: their ``best.pt`` weights are loaded into one
:class:`Ensemble` module, whose output is the logit of the members' mean probability, and that module is scored
by the task's own ``evaluate`` on validation and test, exactly as a trained run's best epoch is (with TTA when the
ensemble's ``eval.tta`` says so: the mean over the 8 flips/rotations of the members' mean, i.e. the mean of every
member's TTA probability).  Its folder is a run folder like any other: ``config.json`` (its config, its members),
``best.pt`` (every member's weights: what was evaluated, so export, rescore and figures load it as they load a
run) and ``result.json`` (its metrics and members; the parameters, epochs and training seconds of its members
summed: what it cost to make).  So the summary, the paired tests, ``bench rescore`` and the exporters treat it as
one more rung; its ONNX export is one graph holding every member.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench import files
from bench.config import Config
from bench.factories import build_loss, build_model
from bench.inference import EVAL_PRECISION
from bench.records import read_record
from bench.spec import Run, config_from_dict, ensemble_key
from bench.tasks.base import Data, Task
from bench.train import device_name

EPS = 1e-6  # probabilities are clamped to [EPS, 1 - EPS] before they are turned back into logits


class Ensemble(nn.Module):
    """The mean probability of ``members`` (same input, same output shape), returned as a logit so that it means
    what one member's output does: segmentation (one channel) ``sigmoid(out)`` is the mean of the members'
    sigmoids; classification ``softmax(out)`` the mean of their softmaxes.  ``multiple``: what the input's height
    and width are padded to, the largest of the members' (segmentation)."""

    def __init__(self, members: list[nn.Module], segmentation: bool):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.segmentation = segmentation
        multiples = [int(getattr(m, "multiple", 1)) for m in members]
        self.multiple = max(multiples)

    def forward(self, x: Tensor) -> Tensor:
        if self.segmentation:
            p = torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0).clamp(EPS, 1 - EPS)
            return torch.log(p) - torch.log1p(-p)
        p = torch.stack([torch.softmax(m(x).float(), 1) for m in self.members]).mean(0)
        return torch.log(p.clamp_min(EPS))


def build_ensemble(checkpoint: dict[str, Any], cfg: Config, task: Task, kwargs: dict[str, Any]) -> Ensemble:
    """The :class:`Ensemble` of an ensemble's ``best.pt`` (``members``: each member's config and weights)."""
    models = []
    for m in checkpoint["members"]:
        net = build_model(config_from_dict(m["config"], where="best.pt member"), **kwargs)
        net.load_state_dict(m["state_dict"])
        models.append(net.eval())
    return Ensemble(models, task.kind == "segmentation").eval()


def write_checkpoint(
    run_dir: Path,
    key: str,
    config: dict[str, Any],
    data_info: dict[str, Any],
    member_dirs: list[Path],
    member_keys: list[str],
) -> dict[str, Any]:
    """The ensemble's ``best.pt`` in ``run_dir``: its config and every member's weights, read from the members'
    own ``best.pt`` (each checked to hold the member's key); returned as written."""
    cks = [torch.load(d / "best.pt", map_location="cpu", weights_only=True) for d in member_dirs]
    for d, ck, want in zip(member_dirs, cks, member_keys, strict=True):
        if ck["key"] != want:
            raise ValueError(f"{d / 'best.pt'}: key {ck['key']}, not the member's {want} (trained with another config)")
    checkpoint = {
        "config": config,
        "data_info": data_info,
        "key": key,
        "members": [{"config": ck["config"], "state_dict": ck["state_dict"], "key": ck["key"]} for ck in cks],
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    files.torch_save(run_dir / "best.pt", checkpoint)
    return checkpoint


SCORES = ("test", "test_raw", "postprocess", "val_best", "test_time_s")  # what evaluate scores (the rest: bookkeeping)


def scored_alike(run: Run) -> str:
    """Two ensemble runs with the same value score the same (their configs differ only in the seed, which nothing
    evaluated depends on, and they hold the same members in the same order): e.g. every seed of an ensemble of every
    seed, whose rows are one ensemble."""
    return ensemble_key(run.config.copy(seed=0), [m.key for m in run.members])


def evaluate(
    run: Run,
    run_dir: Path,
    member_dirs: list[Path],
    task: Task,
    data: Data,
    device: torch.device,
    meta: dict[str, Any],
    scores: dict[str, Any] | None = None,
    weights: list[Path] | None = None,
) -> dict[str, Any]:
    """Write the ensemble's config.json and best.pt (its members' weights) in ``run_dir``, score it on validation
    (``task.evaluate``) and test (``task.test_record``: with ``eval.postprocess``, the post-processing chosen on
    validation too), as ``train.finish`` scores a run's best epoch; the result (for ``result.json``).  ``scores``
    (the :data:`SCORES` of a run :func:`scored_alike`) are taken instead of scoring again.  ``weights``: the folders
    holding the members' best.pt, when not their own ``member_dirs`` (a member trained again for its checkpoint,
    whose record, and so what it cost, stays the one in its own folder)."""
    cfg = run.config
    records = [read_record(d) for d in member_dirs]
    members = [
        {"run": f"{d.parent.name}/{d.name}", "seed": m.seed, "key": m.key}
        for d, m in zip(member_dirs, run.members, strict=True)
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(
        run_dir / "config.json",
        {"key": run.key, **meta, "config": cfg.to_dict(), "data_info": data.info.to_dict(), "members": members},
    )
    checkpoint = write_checkpoint(
        run_dir, run.key, cfg.to_dict(), data.info.to_dict(), weights or member_dirs, [m.key for m in run.members]
    )
    model = build_ensemble(checkpoint, cfg, task, task.model_kwargs(data.info)).to(device)
    if scores is None:
        loss_fn = build_loss(cfg)
        val = task.evaluate(model, data.val, cfg, loss_fn, final=False)[task.metric]
        t0 = time.perf_counter()
        scores = {**task.test_record(model, data, cfg, loss_fn), "val_best": val}
        scores["test_time_s"] = time.perf_counter() - t0
    return {
        "key": run.key,
        **meta,
        **scores,
        # what the ensemble cost to make: its members' training, summed
        "best_epoch": sum(r.best_epoch or 0 for r in records),
        "epochs_run": sum(r.epochs_run or 0 for r in records),
        "train_time_s": sum(r.train_time_s or 0.0 for r in records),
        "params": sum(p.numel() for p in model.parameters()),
        "members": members,
        "device": str(device),
        "device_name": device_name(device),
        "train_precision": records[0].train_precision,
        "eval_precision": EVAL_PRECISION,
        "torch": torch.__version__,
        "commit": files.git_commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
