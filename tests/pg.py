"""A throwaway PostgreSQL server for tests and benchmarks.

``PostgresServer`` finds Debian's binaries (``/usr/lib/postgresql/*/bin``), installs the
``postgresql`` package when they are missing and we are root (``apt-get install -y
postgresql``), creates a cluster in a temporary folder (owned by the ``postgres`` user when we
are root: the server refuses to run as root), starts it on a free loopback port (127.0.0.1
only, its unix socket in the same temporary folder, trust authentication: for local tests
only), creates a database and gives its SQLAlchemy URL. ``stop()`` stops it (``pg_ctl stop -m
fast``) and removes the folder.

    with PostgresServer() as pg:
        url = pg.url   # postgresql+psycopg://postgres@127.0.0.1:PORT/mpsearch

``Unavailable`` says why a server cannot be had here (the tests that need one fail with that reason).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "postgres"


class Unavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says why."""


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.parent.name.split(".")])
    return Path(found[-1]).parent if found else None


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _install() -> None:
    """apt-get install -y postgresql (after apt-get update when the first try fails)."""
    if shutil.which("apt-get") is None:
        raise Unavailable("PostgreSQL binaries not found and apt-get is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        raise Unavailable(f"apt-get install postgresql failed: {tail[0]}")


def find_binaries(install: bool = True) -> Path:
    """Directory of initdb/pg_ctl, installing Debian's postgresql package if needed and allowed."""
    d = _bin_dir()
    if d is None and install and _is_root():
        _install()
        d = _bin_dir()
    if d is None:
        why = "not root, so the postgresql package cannot be installed" if not _is_root() else "install did not provide it"
        raise Unavailable(f"PostgreSQL binaries not found under /usr/lib/postgresql/*/bin ({why})")
    return d


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, database: str = "mpsearch", durable: bool = False, install: bool = True):
        """``durable=False`` turns fsync and synchronous commit off (fast; fine for throwaway data)."""
        self.database = database
        self.durable = durable
        self.install = install
        self.tmp: Path | None = None
        self.port: int | None = None
        self._started = False

    # ------------------------------------------------------------------------------------
    def _as_owner(self, cmd: list[str]) -> list[str]:
        if _is_root():
            if shutil.which("runuser"):
                return ["runuser", "-u", SUPERUSER, "--", *cmd]
            return ["su", SUPERUSER, "-s", "/bin/sh", "-c", " ".join(f"'{c}'" for c in cmd)]
        return cmd

    def _run(self, cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run(self._as_owner(cmd), capture_output=True, text=True, timeout=timeout, cwd=self.tmp)
        if r.returncode != 0:
            log = ""
            if self.tmp is not None and (self.tmp / "server.log").exists():
                log = "\n" + (self.tmp / "server.log").read_text()[-2000:]
            raise Unavailable(f"{Path(cmd[0]).name} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-1000:]}{log}")
        return r

    def start(self) -> "PostgresServer":
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise Unavailable("psycopg is not installed (pip install 'psycopg[binary]', the postgres extra)") from None
        bins = find_binaries(self.install)
        if _is_root():
            try:
                owner = pwd.getpwnam(SUPERUSER)
            except KeyError:
                raise Unavailable(f"running as root but there is no {SUPERUSER!r} user to run the server") from None
        self.tmp = Path(tempfile.mkdtemp(prefix="mpsearch-pg-"))
        data, sock = self.tmp / "data", self.tmp / "sock"
        sock.mkdir()
        if _is_root():
            for p in (self.tmp, sock):
                os.chown(p, owner.pw_uid, owner.pw_gid)
        self._run([str(bins / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                   "--locale=C", "--no-sync"], timeout=300)
        opts = f"-c listen_addresses=127.0.0.1 -k {sock} -c max_connections=100"
        if not self.durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        for attempt in range(3):  # a free port may be taken between the probe and the start
            self.port = free_port()
            try:
                self._run([str(bins / "pg_ctl"), "-D", str(data), "-l", str(self.tmp / "server.log"), "-w", "-t", "120",
                           "-o", f"{opts} -p {self.port}", "start"], timeout=180)
                break
            except Unavailable:
                if attempt == 2:
                    raise
        self._started = True
        self._bins = bins
        self._run([str(bins / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, self.database])
        return self

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{self.database}"

    def create_database(self, name: str) -> str:
        """Another empty database on the same server; its URL."""
        self._run([str(self._bins / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name])
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            if self._started:
                self._started = False
                subprocess.run(self._as_owner([str(self._bins / "pg_ctl"), "-D", str(self.tmp / "data"), "-m", "fast",
                                               "-w", "stop"]), capture_output=True, timeout=120)
        finally:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None

    def __enter__(self) -> "PostgresServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def postgres_fixture():
    """Body of a session-scoped pytest fixture: yields the server, or fails with the reason (``make test``
    runs as a user that can install PostgreSQL; a skipped test would prove nothing in CI)."""
    import pytest

    server = PostgresServer()
    try:
        server.start()
    except Unavailable as exc:
        server.stop()
        pytest.fail(f"PostgreSQL unavailable: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()
