"""The pieces of `bench perf` and of the speed work: FLOP counting, time to target, the textbook
reference loop, the speed-only config keys, and the measured choice of workers."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.config import ConfigError
from bench.files import read_csv
from bench.perf import (
    QUALITY_HEAD,
    STRETCH,
    Leg,
    Reference,
    SeedRun,
    TaskPerf,
    _choices,
    _quality_table,
    fast_rung,
    grid_speedup,
    matmul_flops_per_s,
    report_rung,
    step_rate,
    train_to_targets,
    training_flops,
    write_perf,
)
from bench.reference import check_recipe, train_reference
from bench.spec import load_spec, run_key, split_overrides
from bench.tasks import TASKS
from bench.train import HISTORY_KEYS, time_to_target
from bench.workers import choose_cpu_workers, cuda_workers
from tests.helpers import write_spec

# --------------------------------------------------------------------------- FLOPs


def test_training_flops_match_a_hand_count():
    """Conv2d(1->2, 3x3, no bias) on one 4x4 image, then Linear(8->3): counted by hand.

    conv forward: 2x2 outputs x 2 channels x 9 MACs = 72 MACs = 144 FLOPs; its backward needs only the
    weight gradient (the input needs none): 144.  linear forward 8x3 = 24 MACs = 48 FLOPs; backward:
    input gradient 48 and weight gradient 48.  Total 144 + 144 + 48 + 96 = 432."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.Flatten(), nn.Linear(8, 3, bias=False))
    x = torch.randn(1, 1, 4, 4)
    assert training_flops(model, lambda out, y: out.sum(), x, None) == 432
    assert all(p.grad is None for p in model.parameters())  # the counting step leaves no gradients behind


def test_training_flops_scale_with_the_batch():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    one = training_flops(model, lambda o, y: o.sum(), torch.randn(1, 1, 8, 8), None)
    assert training_flops(model, lambda o, y: o.sum(), torch.randn(5, 1, 8, 8), None) == 5 * one


def test_matmul_peak_is_a_positive_rate():
    assert matmul_flops_per_s(torch.device("cpu"), torch.float32, n=64, seconds=0.05) > 1e6


# --------------------------------------------------------------------------- time to target


def write_metrics(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_KEYS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def row(epoch: int, val: float, epoch_time: float, train_seconds: float | str) -> dict:
    return {
        "epoch": epoch,
        "train_loss": 1,
        "train_metric": 0.5,
        "val_loss": 1,
        "val_metric": val,
        "lr": 0.1,
        "epoch_time": epoch_time,
        "train_seconds": train_seconds,
    }


def test_time_to_target_reads_the_first_epoch_that_reaches_it(tmp_path):
    path = write_metrics(
        tmp_path / "metrics.csv",
        [row(1, 0.97, 12.0, 10.0), row(2, 0.991, 12.0, 20.5), row(3, 0.993, 12.0, 31.0), row(4, 0.990, 12.0, 41.0)],
    )
    history = read_csv(path)
    assert time_to_target(history, 0.992) == (3, 31.0)
    assert time_to_target(history, 0.991) == (2, 20.5)  # reaching means >=
    assert time_to_target(history, 0.97) == (1, 10.0)
    assert time_to_target(history, 0.999) is None
    assert time_to_target([], 0.5) is None
    assert read_csv(tmp_path / "missing.csv") == []


def test_time_to_target_of_an_old_history_sums_whole_epochs(tmp_path):
    """metrics.csv files written before `train_seconds` existed: the epochs' own times are summed."""
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,train_loss,train_metric,val_loss,val_metric,lr,epoch_time\n"
        "1,1,0.5,1,0.90,0.1,7.5\n2,1,0.5,1,0.95,0.1,8.0\n"
    )
    assert time_to_target(read_csv(path), 0.95) == (2, 15.5)


# --------------------------------------------------------------------------- the reference loop


def report_config(data_root: Path, task: str = "mnist"):
    spec = load_spec(Path(__file__).resolve().parents[1] / "ablations" / f"{task}.yaml")
    name = report_rung(spec)
    cfg = next(r for r in spec.runs([name]) if r.seed == 0).config.copy()
    cfg.data.root = str(data_root)
    return name, cfg


