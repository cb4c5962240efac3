"""A throwaway PostgreSQL server for the tests: ``initdb`` + ``pg_ctl`` in a fresh /tmp folder, on a free port of 127.0.0.1.

The conftest's ``postgres_url`` / ``fresh_db`` fixtures wrap :class:`PostgresServer`.  Server binaries come from
/usr/lib/postgresql/<highest version>/bin (where Debian keeps them, off PATH), else from PATH.  PostgreSQL refuses
to run as root, so under root the folder is handed to the ``postgres`` user and initdb/pg_ctl run through
``runuser -u postgres --``.  Every subprocess call is bounded by a timeout.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

NO_POSTGRES_ENV = "BENCH_NO_POSTGRES"  # =1: skip the tests that need the server instead of failing
SUPERUSER = "postgres"  # the database superuser initdb creates (trust auth: no password)
OS_USER = "postgres"  # the system user the server runs as when the tests run as root (Debian's package makes it)
TIMEOUT_S = 60  # bound on every subprocess call
START_WAIT_S = 30  # pg_ctl -w -t: how long pg_ctl waits for the server to accept connections
START_TRIES = 3  # a free port can be taken between picking it and the server binding it; retry on another
INSTALL_HINT = (
    f"install PostgreSQL's server binaries (Debian: apt-get install -y postgresql, as .ci/run does), "
    f"or set {NO_POSTGRES_ENV}=1 to skip the tests that need them"
)


class PostgresMissing(RuntimeError):
    """No ``initdb``/``pg_ctl`` on this machine."""


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    """(15,) for /usr/lib/postgresql/15/bin, (9, 6) for .../9.6/bin; () for a name that is not a version."""
    name = bin_dir.parent.name
    return tuple(int(p) for p in name.split(".")) if re.fullmatch(r"\d+(\.\d+)*", name) else ()


def find_binaries() -> tuple[Path, Path]:
    """``(initdb, pg_ctl)``: /usr/lib/postgresql/<highest version>/bin, else PATH; :class:`PostgresMissing` if neither."""
    for bin_dir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True):
        initdb, pg_ctl = bin_dir / "initdb", bin_dir / "pg_ctl"
        if os.access(initdb, os.X_OK) and os.access(pg_ctl, os.X_OK):
            return initdb, pg_ctl
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(initdb), Path(pg_ctl)
    raise PostgresMissing(
        f"PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin "
        f"nor on PATH: {INSTALL_HINT}"
    )


def _exit_on_sigterm() -> None:
    """SIGTERM (``timeout``, a CI job cancelled) kills Python without running :mod:`atexit`, which would leave the
    server running; as SystemExit it unwinds and the server stops.  Only where SIGTERM still has its default action."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL server in its own temp folder (data, log ``DIR/log`` and unix socket), on ``127.0.0.1:port``.

    ``start()`` then ``stop()`` (idempotent; also registered with :mod:`atexit`, in case a session dies before
    its fixture's teardown), or use it as a context manager.
    """

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = find_binaries()
        self.as_root = os.geteuid() == 0
        self.dir: Path | None = None
        self.port: int | None = None
        self._running = False

    # -- processes ----------------------------------------------------------------------------------------
    def _run(self, *cmd: str | Path, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` as the server's owner (``runuser -u postgres --`` when root), in the server folder."""
        argv = [str(c) for c in cmd]
        if self.as_root:
            argv = ["runuser", "-u", OS_USER, "--", *argv]
        # cwd: the server's owner may not be allowed into the tests' own working directory.
        return subprocess.run(
            argv,
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
        )

    def _check(self, what: str, proc: subprocess.CompletedProcess[str]) -> None:
        if proc.returncode != 0:
            raise RuntimeError(
                f"{what} failed (exit {proc.returncode}): {' '.join(proc.args)}\n"
                f"{proc.stdout}{proc.stderr}{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        log = self.dir / "log" if self.dir else None
        if log is None or not log.is_file():
            return ""
        return "--- server log (tail) ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    # -- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> PostgresServer:
        if self.as_root and shutil.which("runuser") is None:
            raise RuntimeError(
                "running as root, but runuser (util-linux) is missing: PostgreSQL refuses to run as root"
            )
        # /tmp rather than pytest's tmp_path: under root, that is inside a 0700 folder the postgres user cannot reach.
        self.dir = Path(tempfile.mkdtemp(prefix="bench-pg-", dir="/tmp"))
        atexit.register(self.stop)
        _exit_on_sigterm()
        try:
            if self.as_root:
                try:
                    owner = pwd.getpwnam(OS_USER)
                except KeyError:
                    raise RuntimeError(
                        f"running as root, but there is no {OS_USER!r} user to run the server as: {INSTALL_HINT}"
                    ) from None
                os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            self._check(
                "initdb",
                self._run(
                    self.initdb, "-D", self.dir, "-A", "trust", "-U", SUPERUSER, "--no-sync", "-E", "UTF8", "--locale=C"
                ),
            )
            for attempt in range(START_TRIES):
                self.port = free_port()
                opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
                proc = self._run(
                    self.pg_ctl,
                    "-D",
                    self.dir,
                    "-l",
                    self.dir / "log",
                    "-w",
                    "-t",
                    str(START_WAIT_S),
                    "-o",
                    opts,
                    "start",
                    timeout=START_WAIT_S + 30,
                )
                if proc.returncode == 0:
                    self._running = True
                    break
                if attempt == START_TRIES - 1 or "could not bind" not in self.log_tail(10):
                    self._check("pg_ctl start", proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (``pg_ctl -m immediate``; SIGKILL to the postmaster if that fails) and remove the folder."""
        if self.dir is None:
            return
        try:
            if self._running or (self.dir / "postmaster.pid").exists():
                try:
                    proc = self._run(
                        self.pg_ctl, "-D", self.dir, "-m", "immediate", "-w", "-t", "20", "stop", timeout=30
                    )
                    stopped = proc.returncode == 0
                except subprocess.TimeoutExpired:
                    stopped = False
                if not stopped:
                    self._kill_postmaster()
        finally:
            self._running = False
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _kill_postmaster(self) -> None:
        """Last resort: SIGKILL the postmaster this server's ``postmaster.pid`` names (the one we started)."""
        try:
            pid = int((self.dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases ----------------------------------------------------------------------------------------
    def url(self, dbname: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def _admin(self):
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", connect_timeout=10)
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
        return conn

    def create_database(self, dbname: str | None = None) -> str:
        """Create database ``dbname`` (default: a new unique ``bench_<hex>``) and return its URL."""
        from psycopg2 import sql

        dbname = dbname or f"bench_{uuid.uuid4().hex[:16]}"
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        finally:
            conn.close()
        return self.url(dbname)

    def drop_database(self, dbname: str) -> None:
        """Drop ``dbname``, closing any connections still open to it (a test's SQLAlchemy pool, say)."""
        from psycopg2 import sql

        conn = self._admin()
        try:
            force = sql.SQL(" WITH (FORCE)" if conn.server_version >= 130000 else "")  # FORCE: PostgreSQL 13+
            with conn.cursor() as cur:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}{}").format(sql.Identifier(dbname), force))
        finally:
            conn.close()
