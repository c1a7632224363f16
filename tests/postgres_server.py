"""A real, throwaway PostgreSQL server for the tests, from Debian's binaries (`apt-get install
postgresql`; .ci/run installs it). PostgreSQL refuses to run as root, so under root the server
runs as the `postgres` user that Debian's package creates, in a temporary folder of its own."""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import psycopg
from browser import free_port

USER = "unet"


def find_bindir() -> Path | None:
    """The newest Debian PostgreSQL's bin folder, else the one holding `initdb` on PATH."""

    def version(initdb: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", initdb.parent.parent.name))

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=version)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def why_not() -> str | None:
    """Why no server can be started here, or None when one can."""
    if find_bindir() is None:
        return "PostgreSQL's server binaries (initdb, pg_ctl) are not installed: " + (
            "apt-get install postgresql"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no 'postgres' user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root, and there is no runuser to start the server as 'postgres'"
    return None


@dataclass
class PostgresServer:
    port: int
    password: str
    _names: Iterator[int] = field(default_factory=count)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database (one per test keeps tests independent)."""
        name = f"test_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a server on a free port of 127.0.0.1, with password authentication (so that the
    URLs carry user:password@host:port, as in production), and remove it afterwards."""
    bindir = find_bindir()
    assert bindir is not None, why_not()
    as_postgres: list[str] = []
    home = Path(tempfile.mkdtemp(prefix="unet-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(home, user.pw_uid, user.pw_gid)
        as_postgres = [str(shutil.which("runuser")), "-u", "postgres", "--"]
    password = secrets.token_hex(12)
    pwfile = home / "password"
    pwfile.write_text(password + "\n")
    if as_postgres:
        os.chown(pwfile, user.pw_uid, user.pw_gid)
    data, log = home / "data", home / "server.log"

    def run(*argv: str) -> None:
        # No stdin: CI runs without one, and nothing here may wait for a prompt. The server's
        # own folder as the working directory: `postgres` may not enter the checkout's.
        done = subprocess.run(
            [*as_postgres, *argv],
            cwd=home,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {done.stderr}{done.stdout}{tail}")

    try:
        run(
            str(bindir / "initdb"),
            *("-D", str(data), "-U", USER, "--pwfile", str(pwfile), "--auth=scram-sha-256"),
            *("--encoding=UTF8", "--locale=C", "--no-sync"),
        )
        for attempt in range(3):
            port = free_port()
            # Durability settings off: these databases live for one test session.
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={home}"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            try:
                run(
                    str(bindir / "pg_ctl"),
                    "start",
                    "-w",
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-o",
                    options,
                )
                break
            except RuntimeError:
                # Another process may have taken the free port in the meantime: try another.
                if attempt == 2:
                    raise
        yield PostgresServer(port=port, password=password)
    finally:
        if (data / "postmaster.pid").exists():
            run(str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate")
        shutil.rmtree(home, ignore_errors=True)
