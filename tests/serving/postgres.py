"""A private PostgreSQL server for the tests: `initdb` in a temporary folder, `pg_ctl` on a loopback
port, trust authentication for the user `kbi`. PostgreSQL refuses to run as root, so as root the
server runs as `nobody` (through `runuser`), in a folder that user owns."""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self):
        missing = [tool for tool in ("initdb", "pg_ctl") if shutil.which(tool) is None]
        if missing:
            raise RuntimeError(f"PostgreSQL's {' and '.join(missing)} are not on PATH: install the PostgreSQL server "
                               "(Debian: postgresql) to run the shared session store's tests.")
        self.folder = tempfile.mkdtemp(prefix="kbi-pg-")  # in /tmp, not under root's private pytest folder
        self.data = os.path.join(self.folder, "data")
        self.port = free_port()
        self.url = f"postgresql://kbi@127.0.0.1:{self.port}/postgres"
        self.prefix = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.folder, nobody.pw_uid, nobody.pw_gid)
            self.prefix = ["runuser", "-u", "nobody", "--"]
        self._run("initdb", "-D", self.data, "-U", "kbi", "--auth=trust", "--no-sync")
        self.start()

    def _run(self, *command):
        result = subprocess.run([*self.prefix, *command], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-2000:]}")

    def start(self):
        options = f"-k {self.folder} -p {self.port} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run("pg_ctl", "-D", self.data, "-o", options, "-l", os.path.join(self.folder, "log"), "-w", "start")

    def stop(self, mode="fast"):
        """`fast` rolls back open transactions and disconnects every client; `immediate` is a crash."""
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def close(self):
        try:
            self.stop("immediate")
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.folder, ignore_errors=True)
