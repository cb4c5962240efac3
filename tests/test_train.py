"""The training loop on small real data: it learns, it repeats, and it resumes exactly."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from bench.factories import build_loss, build_model
from bench.optim import OPTIMIZERS, SCHEDULERS
from bench.spec import load_spec
from bench.tasks import TASKS
from bench.train import _matrix_unit, fit
from tests.helpers import write_spec


@pytest.fixture(scope="module")
def mnist_small(data_root, tmp_path_factory):
    """(spec runs, loaded data): the tiny MNIST budget, data loaded once for the module."""
    path = write_spec(tmp_path_factory.mktemp("spec") / "t.yaml", variants=[{"name": "a"}])
    spec = load_spec(path, overrides=[f"data.root={data_root}", "train.deterministic=true", "train.epochs=3"])
    run = spec.runs()[0]
    data = TASKS["mnist"].load(run.config, torch.device("cpu"))
    return run, data


def test_data_split_and_normalization(mnist_small):
    run, data = mnist_small
    assert len(data.train) == 1000 and len(data.val) == 1200 and len(data.test) == 10000
    assert data.train.x.shape[1:] == (1, 28, 28) and data.train.x.dtype == torch.float32
    assert abs(data.info.mean[0] - 0.1307) < 0.02 and abs(data.info.std[0] - 0.3081) < 0.03
    # Training statistics normalize the training split to about zero mean, unit std.
    assert abs(data.train.x.mean().item()) < 1e-3 and abs(data.train.x.std().item() - 1) < 1e-3


def test_training_lowers_loss_and_is_bitwise_repeatable(mnist_small, tmp_path):
    run, data = mnist_small
    task = TASKS["mnist"]
    r1 = fit(tmp_path / "a", run.config, task, data, torch.device("cpu"), run.key, progress=False)
    r2 = fit(tmp_path / "b", run.config, task, data, torch.device("cpu"), run.key, progress=False)
    h = pd.read_csv(tmp_path / "a" / "metrics.csv")
    assert list(h.epoch) == [1, 2, 3]
    assert h.train_loss.iloc[-1] < h.train_loss.iloc[0] and h.val_loss.iloc[-1] < h.val_loss.iloc[0]
    assert r1["test"]["acc"] > 0.8  # 1,000 images, 3 epochs: far above chance
    assert r1["test"] == r2["test"] and r1["val_best"] == r2["val_best"]
    s1 = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    s2 = torch.load(tmp_path / "b" / "best.pt", weights_only=True)
    assert all(torch.equal(s1["state_dict"][k], s2["state_dict"][k]) for k in s1["state_dict"])
    assert s1["config"]["model"]["name"] == "mnist_cnn" and s1["epoch"] == r1["best_epoch"]
    assert (tmp_path / "a" / "curves.png").stat().st_size > 1000


def test_ema_weights_are_the_ones_validated_and_saved(mnist_small, tmp_path):
    run, data = mnist_small
    task = TASKS["mnist"]
    cfg = run.config.copy()
    cfg.train.epochs, cfg.train.ema = 1, 0.9
    assert cfg.to_dict()["train"]["ema"] == 0.9 and "ema" not in run.config.to_dict()["train"]
    r = fit(tmp_path, cfg, task, data, torch.device("cpu"), "k", progress=False)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)["state_dict"]
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert ema.keys() == best.keys() == last["model"].keys()
    assert all(torch.equal(best[k], ema[k]) for k in best)  # one epoch: the best is the average after it
    floats = [k for k in best if best[k].is_floating_point()]
    assert any("running_mean" in k for k in floats)  # batch-norm buffers are averaged too
    assert all(not torch.equal(best[k], last["model"][k]) for k in floats)  # the average, not the raw weights
    model = build_model(cfg, **task.model_kwargs(data.info))
    model.load_state_dict(best)
    assert task.evaluate(model, data.val, cfg, build_loss(cfg), final=False)[task.metric] == r["val_best"]


@pytest.mark.parametrize("ema", [None, 0.9])
def test_resume_after_interruption_gives_the_same_result(mnist_small, tmp_path, monkeypatch, ema):
    run, data = mnist_small
    task = TASKS["mnist"]
    run = dataclasses.replace(run, config=run.config.copy())
    run.config.train.ema = ema
    full = fit(tmp_path / "full", run.config, task, data, torch.device("cpu"), run.key, progress=False)

    # Interrupt the second run right after its 2nd epoch's checkpoint has been written.
    import bench.train as train_mod

    real_save, calls = train_mod.files.torch_save, []

    def save_then_die(path, obj):
        real_save(path, obj)
        if path.name == "last.pt":
            calls.append(path)
            if len(calls) == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.files, "torch_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "cut", run.config, task, data, torch.device("cpu"), run.key, progress=False)
    monkeypatch.setattr(train_mod.files, "torch_save", real_save)
    assert len(pd.read_csv(tmp_path / "cut" / "metrics.csv")) == 2
    resumed = fit(tmp_path / "cut", run.config, task, data, torch.device("cpu"), run.key, progress=False)
    assert resumed["test"] == full["test"] and resumed["best_epoch"] == full["best_epoch"]
    assert (
        pd.read_csv(tmp_path / "cut" / "metrics.csv")
        .drop(columns=["epoch_time", "train_seconds"])
        .equals(pd.read_csv(tmp_path / "full" / "metrics.csv").drop(columns=["epoch_time", "train_seconds"]))
    )


def test_early_stopping_stops(mnist_small, tmp_path):
    run, data = mnist_small
    # With lr 0 and no batch norm (whose running statistics would still move) nothing can improve.
    cfg = dataclasses.replace(
        run.config,
        optim={"name": "sgd", "lr": 0.0},
        model={**run.config.model, "batch_norm": False, "dropout": 0.0},
        train=dataclasses.replace(run.config.train, patience=1, epochs=10),
    )
    r = fit(tmp_path / "es", cfg, TASKS["mnist"], data, torch.device("cpu"), "k", progress=False)
    assert r["epochs_run"] == 2 and r["stopped_early"] and r["best_epoch"] == 1


@pytest.mark.parametrize(
    "name, kwargs, expect",
    [
        ("step", {"step_size": 2, "gamma": 0.5}, [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]),
        ("exp", {"gamma": 0.5}, [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625, 0.0625]),
        ("none", {}, [1] * 10),
    ],
)
def test_epoch_schedules_stepped_per_iteration(name, kwargs, expect):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = SCHEDULERS[name](opt, 5, 2, **kwargs)  # 5 epochs x 2 steps
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expect)


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_uses_the_fused_kernel_and_makes_the_same_steps(name, cls):
    """With ``fused`` the factories pick PyTorch's fused kernel on the CPU (not by default: the published runs were
    made without it); ten steps land where the for-loop form lands."""
    torch.manual_seed(0)
    weights = [torch.randn(7, 5), torch.randn(5)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(10)]
    ours, plain = [torch.nn.Parameter(w.clone()) for w in weights], [torch.nn.Parameter(w.clone()) for w in weights]
    assert not OPTIMIZERS[name]([torch.nn.Parameter(w.clone()) for w in weights]).defaults["fused"]
    opt = OPTIMIZERS[name](ours, lr=0.1, weight_decay=0.01, beta1=0.7, beta2=0.9, fused=True)
    ref = cls(plain, lr=0.1, weight_decay=0.01, betas=(0.7, 0.9), foreach=False)
    assert opt.defaults["fused"] is True
    for step in grads:
        for params, o in ((ours, opt), (plain, ref)):
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            o.step()
    for a, b, w in zip(ours, plain, weights, strict=True):
        torch.testing.assert_close(a, b)
        assert (a - w).abs().min() > 0.01  # every weight moved: the steps were taken


def test_cosine_and_onecycle_shapes():
    for name in ("cosine", "onecycle"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = SCHEDULERS[name](opt, 4, 10)
        lrs = []
        for _ in range(40):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert max(lrs) == pytest.approx(1.0, rel=0.05) and lrs[-1] < 0.05


def test_evaluation_is_fp32_inside_an_autocast_region():
    """batched_outputs computes in fp32 even when its caller runs under bf16 autocast (as training steps do)."""
    from bench.inference import batched_outputs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    x = torch.randn(20, 1, 12, 12)
    with torch.no_grad():
        ref = model.eval()(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = batched_outputs(model, x, batch=7)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


@pytest.mark.parametrize(
    "flags, unit",
    [
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AMX"),  # an Intel Xeon with AMX
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX512-BF16"),  # an AMD EPYC of the newer kind
        ({"avx2", "avx512f"}, "AVX512"),
        ({"avx2", "fma"}, "AVX2"),  # an AMD EPYC of the older kind: no native bf16
    ],
)
def test_the_machine_line_names_the_cpu_s_matrix_unit(flags, unit):
    """One model name ("AMD EPYC") covers CPUs whose bf16 differs: the record names the unit."""
    assert _matrix_unit(flags) == unit
    assert _matrix_unit(set()) == torch.backends.cpu.get_cpu_capability()  # no /proc/cpuinfo: torch's name


class _CtrlCWhilePickled:
    """Sends this process a SIGINT while torch.save is in the middle of writing it (as a Ctrl-C can)."""

    def __reduce__(self):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGINT)
        return (int, (0,))


def test_ctrl_c_during_a_checkpoint_write_waits_until_the_file_is_whole(tmp_path):
    """A KeyboardInterrupt inside torch.save's writer comes out as a RuntimeError, which a grid took for a failed run
    and went on; the write is finished first, then Ctrl-C is a KeyboardInterrupt (and the file loads)."""
    import signal

    from bench import files

    path = tmp_path / "last.pt"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever earlier tests left
    try:
        with pytest.raises(KeyboardInterrupt):
            files.torch_save(path, {"weights": torch.arange(200_000.0), "mid": _CtrlCWhilePickled()})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.equal(torch.load(path, weights_only=False)["weights"], torch.arange(200_000.0))
    assert not list(tmp_path.glob(".*.tmp"))