def test_the_fast_rung_of_each_task_is_a_rung_of_its_spec_and_runs_its_whole_recipe_in_every_profile():
    """`bench perf` times `lean-strided` on MNIST (and `lean-long` toward the stretch target) and `fast` on WARWICK;
    the quick MNIST table shows both MNIST rungs as perf trains them."""
    for task, name in (("mnist", "lean-strided"), ("warwick", "fast")):
        assert fast_rung(task) == name
        spec = load_spec(Path(__file__).resolve().parents[1] / "ablations" / f"{task}.yaml")
        assert name in [v.name for v in spec.variants]
    full, quick = (
        load_spec(Path(__file__).resolve().parents[1] / "ablations" / "mnist.yaml", p) for p in (None, "quick")
    )
    assert STRETCH["mnist"] == (0.995, "lean-long")
    for name, epochs, strided in (("lean-strided", 2, 2), ("lean-long", 8, 1)):  # the fast rung and the stretch rung
        cfg = {
            s: next(v for v in spec.variants if v.name == name).config for s, spec in (("full", full), ("quick", quick))
        }
        assert cfg["quick"].to_dict() == cfg["full"].to_dict()
        assert cfg["full"].model == {"name": "lean_cnn", "strided": strided} and cfg["full"].train.epochs == epochs


def test_the_report_rung_is_the_one_with_the_best_reported_number():
    for task, name in (("mnist", "+steplr"), ("warwick", "slower-decay")):
        spec = load_spec(Path(__file__).resolve().parents[1] / "ablations" / f"{task}.yaml")
        assert report_rung(spec) == name


def test_reference_loop_runs_a_few_steps_of_the_report_recipe(data_root):
    torch.set_num_threads(2)
    _, cfg = report_config(data_root)
    ref = train_reference("mnist", cfg, torch.device("cpu"), max_steps=3)
    assert (ref.steps, ref.images, ref.steps_per_epoch) == (3, 3 * 64, 860)  # 55,000 / 64 rounded up
    assert ref.train_seconds > 0 and ref.history == []  # stopped inside the first epoch: no validation pass
    assert ref.seconds_per_epoch == pytest.approx(ref.train_seconds / 3 * 860)


def test_reference_loop_validates_each_epoch_and_stops_at_the_target(tmp_path, make_warwick):
    _, cfg = report_config(make_warwick(tmp_path / "data" / "WARWICK", n_train=8, n_test=2).parent, "warwick")
    cfg.model["width"] = 4
    ref = train_reference("warwick", cfg, torch.device("cpu"), max_epochs=3, target=0.0)  # any Dice reaches 0
    assert [h["epoch"] for h in ref.history] == [1]
    assert 0 <= ref.history[0]["val_metric"] <= 1 and ref.history[0]["train_seconds"] == ref.train_seconds
    ref = train_reference("warwick", cfg, torch.device("cpu"), max_epochs=2)
    assert [h["epoch"] for h in ref.history] == [1, 2]


def test_reference_loop_refuses_recipes_it_does_not_implement(data_root):
    _, cfg = report_config(data_root)
    cfg.optim = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01}
    with pytest.raises(ConfigError, match="report's recipe only.*adamw"):
        check_recipe(cfg)


# --------------------------------------------------------------------------- the harness side


def tiny_mnist(tmp_path, data_root, **train):
    spec = load_spec(write_spec(tmp_path / "s.yaml"))
    cfg = spec.runs(["a"])[0].config.copy()
    cfg.data.root = str(data_root)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg, TASKS["mnist"], TASKS["mnist"].load(cfg, torch.device("cpu"))


def test_train_to_targets_stops_once_every_target_is_reached_and_scores_test(tmp_path, data_root):
    cfg, task, data = tiny_mnist(tmp_path, data_root, epochs=5)
    out = train_to_targets(cfg, task, data, torch.device("cpu"), [0.1, 0.2])
    assert out.epochs == 1 and out.test is None  # both reached after the first epoch; not run to the end
    assert set(out.hits) == {0.1, 0.2}
    epoch, seconds, test = out.hits[0.1]
    assert epoch == 1 and 0 < seconds and 0.2 < test <= 1.0
    assert out.images == 1000
    never = train_to_targets(cfg.copy(seed=1), task, data, torch.device("cpu"), [1.01])  # unreachable
    assert never.epochs == 5 and never.hits == {}
    end = train_to_targets(cfg, task, data, torch.device("cpu"), [0.1], to_the_end=True)
    assert end.epochs == 5 and 1 <= end.best_epoch <= 5 and 0.2 < end.test <= 1.0 and end.hits[0.1][0] == 1


