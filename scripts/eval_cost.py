"""What fp32 evaluation costs against bf16-autocast evaluation, on the quick profiles.

    python scripts/eval_cost.py [--results results] [--repeats 5] [--out results/eval_cost.md]

1. Times one validation pass (the one each epoch makes) of a rung of each quick profile in fp32 (how the harness
   evaluates) and in bf16 autocast (how it evaluated before), interleaved, and prints the ratio (median of repeats).
2. Reads the quick groups' records in ``<results>/runs`` (when there) and says what share of their wall time was
   evaluation (validation every epoch, plus the test pass), and so what fp32 evaluation added to the whole profile.
Weights are the freshly initialised network's: evaluation time does not depend on them.  The lines are printed and
written, under a provenance line (command, machine, commit, date), to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench import files
from bench.factories import build_loss, build_model
from bench.runner import resolve_data_root
from bench.spec import load_spec
from bench.store import RunStore
from bench.tasks import TASKS
from bench.train import device_name

RUNGS = [("mnist", "fast"), ("warwick", "+tta")]  # the quick profiles' best rungs (the WARWICK one with 8-fold TTA)


class Bf16(nn.Module):
    """``net`` under bf16 autocast: the evaluation of earlier versions (the harness now turns autocast off)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.net(x).float()


def time_validation(spec_name: str, variant: str, repeats: int) -> tuple[float, float]:
    """Median seconds of one validation pass in (fp32, bf16 autocast)."""
    spec = load_spec(f"ablations/{spec_name}.yaml", "quick")
    run = next(r for r in spec.runs([variant]) if r.seed == spec.seeds[0])
    cfg, task = run.config, TASKS[spec.task]
    cfg.data.root = cfg.data.root or resolve_data_root(None)[0]
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    data = task.load(cfg, torch.device("cpu"), test=False)
    net = build_model(cfg, **task.model_kwargs(data.info)).eval()
    loss = build_loss(cfg)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for name, model in (("fp32", net), ("bf16", Bf16(net))):
            t0 = time.perf_counter()
            task.evaluate(model, data.val, cfg, loss, final=False)
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["fp32"][1:]), statistics.median(times["bf16"][1:])


def evaluation_share(results: str, group: str) -> tuple[float, float] | None:
    """(evaluation seconds, wall seconds) summed over a group's finished runs, from their records."""
    store = RunStore(results)
    if group not in store.groups():
        return None
    evaluation = wall = 0.0
    for run in store.finished(group):
        train_steps = float(files.read_csv(run.dir / "metrics.csv")[-1]["train_seconds"])
        evaluation += (run.result.train_time_s or 0) - train_steps + (run.result.test_time_s or 0)
        wall += (run.result.train_time_s or 0) + (run.result.test_time_s or 0)
    return evaluation, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="results/eval_cost.md")
    args = p.parse_args()
    head = (
        f"`python {' '.join(sys.argv)}` on {device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, commit {files.git_commit()}, {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
    print(head)
    lines = []
    for spec_name, variant in RUNGS:
        fp32, bf16 = time_validation(spec_name, variant, args.repeats)
        line = (
            f"{spec_name}@quick {variant}: one validation pass fp32 {fp32 * 1e3:.0f} ms, bf16 autocast "
            f"{bf16 * 1e3:.0f} ms (fp32/bf16 = {fp32 / bf16:.2f})"
        )
        share = evaluation_share(args.results, f"{spec_name}@quick")
        if share:
            ev, wall = share
            extra = ev * (1 - bf16 / fp32)  # what the same evaluation would have saved in bf16
            line += (
                f"; the group's records: evaluation {ev:.0f} s of {wall:.0f} s of run time ({ev / wall:.0%}), so "
                f"fp32 evaluation adds about {extra:.0f} s ({extra / (wall - extra):.1%}) to the profile"
            )
        print(line, flush=True)
        lines.append(f"- {line}")
    files.write_text(
        Path(args.out), "\n".join(["# fp32 evaluation against bf16 autocast evaluation", "", head, "", *lines, ""])
    )


if __name__ == "__main__":
    main()
