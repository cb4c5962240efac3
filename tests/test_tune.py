"""Optuna search: validation-only objective, resumable study, validated search space."""
from __future__ import annotations

import json

import pytest
import yaml

from bench.cli import main
from bench.config import ConfigError
from bench.spec import load_spec
from tests.helpers import write_spec

SPACE = {"optim.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}, "train.batch_size": {"choices": [32, 64]}}


def test_tune_runs_resumes_and_never_touches_test(data_root, tmp_path, capsys):
    path = write_spec(tmp_path / "t.yaml", search={"variant": "a", "trials": 2, "space": SPACE})
    res = tmp_path / "results"
    args = ["tune", str(path), "--data-root", str(data_root), "--results", str(res), "--set", "train.epochs=1",
            "--no-progress"]
    assert main(args) == 0
    assert "after 2 trials" in capsys.readouterr().out
    trials = sorted((res / "optuna" / "t").glob("trial-*"))
    assert len(trials) == 2
    for t in trials:
        r = json.loads((t / "result.json").read_text())
        assert r["test"] == {} and 0 < r["val_best"] <= 1  # scored on validation only
        assert set(r["search_params"]) == set(SPACE)
    best = yaml.safe_load((res / "optuna" / "t-best.yaml").read_text())
    assert best[0]["name"] == "a-tuned" and set(best[0]["set"]) == set(SPACE)
    # The study is stored: asking for 3 trials in total runs just one more.
    assert main([*args, "--trials", "3"]) == 0
    assert "after 3 trials" in capsys.readouterr().out
    assert len(list((res / "optuna" / "t").glob("trial-*"))) == 3


@pytest.mark.parametrize("search, expected", [
    ({"space": {"optim.lrr": {"low": 0.1, "high": 1.0}}}, "search.space.optim: unknown key 'lrr'"),
    ({"space": {"optim.lr": {"low": 1.0, "high": 0.1}}}, "need low < high"),
    ({"space": {"optim.lr": {"lo": 0.1, "high": 1.0}}}, "search.space.optim.lr: unknown key 'lo'"),
    ({"space": {"train.batch_size": {"choices": [32, "big"]}}}, "train.batch_size: expected int, got str"),
    ({"variant": "zz", "space": {"optim.lr": {"low": 0.1, "high": 1.0}}}, "unknown variant 'zz'"),
    ({"space": {}}, "search.space: expected a non-empty mapping"),
])
def test_search_section_is_validated(tmp_path, search, expected):
    path = write_spec(tmp_path / "s.yaml", search=search)
    with pytest.raises(ConfigError, match=expected.replace("(", "\\(").replace(")", "\\)")):
        load_spec(path)


def test_spec_without_search_cannot_be_tuned(tmp_path, capsys):
    path = write_spec(tmp_path / "n.yaml")
    assert main(["tune", str(path), "--results", str(tmp_path)]) == 2
    assert "no 'search:' section" in capsys.readouterr().err