def test_step_rate_with_and_without_the_speed_choices(tmp_path, data_root):
    cfg, task, data = tiny_mnist(tmp_path, data_root)
    for changes in ({}, {"channels_last": False}):
        c = cfg.copy()
        for k, v in changes.items():
            setattr(c.train, k, v)
        rate, first = step_rate(c, task, data, torch.device("cpu"), seconds=0.2)
        assert rate > 0 and first > 0
    assert step_rate(cfg, task, data, torch.device("cpu"), sync_per_step=True, seconds=0.2)[0] > 0


def test_speed_choices_keep_each_choice_s_fastest_round_and_skip_a_choice_that_is_the_default(
    tmp_path, data_root, monkeypatch
):
    """On an fp32 default there is no "fp32 (no bf16 autocast)" row (it would time the default against itself);
    each choice keeps its fastest of the alternating rounds and its first round's first-step seconds."""
    cfg, task, data = tiny_mnist(tmp_path, data_root)
    cfg.train.amp = False
    rates = iter(range(1, 100))
    calls = []

    def fake_rate(c, task, data, device, sync_per_step=False, seconds=1.0):
        calls.append((c.train.channels_last, sync_per_step))
        return float(next(rates)) * (1 if len(calls) % 2 else -1) + 100, float(len(calls))

    monkeypatch.setattr("bench.perf.step_rate", fake_rate)
    out = _choices(cfg, task, data, torch.device("cpu"), compile_too=False, rounds=2)
    assert [name for name, _, _ in out] == [
        "default (channels-last, fp32, one sync per epoch)",
        "contiguous (NCHW) layout",
        "a .item() sync after every step",
    ]
    assert calls == [(True, False), (False, False), (True, True)] * 2  # alternating rounds
    # calls 1-6 return 101, 98, 103 (round 1) and 96, 105, 94 (round 2): each choice's best, round 1's first steps
    assert out == [(out[0][0], 101.0, 1.0), (out[1][0], 105.0, 2.0), (out[2][0], 103.0, 3.0)]


def test_time_to_quality_table_from_known_runs():
    """The fast rung's two seeds toward the spec's target, the stretch rung's two toward its own (one reaching it on
    validation, both on test at the end); the reference reached the spec's target in 7 epochs, 120 s."""
    fast = [
        SeedRun(0, {0.99: (3, 10.0, 0.991)}, 10, 600, 40.0, 9, 0.987),
        SeedRun(1, {0.99: (5, 14.0, 0.989)}, 10, 600, 44.0, 7, 0.996),
    ]
    stretch = [SeedRun(0, {0.995: (8, 30.0, 0.994)}, 8, 480, 32.0, 8, 0.996), SeedRun(1, {}, 8, 480, 36.0, 6, 0.995)]
    legs = [Leg("lean", 10, 0.99, fast), Leg("lean-long", 8, 0.995, stretch)]
    ref = Reference("report", 120.0, 7, 20, "measured", 50.0)
    spec = SimpleNamespace(target=0.99)  # what the table reads
    lines, rows = _quality_table(spec, TASKS["mnist"], legs, ref, True)
    table = {
        line.split("|")[1].strip() + " " + line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:-1]]
        for line in lines[0].splitlines()[2:]
    }
    assert lines[0].splitlines()[0].count("|") == len(QUALITY_HEAD) + 1
    assert list(table) == [
        "99.00 % on validation `lean` (harness)",
        "99.00 % on test `lean` to its end (10 epochs, best validation epoch)",
        "99.50 % on validation `lean-long` (harness)",
        "99.50 % on test `lean-long` to its end (8 epochs, best validation epoch)",
        "99.00 % on validation `report` (textbook loop)",
    ]
    assert table["99.00 % on validation `lean` (harness)"] == [
        "2 of 2",
        "4.0",
        "12.0 (10.0–14.0)",
        "99.10 %, 98.90 %",
        "10.0×",
    ]  # 120 s / 12 s: the spec's target only
    end = "99.00 % on test `lean` to its end (10 epochs, best validation epoch)"
    assert table[end] == ["1 of 2", "8.0", "42.0 (40.0–44.0)", "98.70 %, 99.60 %", "2.9×"]  # 120 s / 42 s
    assert table["99.50 % on validation `lean-long` (harness)"] == ["1 of 2", "8.0", "30.0 (30.0–30.0)", "99.40 %", ""]
    end = "99.50 % on test `lean-long` to its end (8 epochs, best validation epoch)"
    assert table[end] == ["2 of 2", "7.0", "34.0 (32.0–36.0)", "99.60 %, 99.50 %", ""]  # no reference for the stretch
    assert table["99.00 % on validation `report` (textbook loop)"] == ["1 of 1", "7", "120 (extrapolated)", "–", "1.0×"]
    what = [(r["what"], r["recipe"], r["target"]) for r in rows]
    assert what == [("time_to_target", "lean", 0.99)] * 2 + [("recipe_end", "lean", 0.99)] * 2 + [
        ("time_to_target", "lean-long", 0.995)
    ] * 2 + [("recipe_end", "lean-long", 0.995)] * 2 + [("time_to_target", "reference:report", 0.99)]
    assert rows[5]["epoch"] is None and rows[6]["test"] == 0.996  # seed 1 missed the stretch on validation only


