"""The command line as a user types it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench.cli import main
from tests.helpers import TINY_MNIST_BASE, write_spec

REPO = Path(__file__).resolve().parents[1]


def test_misspelt_key_fails_at_once_naming_file_and_key(tmp_path, capsys):
    path = write_spec(tmp_path / "typo.yaml", variants=[{"name": "a", "set": {"model": {"batchnorm": True}}}])
    assert main(["run", str(path), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "variants[0] (a).set.model: unknown key 'batchnorm'" in err
    assert "valid keys (closest first): batch_norm" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing was trained or written


def test_dry_run_lists_runs_and_their_group(tmp_path, capsys):
    path = write_spec(tmp_path / "d.yaml", seeds=[0, 1])
    assert main(["run", str(path), "--dry-run", "--results", str(tmp_path / "r")]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 4 and out.startswith("todo  d/a/seed-0  key=") and "published group d;" in err
    assert main(["run", str(path), "--dry-run", "--set", "optim.lr=0.5", "--seeds", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("todo  d--optim.lr=0.5,seeds=3/a/seed-3") and "ad-hoc group d--optim.lr=0.5,seeds=3;" in err
    # an override that leaves every config as the spec has it is no experiment: the published group
    assert main(["run", str(path), "--dry-run", "--set", "train.epochs=2", "--set", "train.threads=1"]) == 0
    assert capsys.readouterr().out.startswith("todo  d/a/seed-0")
    assert not (tmp_path / "r").exists()


def test_an_experiment_cannot_borrow_the_published_group_s_name(tmp_path, capsys):
    path = write_spec(tmp_path / "p.yaml")
    assert main(["run", str(path), "--dry-run", "--set", "optim.lr=0.5", "--group", "p"]) == 2
    assert "that name is the published group" in capsys.readouterr().err
    assert main(["run", str(path), "--dry-run", "--set", "optim.lr=0.5", "--group", "my/lr"]) == 2
    assert "must be a non-empty folder name" in capsys.readouterr().err
    assert main(["run", str(path), "--dry-run", "--set", "optim.lr=0.5", "--group", "lr-sweep"]) == 0
    assert capsys.readouterr().out.startswith("todo  lr-sweep/a/seed-0")


@pytest.mark.parametrize(
    "device, expected",
    [
        ("gpu", "--device gpu: not a device; valid: auto, cpu, cuda, cuda:N"),
        ("cuda:x", "not a device"),
    ],
)
def test_bad_device_is_one_clear_line(tmp_path, capsys, device, expected):
    path = write_spec(tmp_path / "dev.yaml")
    assert main(["run", str(path), "--device", device, "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.startswith("error: --device") and err.count("\n") == 1  # one line
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_a_device_this_machine_lacks_is_refused_before_anything_runs(tmp_path, capsys, device):
    path = write_spec(tmp_path / "dev.yaml")
    assert main(["run", str(path), "--device", device, "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"error: --device {device}: " in err and "use --device cpu" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_short_spec_names_and_version(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["run", "mnist", "--profile", "quick", "--dry-run"]) == 0
    assert "ablations/mnist.yaml: published group mnist@quick; 13 variants x 2 seeds" in capsys.readouterr().err
    assert main(["run", "mnst", "--dry-run"]) == 2
    assert "ablations/mnst.yaml: spec file not found; specs in ablations/: mnist, warwick" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("bench 0.")


def test_unknown_variant_and_profile(tmp_path, capsys):
    path = write_spec(tmp_path / "v.yaml")
    assert main(["run", str(path), "--variants", "bb", "--dry-run"]) == 2
    assert "unknown variant 'bb'; valid choices (closest first): b, a" in capsys.readouterr().err
    assert main(["run", str(path), "--profile", "quick", "--dry-run"]) == 2
    assert "defines no profiles" in capsys.readouterr().err


def test_run_then_summary_end_to_end(data_root, tmp_path, capsys):
    path = write_spec(
        tmp_path / "e2e.yaml", seeds=[0], base={**TINY_MNIST_BASE, "train": {**TINY_MNIST_BASE["train"], "epochs": 1}}
    )
    res = tmp_path / "results"
    code = main(
        ["run", str(path), "--data-root", str(data_root), "--results", str(res), "--no-progress", "--workers", "1"]
    )  # in this process, so that its output is captured
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["done e2e a seed 0", "done e2e b seed 0"]  # one line per run
    for v in ("a", "b"):
        r = json.loads((res / "runs" / "e2e" / v / "seed-0" / "result.json").read_text())
        assert 0.2 < r["test"]["acc"] <= 1 and r["epochs_run"] == 1 and r["params"] > 0  # chance is 0.1
        assert r["stopped_early"] is False  # every epoch ran
        cfg = json.loads((res / "runs" / "e2e" / v / "seed-0" / "config.json").read_text())
        assert cfg["config"]["train"]["epochs"] == 1 and cfg["data_info"]["n_train"] == 1000
    assert oct((res / "summary.md").stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # readable like any file
    (res / "summary.md").unlink()
    assert main(["summary", "--results", str(res)]) == 0
    text = (res / "summary.md").read_text()
    assert "## e2e (mnist" in text and "optim.lr=0.001" in text


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["run", "--help"],
        ["tune", "--help"],
        ["summary", "--help"],
        ["reproduce", "--help"],
        ["predict", "--help"],
    ],
)
def test_help_describes_every_option(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits after printing help
        code = e.code
    out = capsys.readouterr().out
    assert code == 0 and "usage" in out
    for action in _actions(argv[0]):
        assert action.help, f"{argv[0]}: {action.option_strings or action.dest} has no help text"


def _actions(command: str) -> list:
    """The argparse actions of ``command`` (``--help``: the top level), without argparse's own."""
    import argparse

    from bench.cli import build_parser
    from exporters.predict import build_parser as predict_parser

    top = build_parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    parser = {"--help": top, "predict": predict_parser()}.get(command) or subs.choices[command]
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def test_spec_file_is_yaml_with_reported_numbers():
    from pathlib import Path

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "ablations" / "mnist.yaml").read_text())
    assert [v.get("reported") for v in spec["variants"][:4]] == [0.982, 0.990, 0.990, 0.992]


