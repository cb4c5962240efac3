"""Spec parsing, variant resolution and every validation error."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from bench.config import ConfigError, NonNegInt, PosFloat, RangeError, UnitFloat, check_value
from bench.spec import load_spec
from tests.helpers import TINY_MNIST_BASE, write_spec


def spec_error(tmp_path: Path, **overrides) -> str:
    path = write_spec(tmp_path / "bad.yaml", **overrides)
    with pytest.raises(ConfigError) as e:
        load_spec(path)
    msg = str(e.value)
    assert msg.startswith(str(path)), msg  # every message names the spec file
    return msg


def test_ladder_is_cumulative_and_from_is_leave_one_out(tmp_path):
    path = write_spec(
        tmp_path / "s.yaml",
        seeds=[0, 1],
        variants=[
            {"name": "a"},
            {"name": "b", "set": {"optim.lr": 0.01}},
            {"name": "c", "set": {"model": {"batch_norm": False}}},
            {"name": "d", "from": "b", "set": {"train.batch_size": 32}},
        ],
    )
    spec = load_spec(path)
    v = {x.name: x for x in spec.variants}
    assert v["b"].config.optim["lr"] == 0.01 and v["b"].parent == "a" and not v["b"].ablation
    assert v["c"].config.optim["lr"] == 0.01 and v["c"].config.model["batch_norm"] is False
    # d changes b, so it keeps b's batch norm and lr, and is marked as an ablation of b.
    assert v["d"].parent == "b" and v["d"].ablation
    assert v["d"].config.model["batch_norm"] is True and v["d"].config.train.batch_size == 32
    assert len(spec.runs()) == 8
    assert {r.seed for r in spec.runs()} == {0, 1}
    assert v["a"].reported is None and "optim.lr=0.01" in v["b"].change


def test_new_factory_name_replaces_section(tmp_path):
    path = write_spec(
        tmp_path / "s.yaml",
        variants=[{"name": "a"}, {"name": "r", "set": {"model": {"name": "mnist_resnet", "width": 8}}}],
    )
    cfg = load_spec(path).variants[1].config
    assert cfg.model == {"name": "mnist_resnet", "width": 8}  # mnist_cnn's keys are gone


def test_profile_and_cli_overrides(tmp_path):
    path = write_spec(
        tmp_path / "s.yaml", profiles={"quick": {"seeds": [5], "set": {"train.epochs": 1}, "variants": ["b"]}}
    )
    spec = load_spec(path, profile="quick", overrides=["optim.lr=0.5"])
    assert spec.seeds == [5] and [v.name for v in spec.variants] == ["b"]
    assert spec.variants[0].config.train.epochs == 1 and spec.variants[0].config.optim["lr"] == 0.5
    assert spec.group == "s@quick"
    # The profile changes the config, so the runs' keys differ from the full profile's.
    assert load_spec(path).runs()[1].key != load_spec(path, profile="quick").runs()[0].key


def test_change_text_says_what_a_profile_or_set_overrode(tmp_path):
    """A variant's change text shows the value its runs used where a profile's ``set`` or --set overrode one of the
    variant's own keys (it showed the spec's value, which the runs never used); keys nobody overrode read as before."""
    path = write_spec(
        tmp_path / "s.yaml",
        variants=[{"name": "a"}, {"name": "b", "set": {"optim.lr": 0.01, "train.batch_size": 16}}],
        profiles={"quick": {"set": {"train.batch_size": 8}}},
    )
    assert load_spec(path).variants[1].change == "optim.lr=0.01, train.batch_size=16"
    b = load_spec(path, profile="quick", overrides=["optim.lr=0.5"]).variants[1]
    assert b.change == "optim.lr=0.5 (--set; the spec's 0.01), train.batch_size=8 (profile; the spec's 16)"
    assert b.config.optim["lr"] == 0.5 and b.config.train.batch_size == 8
    same = load_spec(path, overrides=["optim.lr=0.01"]).variants[1]  # the same value: nothing to say
    assert same.change == "optim.lr=0.01, train.batch_size=16"


def test_run_key_ignores_data_location(tmp_path):
    p1 = write_spec(tmp_path / "s.yaml")
    a = load_spec(p1, overrides=["data.root=/x"]).runs()[0].key
    b = load_spec(p1, overrides=["data.root=/y"]).runs()[0].key
    c = load_spec(p1, overrides=["train.epochs=3"]).runs()[0].key
    assert a == b != c


def test_int_is_accepted_for_float(tmp_path):
    path = write_spec(tmp_path / "s.yaml", variants=[{"name": "a", "set": {"optim.lr": 1}}])
    assert load_spec(path).variants[0].config.optim["lr"] == 1.0


def test_exponent_floats_as_people_type_them(tmp_path):
    spec = load_spec(write_spec(tmp_path / "f.yaml", variants=[{"name": "a"}]), overrides=["optim.lr=1e-3"])
    assert spec.variants[0].config.optim["lr"] == 0.001  # YAML 1.1 would read "1e-3" as a string
    raw = (tmp_path / "f.yaml").read_text().replace("lr: 0.003", "lr: 3e-3")
    (tmp_path / "g.yaml").write_text(raw)
    assert load_spec(tmp_path / "g.yaml").variants[0].config.optim["lr"] == 0.003


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"sedes": [0]}, "(top level): unknown key 'sedes'; valid keys (closest first): seeds"),
        ({"seeds": "zero"}, "seeds: expected list of int, got str"),
        ({"seeds": []}, "seeds: need a non-empty list"),
        ({"task": "mnits"}, "unknown task 'mnits'; valid choices (closest first): mnist"),
        ({"variants": []}, "variants: expected a non-empty list"),
        ({"variants": [{"name": "a"}, {"name": "a"}]}, "duplicate variant name 'a'"),
        ({"variants": [{"nme": "a"}]}, "variants[0]: unknown key 'nme'; valid keys (closest first): name"),
        ({"variants": [{"name": "a", "from": "zz"}]}, "variants[0] (a).from: 'zz' is not an earlier variant"),
        (
            {"variants": [{"name": "a"}, {"name": "b", "from": "c"}, {"name": "c"}]},
            "unknown earlier variant 'c'; valid choices (closest first): a (a variant builds on one above it)",
        ),
        (
            {"variants": [{"name": "a", "set": {"sched.gamma": 0.5}}]},
            "set.sched: unknown key 'gamma'; this takes no keys (to use one, pick a `name` that does)",
        ),
        ({"variants": [{"name": "a"}, {"name": "b", "from": "x"}]}, "unknown earlier variant 'x'"),
        (
            {"variants": [{"name": "a", "set": {"optim.lrr": 0.1}}]},
            "variants[0] (a).set.optim: unknown key 'lrr'; valid keys (closest first): lr",
        ),
        (
            {"variants": [{"name": "a", "set": {"optim": {"lr": "fast"}}}]},
            "variants[0] (a).set.optim.lr: expected float, got str",
        ),
        (
            {"variants": [{"name": "a", "set": {"trian.epochs": 3}}]},
            "variants[0] (a).set: unknown key 'trian'; valid keys (closest first): train",
        ),
        ({"variants": [{"name": "a", "set": {"train.epochs": 0}}]}, "train.epochs: must be >= 1"),
        ({"variants": [{"name": "a", "set": {"train.batch_size": 6.5}}]}, "train.batch_size: expected int, got float"),
        ({"variants": [{"name": "a", "set": {"model.batch_norm": "yes"}}]}, "model.batch_norm: expected bool, got str"),
        (
            {"variants": [{"name": "a", "set": {"model": {"name": "mnist_cnm"}}}]},
            "set.model.name: unknown model 'mnist_cnm'; valid choices (closest first): mnist_cnn,",
        ),
        (
            {"variants": [{"name": "a", "set": {"optim.name": "adma"}}]},
            "unknown optimizer 'adma'; valid choices (closest first): adam,",
        ),
        (
            {"variants": [{"name": "a", "set": {"sched.name": "stpe"}}]},
            "unknown scheduler 'stpe'; valid choices (closest first): step,",
        ),
        (
            {"variants": [{"name": "a", "set": {"loss.name": "dicee"}}]},
            "unknown loss 'dicee'; valid choices (closest first): dice,",
        ),
        ({"variants": [{"name": "a", "set": {"model.in_channels": 3}}]}, "unknown key 'in_channels'"),
        ({"variants": [{"name": "a", "reported": "high"}]}, "variants[0] (a).reported: expected float"),
        (
            {"profiles": {"quick": {"set": {"train.epoch": 1}}}},
            "profiles.quick.set.train: unknown key 'epoch'; valid keys (closest first): epochs",
        ),
        ({"profiles": {"quick": {"seed": [1]}}}, "profiles.quick: unknown key 'seed'"),
        # numbers outside their range: caught here, not as a torch traceback after a config.json was written
        ({"variants": [{"name": "a", "set": {"optim.lr": -1}}]}, "set.optim.lr: must be > 0, got -1.0"),
        ({"variants": [{"name": "a", "set": {"optim.weight_decay": -0.1}}]}, "optim.weight_decay: must be >= 0"),
        (
            {"variants": [{"name": "a", "set": {"optim": {"name": "sgd", "momentum": 1.0}}}]},
            "optim.momentum: must be in [0, 1)",
        ),
        ({"variants": [{"name": "a", "set": {"model.dropout": 1.5}}]}, "model.dropout: must be in [0, 1), got 1.5"),
        (
            {"variants": [{"name": "a", "set": {"model.widths": [8, 0, 8, 8, 8]}}]},
            "model.widths[1]: must be >= 1, got 0",
        ),
        (
            {"variants": [{"name": "a", "set": {"model.init": "he"}}]},
            "model.init: expected one of 'kaiming', 'default'",
        ),
        (
            {"variants": [{"name": "a", "set": {"sched": {"name": "step", "step_size": 0}}}]},
            "sched.step_size: must be >= 1",
        ),
        (
            {"variants": [{"name": "a", "set": {"sched": {"name": "onecycle", "pct_start": 1.0}}}]},
            "pct_start: must be in (0, 1)",
        ),
        (
            {"variants": [{"name": "a", "set": {"loss.label_smoothing": 1.0}}]},
            "loss.label_smoothing: must be in [0, 1)",
        ),
        ({"variants": [{"name": "a", "set": {"train.patience": 0}}]}, "train.patience: must be >= 1, got 0"),
        ({"variants": [{"name": "a", "set": {"train.eval_batch_size": 0}}]}, "train.eval_batch_size: must be >= 1"),
        ({"variants": [{"name": "a", "set": {"train.device": "gpu"}}]}, "train.device: 'gpu' is not a device"),
        (
            {"variants": [{"name": "a", "set": {"data.val_fraction": 1.0}}]},
            "data.val_fraction: must be in (0, 1), got 1.0",
        ),
        ({"variants": [{"name": "a", "set": {"data.train_subset": 0}}]}, "data.train_subset: must be >= 1, got 0"),
        ({"variants": [{"name": "a", "set": {"augment.rotate": 400}}]}, "augment.rotate: must be in [0, 180]"),
        ({"variants": [{"name": "a", "set": {"eval.threshold": 0}}]}, "eval.threshold: must be in (0, 1)"),
        (
            {"variants": [{"name": "a", "reported": 98.2}]},
            "reported: acc must be in [0, 1] as the spec writes it (e.g. 0.982",
        ),
        ({"seeds": [-1]}, "seeds[0]: must be >= 0, got -1"),
        ({"profiles": {"quick": {"workers": 0}}}, "profiles.quick.workers: must be >= 1, got 0"),
        ({"profiles": {"quick": {"as_written": ["fats"]}}}, "profiles.quick.as_written: unknown variant 'fats'"),
        ({"target": 99.2}, "target: acc must be in [0, 1] as the spec writes it (e.g. 0.992 for 99.2 %), got 99.2"),
        ({"target": "high"}, "target: expected float"),
        (
            {"variants": [{"name": "a", "set": {"train.compile": "max"}}]},
            "train.compile: expected one of 'none', 'default'",
        ),
        ({"search": {"trials": 0, "space": {"optim.lr": {"low": 0.1, "high": 1.0}}}}, "search.trials: must be >= 1"),
        ({"name": "my spec"}, "name: 'my spec' must be a folder name"),
    ],
)
def test_validation_errors(tmp_path, overrides, expected):
    assert expected in spec_error(tmp_path, **overrides)


@pytest.mark.parametrize(
    "value, tp, expected",
    [
        ("he", Literal["kaiming", "default"], "k: expected one of 'kaiming', 'default', got 'he'"),
        ("x", int | None, "k: expected int or null, got str 'x'"),
        ("x", Literal["a"] | None, "k: expected 'a' or null, got str 'x'"),
        (0, None, "k: expected null, got int 0"),
        (1, bool, "k: expected bool, got int 1"),
        (True, int, "k: expected int, got bool True"),
        (6.5, int, "k: expected int, got float 6.5"),
        ("1", float, "k: expected float, got str '1'"),
        (3, str, "k: expected str, got int 3"),
        ("ab", list[int], "k: expected list of int, got str 'ab'"),
        ([1, "x"], list[int], "k[1]: expected int, got str 'x'"),
        (5, tuple, "k: expected tuple, got int 5"),
        ([], dict[str, int], "k: expected dict, got list []"),
        (0, PosFloat, "k: must be > 0, got 0.0"),
        (-1, NonNegInt | None, "k: must be >= 0, got -1"),  # the range, not "expected int or null"
        (1.0, UnitFloat, "k: must be in [0, 1), got 1.0"),
        ([1, -1], list[NonNegInt], "k[1]: must be >= 0, got -1"),
    ],
)
def test_check_value_says_one_message_per_kind_of_type(value, tp, expected):
    kind = RangeError if "must be" in expected else ConfigError
    with pytest.raises(kind) as e:
        check_value(value, type(None) if tp is None else tp, "k")
    assert str(e.value) == expected and type(e.value) is kind


def test_check_value_coerces_and_passes_what_it_does_not_check():
    assert check_value(2, PosFloat, "k") == 2.0 and isinstance(check_value(2, float, "k"), float)
    assert check_value([1, 2], tuple[int, ...], "k") == (1, 2) and check_value((1, 2), list[int], "k") == [1, 2]
    assert check_value(None, PosFloat | None, "k") is None and check_value("a", int | str, "k") == "a"
    marker = object()
    assert check_value(marker, Any, "k") is marker and check_value(marker, Path, "k") is marker


def test_error_in_base_names_base(tmp_path):
    base = copy.deepcopy(TINY_MNIST_BASE)
    base["train"]["epoch"] = 3
    msg = spec_error(tmp_path, base=base)
    assert "base.train: unknown key 'epoch'; valid keys (closest first): epochs" in msg


def test_unknown_profile_and_bad_override(tmp_path):
    path = write_spec(tmp_path / "s.yaml", profiles={"quick": {"set": {"train.epochs": 1}}})
    with pytest.raises(ConfigError, match="unknown profile 'quik'; valid choices \\(closest first\\): quick"):
        load_spec(path, profile="quik")
    with pytest.raises(ConfigError, match="--set train: unknown key 'lr'"):
        load_spec(path, overrides=["train.lr=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_spec(path, overrides=["train.epochs"])


def test_yaml_syntax_error_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: b\ntask: mnist\nbase:\n  model: {name: mnist_cnn\n  optim: x\n")
    with pytest.raises(ConfigError) as e:
        load_spec(bad)
    assert str(e.value) == (
        f"{bad}:5:8: not valid YAML: expected ',' or '}}', but got ':' (while parsing a flow mapping begun at line 4)"
    )  # one line: the file, line and column
    with pytest.raises(ConfigError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["mnist", "warwick"])
def test_shipped_specs_validate(name):
    path = Path(__file__).resolve().parents[1] / "ablations" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    for profile in [None, *raw.get("profiles", {})]:
        spec = load_spec(path, profile=profile)
        assert spec.variants and spec.seeds
        assert any(v.reported is not None for v in spec.variants)


def test_a_profile_leaves_its_as_written_variants_alone(tmp_path):
    """A rung whose point is its own budget (the `fast` recipe) keeps it in a short profile; --set still applies."""
    path = write_spec(
        tmp_path / "s.yaml",
        target=0.95,
        profiles={"quick": {"set": {"train.epochs": 1, "data.train_subset": 500}, "as_written": ["b"]}},
    )
    spec = load_spec(path, "quick", ["optim.lr=0.02"])
    a, b = (next(r for r in spec.runs([n])).config for n in ("a", "b"))
    assert (a.train.epochs, a.data.train_subset) == (1, 500)
    assert (b.train.epochs, b.data.train_subset) == (2, 1000)  # the base's budget, as the spec writes it
    assert a.optim["lr"] == b.optim["lr"] == 0.02
    assert spec.target == 0.95 and spec.workers is None  # no `workers:`: measured when the grid starts


def test_every_problem_of_the_overrides_is_said_at_once(tmp_path):
    path = write_spec(tmp_path / "m.yaml")
    with pytest.raises(ConfigError) as e:
        load_spec(path, overrides=["optim.lr=-1", "train.epochs=abc", "train.batch_size=0"])
    assert str(e.value).splitlines() == [
        f"{path}: --set optim.lr: must be > 0, got -1.0",
        f"{path}: --set train.epochs: expected int, got str 'abc'",
        f"{path}: --set train.batch_size: must be >= 1, got 0",
    ]


def test_a_set_that_fits_some_variants_needs_them_named(tmp_path):
    """--set of one rung's own key (SGD's momentum): the error names the rungs it fits, and with --variants the
    rungs it does not fit are left out of the experiment, with the ensembles of them."""
    path = write_spec(
        tmp_path / "s.yaml",
        variants=[
            {"name": "a"},
            {"name": "b", "set": {"optim": {"name": "sgd", "lr": 0.05}}},
            {"name": "c"},
            {"name": "ens-a", "ensemble": {"of": "a", "size": 2}},
        ],
        seeds=[0, 1],
    )
    with pytest.raises(ConfigError) as e:
        load_spec(path, overrides=["optim.momentum=0.5"])
    assert str(e.value).splitlines() == [
        f"{path}: --set does not fit a: --set optim: unknown key 'momentum'; valid keys (closest first): "
        "beta1, beta2, weight_decay, fused, lr",
        f"{path}: --set fits only b, c: train them alone with --variants b c",
    ]
    spec = load_spec(path, overrides=["optim.momentum=0.5"], only=["b"])
    assert [v.name for v in spec.variants] == ["b", "c"]
    assert spec.variants[0].config.optim["momentum"] == 0.5
    with pytest.raises(ConfigError, match="--set does not fit a: .*\n.*--set fits only b, c"):
        load_spec(path, overrides=["optim.momentum=0.5"], only=["b", "a"])  # a named rung must take it
    with pytest.raises(ConfigError, match="--set optim: unknown key 'nesterov_typo'"):  # fits none: as it was
        load_spec(path, overrides=["optim.nesterov_typo=1"], only=["b"])
