"""MNIST files checked up front like WARWICK's: every broken or missing file named, nothing downloaded unless asked."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from bench.cli import main
from bench.tasks.base import DataError
from bench.tasks.mnist import FILES, MnistTask, check_files
from tests.helpers import write_spec

TASK = MnistTask()


def copy_of(data_root: Path, dst: Path, gz: bool = False) -> Path:
    """``dst/MNIST/raw`` with links to the real files (uncompressed, or the ``.gz`` ones only); returns it."""
    raw = dst / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in FILES:
        name = f"{stem}.gz" if gz else stem
        (raw / name).symlink_to(data_root / "MNIST" / "raw" / name)
    return raw


def replace(path: Path, blob: bytes) -> None:
    path.unlink()
    path.write_bytes(blob)


def test_real_files_pass_and_gz_only_copies_work(data_root, tmp_path):
    arrays = check_files(data_root)
    assert arrays["train-images-idx3-ubyte"].shape == (60000, 28, 28) and arrays["t10k-labels-idx1-ubyte"].max() == 9
    copy_of(data_root, tmp_path / "gz", gz=True)
    assert (check_files(tmp_path / "gz")["t10k-images-idx3-ubyte"] == arrays["t10k-images-idx3-ubyte"]).all()


def test_every_broken_file_is_named_with_what_is_wrong(data_root, tmp_path):
    raw = copy_of(data_root, tmp_path)
    train_images = (data_root / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()
    replace(raw / "train-images-idx3-ubyte", train_images[:1000])  # truncated
    replace(raw / "t10k-images-idx3-ubyte", (data_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes())
    labels = bytearray((data_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes())
    labels[8] = 12
    (raw / "t10k-labels-idx1-ubyte").unlink()
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    (raw / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as err:
        TASK.prepare(tmp_path, download=False)
    lines = str(err.value).splitlines()
    assert len(lines) == 4, lines
    assert lines[0] == f"{raw}: missing train-labels-idx1-ubyte[.gz]"
    assert f"{raw / 'train-images-idx3-ubyte'}: 1,000 bytes, expected 47,040,016 (truncated" in lines[1]
    assert f"{raw / 't10k-images-idx3-ubyte'}: not an IDX file of 3-d unsigned bytes" in lines[2]
    assert f"{raw / 't10k-labels-idx1-ubyte.gz'}: labels must be 0-9, found 12" in lines[3]


def test_a_truncated_gz_is_named(data_root, tmp_path):
    raw = copy_of(data_root, tmp_path, gz=True)
    blob = (data_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").read_bytes()
    replace(raw / "t10k-images-idx3-ubyte.gz", blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: not a complete gzip file"):
        TASK.prepare(tmp_path, download=False)


def test_a_mistyped_data_root_is_an_error_not_a_download(tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded without being asked")

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_download)
    path = write_spec(tmp_path / "m.yaml")
    wrong = tmp_path / "shraed" / "data"
    assert main(["run", str(path), "--data-root", str(wrong), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"error: no MNIST files under {wrong / 'MNIST' / 'raw'}" in err and "--download" in err
    assert "Traceback" not in err and err.count("error:") == 1
    assert not wrong.exists() and not (tmp_path / "r").exists()  # nothing created, nothing written


def test_download_only_when_asked_or_into_the_default_root(data_root, tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake_download(root, train, download):  # stands in for torchvision's mirrors: writes the files
        calls.append((root, train, download))
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for stem in FILES:
            if not (raw / stem).exists():
                (raw / stem).symlink_to(data_root / "MNIST" / "raw" / stem)

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_download)
    path = write_spec(tmp_path / "m.yaml")
    target = tmp_path / "fresh"
    args = ["run", str(path), "--data-root", str(target), "--results", str(tmp_path / "r"), "--dry-run"]
    assert main(args) == 0 and calls == []  # a dry run checks nothing
    TASK.prepare(target, download=True)
    assert [c[1] for c in calls] == [True, False] and check_files(target)
    # the default root ./data downloads without being asked (docs/data.md)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BENCH_DATA", raising=False)
    from bench.runner import resolve_data_root

    assert resolve_data_root(None) == (str(tmp_path / "data"), True)
    assert resolve_data_root("x") == (str(tmp_path / "x"), False)


@pytest.mark.parametrize(
    "setting, expected",
    [
        ({"augment.flips": True}, "augment.flips: task 'mnist' does not implement it; supported: rotate, translate"),
        ({"augment.intensity": 0.2}, "augment.intensity: task 'mnist' does not implement it"),
        ({"eval.tta": True}, "eval.tta: task 'mnist' has no test-time augmentation"),
        ({"eval.border": 4}, "eval.border: task 'mnist' takes fixed-size images; use 0"),
        ({"loss.name": "bce"}, "loss.name: 'bce' does not fit task 'mnist'; valid: ce"),
        ({"data.channels": [1]}, "data.channels: MNIST images have one channel"),
    ],
)
def test_settings_mnist_would_ignore_are_refused(tmp_path, setting, expected, capsys):
    path = write_spec(tmp_path / "s.yaml", variants=[{"name": "a", "set": setting}])
    assert main(["run", str(path), "--dry-run"]) == 2
    assert expected in capsys.readouterr().err


def test_relative_bench_data_works_for_the_tests(data_root, tmp_path):
    """A relative BENCH_DATA (../shared/data, as .ci/run could give it), from the repository root."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    rel = os.path.relpath(data_root, repo)
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cli.py", "-k", "end_to_end"],
        cwd=repo,
        env={**os.environ, "BENCH_DATA": rel},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0 and "1 passed" in p.stdout, p.stdout[-2000:]


def test_a_failed_download_is_one_error_and_leaves_no_empty_folders(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets

    def offline(root, train, download):
        (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)  # as torchvision does before fetching
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError, match="could not download MNIST into .*URLError.*fetch the four files by hand"):
        TASK.prepare(tmp_path / "data", download=True)
    assert not (tmp_path / "data").exists()