def test_write_perf_keeps_other_modes_and_tasks(tmp_path):
    a = TaskPerf("mnist", [{"task": "mnist", "mode": "quick", "what": "throughput", "images_per_s": 10}], ["table A"])
    b = TaskPerf(
        "warwick", [{"task": "warwick", "mode": "quick", "what": "throughput", "images_per_s": 5}], ["table B"]
    )
    write_perf(tmp_path, [a, b], True, ["- command: `x`"])
    a2 = TaskPerf("mnist", [{"task": "mnist", "mode": "quick", "what": "throughput", "images_per_s": 20}], ["table A2"])
    md, csv_path = write_perf(tmp_path, [a2], True, ["- command: `y`"])
    text = md.read_text()
    assert "table A2" in text and "table B" in text and "table A\n" not in text
    rows = list(csv.DictReader(open(csv_path)))
    assert sorted((r["task"], r["images_per_s"]) for r in rows) == [("mnist", "20"), ("warwick", "5")]


# --------------------------------------------------------------------------- speed keys and workers


def test_speed_keys_change_neither_the_run_key_nor_the_group(tmp_path):
    spec = load_spec(write_spec(tmp_path / "s.yaml"))
    cfg = spec.runs(["a"])[0].config
    fast = cfg.copy()
    fast.train.channels_last, fast.train.compile, fast.train.threads = False, "default", 7
    assert run_key(fast) == run_key(cfg)
    config, runtime = split_overrides(["train.channels_last=false", "train.compile=reduce-overhead", "optim.lr=0.1"])
    assert config == ["optim.lr=0.1"] and runtime == {"channels_last": False, "compile": "reduce-overhead"}
    with pytest.raises(ConfigError, match="train.compile.*'none', 'default', 'reduce-overhead'"):
        split_overrides(["train.compile=fast"])


def test_cuda_workers_fill_free_memory_within_cores_and_runs():
    gib = 1 << 30
    assert cuda_workers(free=80 * gib, per_run=2 * gib, n_runs=30, cores=16) == 16  # cores bind
    assert cuda_workers(free=10 * gib, per_run=2 * gib, n_runs=30, cores=16) == 4  # 90 % of 10 GiB / 2 GiB
    assert cuda_workers(free=80 * gib, per_run=2 * gib, n_runs=3, cores=16) == 3  # runs bind
    assert cuda_workers(free=10 * gib, per_run=2 * gib, n_runs=30, cores=16, gpus=2) == 8  # 4 on each of 2 GPUs
    assert cuda_workers(free=1 * gib, per_run=2 * gib, n_runs=3, cores=16) == 1  # never fewer than one


def test_cpu_workers_are_measured_over_every_split(tmp_path, data_root):
    cfg, task, data = tiny_mnist(tmp_path, data_root)
    n, why = choose_cpu_workers(cfg, task, data, n_runs=4, cores=2)
    assert n in (1, 2) and "1x2 threads" in why and "2x1 threads" in why
    assert choose_cpu_workers(cfg, task, data, n_runs=1, cores=2) == (1, "one run or one core")


@pytest.mark.slow  # tox -e slow: the default suite stays under ~10 minutes on 2 cores
def test_grid_speedup_trains_every_run_both_ways(tmp_path, data_root):
    spec = write_spec(tmp_path / "g.yaml", seeds=[0, 1])
    lines, rows = grid_speedup(spec, str(data_root), torch.device("cpu"), workers=2)
    assert "one epoch of each of the 4 runs of the full `g` spec" in lines[0] and "with 2 workers at once" in lines[0]
    assert [(r["what"], r["workers"]) for r in rows] == [("grid_sequential", 1), ("grid_concurrent", 2)]
    assert all(r["train_seconds"] > 0 for r in rows)