def test_an_experiment_cannot_take_over_another_group(tmp_path, capsys):
    res = tmp_path / "r"
    (tmp_path / "elsewhere").mkdir()  # a spec in another folder: only the results folder knows its group
    other = write_spec(tmp_path / "elsewhere" / "other.yaml")
    from bench.spec import load_spec
    from bench.store import RunStore

    RunStore(res).write_group(load_spec(other))  # another spec's published group
    path = write_spec(tmp_path / "p.yaml")
    for group, expected in (
        ("", "--group '': must be a non-empty folder name"),
        ("other", "holds the published group of spec 'other'"),
        ("p@quick", "must be a non-empty folder name"),
    ):
        assert (
            main(
                [
                    "run",
                    str(path),
                    "--set",
                    "optim.lr=0.5",
                    "--group",
                    group,
                    "--results",
                    str(res),
                    "--data-root",
                    "/nonexistent",
                ]
            )
            == 2
        )
        assert expected in capsys.readouterr().err
    assert RunStore(res).read_group("other").role == "published"


def test_experiment_seeds_among_the_spec_s_are_one_group_and_runtime_sets_are_no_experiment(tmp_path, capsys):
    path = write_spec(tmp_path / "s.yaml", seeds=[0, 1])
    assert main(["run", str(path), "--dry-run", "--set", "optim.lr=0.5", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("todo  s--optim.lr=0.5/a/seed-1") and "seed-0" not in out  # same group as without --seeds
    assert main(["run", str(path), "--dry-run", "--set", "train.device=cpu", "--set", "data.root=/x"]) == 0
    assert capsys.readouterr().out.startswith("todo  s/a/seed-0")  # where runs run is not what they compute


def test_the_left_out_note_names_only_the_variants_asked_for(tmp_path, capsys):
    """--set of SGD's momentum fits b only: without --variants the error says so; with --variants b nothing
    asked for is left out, so no note; with --variants a b, a is named."""
    sgd = {"set": {"optim": {"name": "sgd", "lr": 0.05}}}
    path = write_spec(tmp_path / "s.yaml", variants=[{"name": "a"}, {"name": "b", **sgd}, {"name": "c"}])
    assert main(["run", str(path), "--dry-run", "--set", "optim.momentum=0.5", "--variants", "b"]) == 0
    out, err = capsys.readouterr()
    assert "left out" not in err and "b/seed-0" in out and "/a/" not in out
    assert main(["run", str(path), "--dry-run", "--set", "optim.momentum=0.5", "--variants", "a", "b"]) == 2
    assert "--set does not fit a" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setting, expected",
    [
        (
            "model.widths=[8,8]",
            "variant 'a' (model.name=mnist_cnn): this config does not run on mnist data: "
            "ValueError: mnist_cnn needs 5 conv widths",
        ),
        ("model.name=unet", "variant 'a' (model.name=unet): "),
        # 980 training images in one batch of 1,024, 2 epochs: a one-cycle of 2 steps, whose PyTorch form divides by zero
        (
            "train.batch_size=1024",
            "variant 'a': sched.pct_start: a one-cycle of 2 steps (2 epochs x 1 batch) with "
            "pct_start 0.3 warms up over 0.6 steps",
        ),
    ],
)
def test_a_config_that_cannot_work_stops_before_anything_is_written(data_root, tmp_path, capsys, setting, expected):
    path = write_spec(tmp_path / "w.yaml", variants=[{"name": "a", "set": {"sched": {"name": "onecycle"}}}])
    res = tmp_path / "r"
    assert main(["run", str(path), "--set", setting, "--data-root", str(data_root), "--results", str(res)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not res.exists()


def test_a_dry_run_builds_what_it_would_train_when_the_data_is_here(data_root, tmp_path, capsys):
    """The plan of a grid whose second variant cannot run stops at the plan, naming the variant, not hours later."""
    path = write_spec(tmp_path / "w.yaml", variants=[{"name": "a"}, {"name": "b", "set": {"model.widths": [8, 8]}}])
    args = ["run", str(path), "--data-root", str(data_root), "--results", str(tmp_path / "r"), "--dry-run"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "variant 'b' (model.name=mnist_cnn): this config does not run on mnist data" in err and out == ""
    assert main(args + ["--variants", "a"]) == 0 and capsys.readouterr().out.startswith("todo  w/a/seed-0")
    assert not (tmp_path / "r").exists()


def test_a_run_another_group_finished_with_the_same_key_is_copied_not_trained(data_root, tmp_path, capsys):
    """A rung kept as written in the quick profile is the same run in the full one: the second profile copies it."""
    path = write_spec(tmp_path / "t.yaml", profiles={"quick": {"set": {"train.epochs": 1}, "as_written": ["a"]}})
    res = tmp_path / "r"
    common = ["--data-root", str(data_root), "--results", str(res), "--seeds", "0", "--no-progress"]
    assert main(["run", str(path), "--profile", "quick", "--variants", "a", *common]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--variants", "a", "--dry-run", *common]) == 0
    assert "a seed 0: the same config and seed, already finished in another group (t@quick): a real run copies" in (
        capsys.readouterr().err
    )
    assert main(["run", str(path), "--variants", "a", *common]) == 0
    out, err = capsys.readouterr()
    assert "(t@quick): copied, not trained again" in err and "done " not in out  # nothing trained
    quick, full = (
        json.loads((res / "runs" / g / "a" / "seed-0" / "result.json").read_text()) for g in ("t@quick", "t")
    )
    assert full.pop("copied_from") == "t@quick/a/seed-0" and full.pop("spec") == "t" and quick.pop("spec") == "t@quick"
    assert full == quick
    config = json.loads((res / "runs" / "t" / "a" / "seed-0" / "config.json").read_text())
    assert config["spec"] == "t" and (res / "runs" / "t" / "a" / "seed-0" / "best.pt").exists()
    assert main(["run", str(path), "--variants", "b", "--dry-run", *common]) == 0  # b differs: trained, not copied
    assert "another group" not in capsys.readouterr().err


def test_bad_results_folders(tmp_path, capsys):
    path = write_spec(tmp_path / "b.yaml")
    (tmp_path / "file").write_text("x")
    assert main(["run", str(path), "--results", str(tmp_path / "file")]) == 2
    assert f"error: --results {tmp_path / 'file'}: not a folder" in capsys.readouterr().err
    assert main(["summary", "--results", str(tmp_path / "typo")]) == 2
    assert "no runs and no summary.md there" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_every_problem_of_a_data_error_is_its_own_error_line(tmp_path, capsys):
    raw = tmp_path / "d" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03")
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"junk")
    path = write_spec(tmp_path / "m.yaml")
    assert main(["run", str(path), "--data-root", str(tmp_path / "d"), "--results", str(tmp_path / "r")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines[1:]), lines  # after the plan line


def test_an_experiment_leaves_the_published_summary_alone(data_root, tmp_path, capsys):
    base = {**TINY_MNIST_BASE, "train": {**TINY_MNIST_BASE["train"], "epochs": 1}}
    path = write_spec(tmp_path / "x.yaml", base=base, variants=[{"name": "a"}])
    res = tmp_path / "r"
    args = ["run", str(path), "--data-root", str(data_root), "--results", str(res), "--no-progress"]
    assert main(args) == 0
    published = (res / "summary.md").read_bytes()
    assert main([*args, "--set", "optim.lr=0.01"]) == 0
    assert (res / "summary.md").read_bytes() == published  # not even its "table generated" line
    assert "optim.lr=0.01" in (res / "runs" / "x--optim.lr=0.01" / "summary.md").read_text()


def test_a_network_of_the_wrong_width_stops_before_training(data_root, tmp_path, capsys, monkeypatch):
    """5 logits for MNIST's 10 classes would train (to nonsense); the shape is checked first, naming what it needs."""
    (tmp_path / "wrongnets.py").write_text(
        "from torch import nn\n\n"
        "def five(in_channels: int, num_classes: int) -> nn.Module:\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, 5))\n"
    )
    monkeypatch.chdir(tmp_path)
    path = write_spec(
        tmp_path / "w.yaml", base={**TINY_MNIST_BASE, "model": {"name": "wrongnets:five"}}, variants=[{"name": "a"}]
    )
    res = tmp_path / "r"
    assert main(["run", str(path), "--data-root", str(data_root), "--results", str(res)]) == 2
    err = capsys.readouterr().err
    assert "variant 'a' (model.name=wrongnets:five): the network returns (2, 5)" in err and "mnist needs (2, 10)" in err
    assert not res.exists()


def test_every_recorded_command_runs_as_recorded(data_root, tmp_path, capsys, monkeypatch):
    import re
    import shlex

    monkeypatch.delenv("BENCH_DATA", raising=False)  # the data root is only on the command line
    base = {**TINY_MNIST_BASE, "train": {**TINY_MNIST_BASE["train"], "epochs": 1}}
    path = write_spec(
        tmp_path / "toy.yaml",
        base=base,
        variants=[{"name": "a"}],
        profiles={"small": {"set": {"data.train_subset": 300}}},
    )
    res = tmp_path / "out"
    args = [
        "run",
        str(path),
        "--profile",
        "small",
        "--data-root",
        str(data_root),
        "--results",
        str(res),
        "--no-progress",
    ]
    for extra, summary in (
        ([], res / "summary.md"),
        (["--set", "train.epochs=2"], res / "runs" / "toy@small--train.epochs=2" / "summary.md"),
    ):
        assert main([*args, *extra]) == 0
        capsys.readouterr()
        command = re.search(r"^- command: `(.*)`$", summary.read_text(), re.M).group(1)
        # MNIST is found wherever $BENCH_DATA says: a data root is recorded only for a task that reads a data set of
        # its own (image_folder, mask_folder), not a path of the machine that happened to run it
        assert "--data-root" not in command and f"--results {res}" in command
        argv = shlex.split(command)
        assert argv[:3] == ["python", "-m", "bench"]
        monkeypatch.setenv("BENCH_DATA", str(data_root))
        assert main(argv[3:]) == 0  # the group it names is the one its runs are in: nothing left to train
        monkeypatch.delenv("BENCH_DATA")
        assert "1 run, 1 already done" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["tune", "m.yaml", "--trials", "0"],
            "error: python -m bench tune: --trials: must be >= 1, got 0 (options: python -m bench tune --help)",
        ),
        (
            ["run", "m.yaml", "--frob"],
            "error: python -m bench run: unrecognized arguments: --frob (options: python -m bench run --help)",
        ),
        (
            ["run", "m.yaml", "--workers", "two"],
            "error: python -m bench run: argument --workers: invalid int value: 'two' "
            "(options: python -m bench run --help)",
        ),
    ],
)
def test_an_argument_error_is_one_line_naming_the_subcommand(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [expected]


def test_group_refuses_any_spec_s_published_group_before_writing(tmp_path, capsys, monkeypatch):
    """``--group warwick`` on an MNIST experiment would make runs/warwick an ad-hoc MNIST group that ``bench run
    warwick`` then refuses: any spec's published group is refused, trained or not, and nothing is written."""
    monkeypatch.chdir(REPO)  # ablations/ holds the shipped specs
    res = tmp_path / "r"
    for group in ("warwick", "mnist"):
        assert (
            main(
                [
                    "run",
                    "mnist",
                    "--set",
                    "optim.lr=0.5",
                    "--group",
                    group,
                    "--results",
                    str(res),
                    "--data-root",
                    "/nonexistent",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert f"--group {group}: that name is the published group of " in err and f"ablations/{group}.yaml" in err
    # a spec beside the experiment's own, with a profile
    path = write_spec(tmp_path / "p.yaml")
    write_spec(tmp_path / "q.yaml", profiles={"quick": {"seeds": [0]}})
    from bench.spec import published_groups

    assert {"q", "q@quick", "p"} <= set(published_groups([tmp_path]))
    assert main(["run", str(path), "--set", "optim.lr=0.5", "--group", "q", "--results", str(res)]) == 2
    assert "--group q: that name is the published group of" in capsys.readouterr().err
    assert not res.exists()


def test_an_at_group_name_must_be_the_spec_and_profile_it_runs(tmp_path, capsys):
    """SPEC@PROFILE--LABEL names an experiment of that spec and profile: another's would mislabel the runs."""
    path = write_spec(tmp_path / "p.yaml", profiles={"quick": {"seeds": [0]}})
    res = tmp_path / "r"
    for group, profile, expected in [
        ("warwick@quick--x", "quick", "name the group p@quick--LABEL"),
        ("p@quick--x", None, "name the group p--LABEL or anything without an @"),
    ]:
        args = ["run", str(path), "--set", "optim.lr=0.5", "--group", group, "--results", str(res), "--dry-run"]
        assert main(args + (["--profile", profile] if profile else [])) == 2
        assert expected in capsys.readouterr().err
    args = ["run", str(path), "--profile", "quick", "--set", "optim.lr=0.5", "--group", "p@quick--x", "--dry-run"]
    assert main(args + ["--results", str(res)]) == 0 and "p@quick--x/" in capsys.readouterr().out
    assert not res.exists()


def test_a_dry_run_says_when_the_data_is_not_there(tmp_path, capsys):
    """Without the data --dry-run builds nothing and still lists the runs (a clone without the data plans from its
    records), but warns that the real run would stop at once for want of the files."""
    path = write_spec(tmp_path / "p.yaml")
    args = ["run", str(path), "--results", str(tmp_path / "r"), "--dry-run", "--data-root", str(tmp_path / "nothing")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.startswith("todo  p/a/seed-0") and not (tmp_path / "r").exists()
    assert err.splitlines()[-1].startswith(f"warning: no MNIST files under {tmp_path / 'nothing'}")
    assert err.splitlines()[-1].endswith("(a run without --dry-run stops here)")
