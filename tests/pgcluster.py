"""A throwaway PostgreSQL cluster for the test suite, on loopback in a temporary directory."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import sqlalchemy as sa


def asyncpg_dsn(url: str | sa.URL) -> str:
    """A DSN for asyncpg from a SQLAlchemy ``postgresql+asyncpg://`` URL."""
    parsed = sa.make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def _bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name)
    )
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """initdb + pg_ctl start; as root, the server runs as the ``postgres`` user."""

    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL server binaries (initdb) not found")
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="linger-pg-"))
        self.port = _free_port()
        self.user: str | None = "postgres" if os.geteuid() == 0 else None
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(
            command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.dir
        )

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> str:
        data = self.dir / "data"
        self._run(
            "initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=200"
        )
        if not self.durable:  # tests: speed over the crash safety of a throwaway cluster
            options += " -c fsync=off -c full_page_writes=off"
        options += self._tls(data)
        self._options = options
        self._run(
            "pg_ctl", "-D", str(data), "-o", options, "-l", str(self.dir / "log"), "-w", "start"
        )
        return self.url

    @property
    def pid(self) -> int:
        """The process id of the postmaster."""
        return int((self.dir / "data" / "postmaster.pid").read_text().split()[0])

    @property
    def log(self) -> Path:
        return self.dir / "log"

    def _tls(self, data: Path) -> str:
        """Server options for TLS with a self-signed certificate (clients may ask for
        ``ssl=require``), when openssl is there."""
        openssl = shutil.which("openssl")
        if openssl is None:
            return ""
        cert, key = data / "server.crt", data / "server.key"
        request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        subject = ["-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)]
        subprocess.run([openssl, *request, *subject], check=True, capture_output=True)
        key.chmod(0o600)
        if self.user:
            pw = pwd.getpwnam(self.user)
            for path in (cert, key):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        return f" -c ssl=on -c ssl_cert_file={cert} -c ssl_key_file={key}"

    def deadlocks(self, since: int = 0) -> list[str]:
        """The server log's deadlock reports after byte ``since``."""
        with self.log.open("rb") as log:
            log.seek(since)
            return [
                line
                for line in log.read().decode(errors="replace").splitlines()
                if "deadlock detected" in line
            ]

    def log_size(self) -> int:
        return self.log.stat().st_size

    def stop_server(self) -> None:
        """Stop the server, keeping its data (an outage)."""
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def start_server(self) -> None:
        """Start the server again after ``stop_server``."""
        self._run(
            "pg_ctl",
            "-D",
            str(self.dir / "data"),
            "-o",
            self._options,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
