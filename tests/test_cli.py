"""The command line as a user types it."""
from __future__ import annotations

import json

import pytest
import yaml

from bench.cli import main
from tests.helpers import write_spec


def test_misspelt_key_fails_at_once_naming_file_and_key(tmp_path, capsys):
    path = write_spec(tmp_path / "typo.yaml", variants=[{"name": "a", "set": {"model": {"batchnorm": True}}}])
    assert main(["run", str(path), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "variants[0] (a).set.model: unknown key 'batchnorm'" in err
    assert "valid keys (closest first): batch_norm" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing was trained or written


def test_dry_run_lists_runs(tmp_path, capsys):
    path = write_spec(tmp_path / "d.yaml", seeds=[0, 1])
    assert main(["run", str(path), "--dry-run", "--results", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[0].startswith("todo  d/a/seed-0  key=")


def test_unknown_variant_and_profile(tmp_path, capsys):
    path = write_spec(tmp_path / "v.yaml")
    assert main(["run", str(path), "--variants", "bb", "--dry-run"]) == 2
    assert "unknown variant 'bb'; valid choices (closest first): b, a" in capsys.readouterr().err
    assert main(["run", str(path), "--profile", "quick", "--dry-run"]) == 2
    assert "defines no profiles" in capsys.readouterr().err


def test_run_then_summary_end_to_end(data_root, tmp_path, capsys):
    path = write_spec(tmp_path / "e2e.yaml", seeds=[0])
    res = tmp_path / "results"
    code = main(["run", str(path), "--data-root", str(data_root), "--results", str(res), "--set", "train.epochs=1",
                 "--no-progress"])
    assert code == 0
    for v in ("a", "b"):
        r = json.loads((res / "runs" / "e2e" / v / "seed-0" / "result.json").read_text())
        assert 0.2 < r["test"]["acc"] <= 1 and r["epochs_run"] == 1 and r["params"] > 0  # chance is 0.1
        cfg = json.loads((res / "runs" / "e2e" / v / "seed-0" / "config.json").read_text())
        assert cfg["config"]["train"]["epochs"] == 1 and cfg["data_info"]["n_train"] == 1000
    (res / "summary.md").unlink()
    assert main(["summary", "--results", str(res)]) == 0
    text = (res / "summary.md").read_text()
    assert "## e2e (mnist" in text and "optim.lr=0.001" in text


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["tune", "--help"], ["predict", "--help"]])
def test_help(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits after printing help
        code = e.code
    assert code == 0 and "usage" in capsys.readouterr().out


def test_spec_file_is_yaml_with_reported_numbers():
    from pathlib import Path

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "ablations" / "mnist.yaml").read_text())
    assert [v.get("reported") for v in spec["variants"][:4]] == [0.982, 0.990, 0.990, 0.992]
