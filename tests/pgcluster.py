"""A PostgreSQL cluster a test owns: ``initdb`` into a temporary directory, started with ``pg_ctl``
on a free loopback port, so that a test can restart or stop the database under running server
nodes (the shared server on 5432 of tests/pg.py is never restarted by a test).

Trust auth, the Unix socket in the cluster's own directory, durability settings off (fsync,
full-page writes): a clean restart keeps every committed row all the same, because a fast
shutdown writes a checkpoint; only an OS crash could lose data, and the directory is thrown away.

PostgreSQL refuses to run as root. When the tests run as root (CI containers), the server
programs run as the ``postgres`` system user (``runuser -u postgres --``) and the directory is
chowned to it; the directory is made outside pytest's ``tmp_path``, whose parents are private to
root. When the binaries or that user are missing, :func:`require_binaries` skips the test and says
why.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import pytest

DEFAULT_BIN_DIRS = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin",
                    "/usr/lib/postgresql/14/bin")
RUN_AS = "postgres"  # the unprivileged user the server runs as when the tests run as root


def find_bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: ``PIPEPROOF_TEST_PG_BIN``, a Debian versioned directory, or PATH."""
    candidates = [os.environ.get("PIPEPROOF_TEST_PG_BIN", ""), *DEFAULT_BIN_DIRS]
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).parent))
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def require_binaries() -> Path:
    """The binaries' directory, or skip the test saying what is missing."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql or set "
                    "PIPEPROOF_TEST_PG_BIN")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            pytest.skip(f"running as root and there is no {RUN_AS!r} user to run PostgreSQL as "
                        "(PostgreSQL refuses to run as root)")
        if shutil.which("runuser") is None:
            pytest.skip("running as root and runuser is missing: cannot run PostgreSQL as an unprivileged user")
    return bin_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """A private PostgreSQL server; ``start()`` (initdb on first start), ``restart()``, ``stop()``,
    ``close()`` (stop and remove the directory), a context manager. ``url`` is a
    ``postgresql+asyncpg://`` URL of its ``postgres`` database (:meth:`url_for` another one)."""

    def __init__(self, bin_dir: Path | None = None, *, startup_timeout: float = 30.0) -> None:
        self.bin_dir = bin_dir or require_binaries()
        self.startup_timeout = startup_timeout
        self.as_root = os.geteuid() == 0
        # World-traversable /tmp rather than tmp_path: the postgres user must reach the directory.
        self.dir = Path(tempfile.mkdtemp(prefix="pipeproof-pg-"))
        self.data = self.dir / "data"
        self.sockets = self.dir / "run"
        self.logfile = self.dir / "postgres.log"
        self.port = 0
        self._initialised = False
        self.sockets.mkdir()
        if self.as_root:
            user = pwd.getpwnam(RUN_AS)
            for p in (self.dir, self.sockets):
                os.chown(p, user.pw_uid, user.pw_gid)

    # -- the programs --------------------------------------------------------------------------------
    def _run(self, program: str, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / program), *args]
        if self.as_root:
            cmd = ["runuser", "-u", RUN_AS, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or self.startup_timeout,
                              cwd=self.dir)
        if proc.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}\n"
                               f"--- {self.logfile}:\n{log[-4000:]}")
        return proc

    def _options(self) -> str:
        return (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c full_page_writes=off -c synchronous_commit=off -c max_connections=200")

    def _pg_ctl(self, action: str, *extra: str) -> None:
        self._run("pg_ctl", action, "-D", str(self.data), "-w", "-t", str(int(self.startup_timeout)),
                  "-l", str(self.logfile), *extra)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> PgCluster:
        if not self._initialised:
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                      "--locale=C", "--no-sync", "--no-instructions")
            self._initialised = True
        if self.port:
            self._pg_ctl("start", "-o", self._options())
            return self
        for attempt in range(3):  # a free port can be taken between probing and binding
            self.port = _free_port()
            try:
                self._pg_ctl("start", "-o", self._options())
                return self
            except RuntimeError:
                if attempt == 2:
                    raise
        return self

    def restart(self) -> None:
        """A fast restart on the same port: open connections are terminated, data is kept."""
        self._pg_ctl("restart", "-m", "fast", "-o", self._options())

    def stop(self) -> None:
        """A fast shutdown (open connections terminated); ``start()`` brings it back on the same port."""
        if self.running:
            self._pg_ctl("stop", "-m", "fast")

    @property
    def running(self) -> bool:
        if not self._initialised:
            return False
        cmd = [str(self.bin_dir / "pg_ctl"), "status", "-D", str(self.data)]
        if self.as_root:
            cmd = ["runuser", "-u", RUN_AS, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- addresses ------------------------------------------------------------------------------------
    def url_for(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.url_for("postgres")


__all__ = ["PgCluster", "find_bin_dir", "require_binaries"]
