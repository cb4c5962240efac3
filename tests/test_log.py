"""What the command line says on stderr (bench/log.py): one prefixed line per message, --quiet and --verbose."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main
from bench.log import count, first_line
from tests.helpers import write_spec


def _damaged_run(tmp_path: Path) -> tuple[Path, Path]:
    """A spec and a results folder whose first run has an unreadable result.json: listing the runs warns about it."""
    spec, res = write_spec(tmp_path / "d.yaml"), tmp_path / "r"
    run_dir = res / "runs" / "d" / "a" / "seed-0"
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text("{not json")
    return spec, res


def test_a_user_error_is_one_error_line_and_exit_status_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert (
        out == "" and err.startswith(f"error: {tmp_path / 'nope.yaml'}: spec file not found") and err.count("\n") == 1
    )


def test_an_argument_error_goes_through_the_same_handler(capsys):
    with pytest.raises(SystemExit) as e:
        main(["-q", "run", "x", "--workers", "0"])  # --quiet keeps errors
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: python -m bench run: --workers: must be >= 1, got 0 (options: python -m bench run --help)"
    ]


@pytest.mark.parametrize("module", ["exporters.onnx", "exporters.predict"])
def test_a_module_run_with_python_m_speaks_through_the_handler(tmp_path, module):
    """Run as `python -m`, a module's ``__name__`` is ``__main__``: its logger must still be under the handler."""
    args = [str(tmp_path / "nope")] if module == "exporters.onnx" else [str(tmp_path / "nope.onnx"), str(tmp_path)]
    p = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith(f"error: {tmp_path / 'nope'}"), p.stderr


@pytest.mark.parametrize("argv", [["-q", "run", "{spec}"], ["run", "{spec}", "--quiet"]])
def test_quiet_drops_progress_lines_and_keeps_warnings(tmp_path, capsys, argv):
    spec, res = _damaged_run(tmp_path)
    assert main(["run", str(spec), "--dry-run", "--results", str(res)]) == 0
    out_default, err = capsys.readouterr()
    assert "published group d;" in err and "warning: " in err  # the progress line and the damaged run's warning
    assert main([a.format(spec=spec) for a in argv] + ["--dry-run", "--results", str(res)]) == 0
    out, err = capsys.readouterr()
    assert out == out_default  # the listing is the command's output, not a message
    assert [line.split(":")[0] for line in err.splitlines()] == ["warning"]
    assert "unreadable result.json or config.json" in err


def test_verbose_adds_debug_lines_and_the_default_has_none(tmp_path, capsys):
    spec, data = write_spec(tmp_path / "d.yaml"), (tmp_path / "data").resolve()
    argv = ["run", str(spec), "--dry-run", "--results", str(tmp_path / "r"), "--data-root", str(data)]
    assert main(argv) == 0
    assert "debug:" not in capsys.readouterr().err
    assert main(["-v", *argv]) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"debug: data root {data}, results {(tmp_path / 'r').resolve()}, device train.device of each run" in err
    assert any("published group d;" in line for line in err)  # --verbose adds lines, it drops none


def test_no_message_is_printed_twice(tmp_path, capsys):
    """Neither a second setup (each command installs its handler) nor a handler on the root logger (a library's
    logging.basicConfig) prints a message again."""
    spec, res = _damaged_run(tmp_path)
    root = logging.getLogger()
    extra = logging.StreamHandler(sys.stderr)
    root.addHandler(extra)
    try:
        for _ in range(2):
            assert main(["run", str(spec), "--dry-run", "--results", str(res)]) == 0
            err = capsys.readouterr().err.splitlines()
            assert len(err) == 2 and len(set(err)) == 2 and err[0].startswith("warning: ")
    finally:
        root.removeHandler(extra)


@pytest.mark.parametrize(
    "error, empty, expected",
    [
        (ValueError("bad value\nmore detail"), None, "bad value"),
        (ValueError(""), None, "ValueError"),
        (ValueError("  "), "no reason given", "no reason given"),
        (
            ConnectionError(
                "HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded with url: /api (Caused by "
                "NewConnectionError(\"HTTPConnection(host='127.0.0.1', port=9): Failed to establish a new "
                'connection: [Errno 111] Connection refused"))'
            ),
            None,
            "cannot reach the server: Failed to establish a new connection: [Errno 111] Connection refused",
        ),
    ],
)
def test_first_line(error, empty, expected):
    assert first_line(error, empty) == expected


@pytest.mark.parametrize(
    "module, args",
    [
        ("exporters.onnx", ["best"]),
        ("exporters.predict", ["model.onnx", "image.png"]),
    ],
)
def test_the_exporters_argument_errors_are_one_line_before_any_work(module, args, tmp_path, capsys):
    """Like `bench`'s: one error line naming the command (no usage block), status 2; an --out that is a file is
    refused before anything is exported or predicted."""
    import importlib

    main_of = importlib.import_module(module).main
    taken = tmp_path / "taken.csv"
    taken.write_text("x")
    for argv, says in [([*args, "--out", str(taken)], f"--out: {taken} exists and is not a folder"), (["--nope"], "")]:
        assert _status(main_of, argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: python -m ") and says in err, err


def _status(main_of, argv: list[str]) -> int:
    """A command line's exit status, returned or raised (argparse exits from inside ``main``)."""
    try:
        return main_of(argv)
    except SystemExit as e:
        return e.code


def test_counted_nouns_are_plural_unless_one():
    assert [count(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]
    assert count(1, "batch", "batches") == "1 batch" and count(3, "batch", "batches") == "3 batches"
