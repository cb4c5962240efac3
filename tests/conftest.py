"""Shared fixtures: the data root, small synthetic WARWICK-style data sets and a throwaway PostgreSQL server."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# tests/ itself is on sys.path (a rootdir conftest without __init__.py), so this works under both `pytest` and
# `python -m pytest`; `tests.postgres` would need the repository root there too.
from postgres import NO_POSTGRES_ENV, PostgresMissing, PostgresServer

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # Resolve $BENCH_DATA once, against the directory pytest was started from: a relative form
    # (BENCH_DATA=../shared/data) works, and tests run commands from other directories.
    if os.environ.get("BENCH_DATA"):
        os.environ["BENCH_DATA"] = str(Path(os.environ["BENCH_DATA"]).expanduser().resolve())
    # The tests' trainers take turns at the cores among themselves (bench.files.hold_cores), not with a long training
    # job of the same user on this machine, which would hold them for hours.
    os.environ["BENCH_CORE_SLOTS"] = tempfile.mkdtemp(prefix="bench-test-cores-")


@pytest.fixture(autouse=True)
def messages() -> None:
    """The command line's stderr handler at its default verbosity (bench.log), as every command installs it: a test
    that calls the library directly reads the same lines, and one command's --quiet does not carry into the next test."""
    import bench.log

    bench.log.setup()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """$BENCH_DATA, else <repo>/../shared/data; tests that need the real data skip without it."""
    root = Path(os.environ.get("BENCH_DATA") or REPO.parent / "shared" / "data").resolve()
    if not root.is_dir():
        pytest.skip(f"data root {root} not found (set BENCH_DATA)")
    return root


def write_warwick(
    folder: Path, n_train: int = 6, n_test: int = 3, size: tuple[int, int] = (32, 32), seed: int = 0
) -> Path:
    """Write a tiny synthetic WARWICK-layout data set (RGB images with blue = 0, 0/255 labels).

    Returns ``folder``; images are ``(H, W) = size``.  Glands are random discs, and the image
    is brighter inside them, so a model can learn something in a few steps.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    rr, cc = np.mgrid[:h, :w]
    for split, n in (("Train", n_train), ("Test", n_test)):
        d = folder / split
        d.mkdir(parents=True, exist_ok=True)
        for k in range(1, n + 1):
            mask = np.zeros((h, w), bool)
            for _ in range(3):
                r0, c0, rad = rng.integers(0, h), rng.integers(0, w), rng.integers(2, max(3, min(h, w) // 4))
                mask |= (rr - r0) ** 2 + (cc - c0) ** 2 <= rad**2
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = rng.integers(0, 80, (h, w)) + 100 * mask
            img[..., 1] = rng.integers(0, 80, (h, w)) + 60 * mask
            Image.fromarray(img, "RGB").save(d / f"image_{k:02d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255, "L").save(d / f"label_{k:02d}.png")
    return folder


@pytest.fixture(scope="session")
def make_warwick():
    """The :func:`write_warwick` writer, for tests that need several or odd-sized data sets."""
    return write_warwick


@pytest.fixture
def synthetic_warwick(tmp_path: Path) -> Path:
    """A fresh tiny synthetic data set (6 train, 3 test pairs of 32x32) in a tmp folder."""
    return write_warwick(tmp_path / "WARWICK")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the session's own (tests/postgres.py), started on first use, stopped and removed at the end.

    $BENCH_NO_POSTGRES=1 skips the tests that use it; without the server binaries they fail, saying what to install.
    """
    if os.environ.get(NO_POSTGRES_ENV) == "1":
        pytest.skip(f"{NO_POSTGRES_ENV}=1: no PostgreSQL server")
    try:
        server = PostgresServer()
    except PostgresMissing as e:
        pytest.fail(str(e), pytrace=False)
    with server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """``postgresql://postgres@127.0.0.1:PORT/bench_test``: one database shared by the whole session."""
    return postgres_server.create_database("bench_test")


@pytest.fixture
def fresh_db(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a new, uniquely named, empty database on the session's server (dropped after the test),
    so that tests do not see each other's Optuna studies."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url.rsplit("/", 1)[1])
