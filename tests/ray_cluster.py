"""Real Ray clusters on 127.0.0.1 for the cluster tests, started the way a user starts them.

A head with ``ray start --head`` and worker nodes with ``ray start --address``, each node
in its own temp dir: a node's daemons name that dir on their command line and its
workers are their descendants, so one node can be killed alone (as a machine dies) and
the whole cluster stopped without touching the test session's own Ray instance.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from conftest import free_port, wait_for_port

from protein_ray.serve_settings import HIGH_THROUGHPUT_ENV

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A dead node is noticed in ~3 s instead of Ray's default ~30 s (health checks of the
# raylets by the GCS); set on the head, whose GCS runs them.
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def cli_env(address: str | None = None) -> dict:
    env = dict(os.environ)
    # A local ray.init() earlier in this session created ~/.ray/auth_token, so the
    # cluster runs with token auth: every client must say so explicitly.
    env.update(RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    if address:
        env["RAY_ADDRESS"] = address
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(command: list[str], env: dict, timeout: int, retry_if: str | None = None) -> str:
    """Run a CLI; with ``retry_if``, retry for up to a minute while its output says so."""
    deadline = time.monotonic() + 60
    while True:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output = result.stdout + result.stderr
        if result.returncode == 0 or not retry_if or retry_if not in output or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{output[-4000:]}"
    return output


def serve_high_throughput_env() -> dict:
    """Serve's high-throughput mode, as cluster.yaml starts every node; HAProxy's own
    metrics and stats ports are fixed (9101, 8404) unless set, so free ones keep a test
    clear of whatever else listens on this machine."""
    return HIGH_THROUGHPUT_ENV | {"RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                                  "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}


def haproxy_listens_on(port: int) -> bool:
    """Whether an HAProxy that Serve started has its HTTP frontend on ``port`` (from its
    config file): the answers on that port come through HAProxy, not Ray's Python proxy."""
    for process in psutil.process_iter(["name", "cmdline"]):
        command = process.info["cmdline"] or []
        if process.info["name"] == "haproxy" and "-f" in command:
            config = Path(command[command.index("-f") + 1])
            if config.is_file() and re.search(rf"^\s*bind \S*:{port}\s*$", config.read_text(), re.MULTILINE):
                return True
    return False


def agent_ports() -> list[str]:
    """Free ports for a node's agents: their defaults (52365, ...) are taken by the test
    session's own Ray instance, and a node whose job agent cannot bind accepts no jobs."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


@dataclass
class Node:
    temp_dir: str

    def processes(self) -> list[psutil.Process]:
        daemons = [p for p in psutil.process_iter(["cmdline"]) if self.temp_dir in " ".join(p.info["cmdline"] or [])]
        found = {p.pid: p for d in daemons for p in [d, *safe_children(d)]}
        return list(found.values())

    def running(self) -> list[str]:
        """Command lines of this node's processes: a Ray worker's names what it runs
        (``ray::MapBatches(decode_chunks)``, ``ray::IDLE``)."""
        return [command_line(p) for p in self.processes()]

    def kill(self) -> list[str]:
        """SIGKILL every process of this node, as when its machine dies; returns their command lines."""
        doomed = self.processes()
        names = []
        for process in doomed:
            try:
                names.append(command_line(process))
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(doomed, timeout=30)
        return names


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def safe_children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@dataclass
class LocalCluster:
    head_cpus: int
    extra_env: dict = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)

    def start(self) -> LocalCluster:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        env = cli_env() | self.extra_env
        run([str(BIN / "ray"), "start", "--head", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1", f"--num-cpus={self.head_cpus}",
             *agent_ports(), "--include-dashboard=true", f"--temp-dir={self.new_temp_dir()}",
             "--disable-usage-stats"], env, timeout=180)
        wait_for_port(self.dashboard_port, timeout_s=60)
        return self

    @property
    def address(self) -> str:
        """For drivers (``RAY_ADDRESS``/``--address``)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """For the Jobs and Serve CLIs."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def new_temp_dir(self) -> str:
        # Short on purpose: Ray puts AF_UNIX sockets (107-byte path limit) under
        # <temp-dir>/session_<date>_<pid>/sockets/, which pytest's deep tmp paths overflow.
        node = Node(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))
        self.nodes.append(node)
        return node.temp_dir

    def add_node(self, num_cpus: int) -> Node:
        """A worker node joining the head; returns once the head counts its CPUs."""
        before = self.alive_nodes()
        run([str(BIN / "ray"), "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
             f"--num-cpus={num_cpus}", *agent_ports(), f"--temp-dir={self.new_temp_dir()}",
             "--disable-usage-stats"], cli_env() | self.extra_env, timeout=180)
        # A node killed just before may still count as alive: wait for one the head did not know.
        wait_until(lambda: self.alive_nodes() - before, 60, "the new node registered")
        return self.nodes[-1]

    def alive_nodes(self) -> set[str]:
        """Ids of the nodes the head sees alive (the State API, through the CLI for its auth token)."""
        output = run([str(BIN / "ray"), "list", "nodes", "--address", self.dashboard, "--format", "json"],
                     cli_env(), timeout=60)
        return {n["node_id"] for n in json.loads(output[output.index("["):]) if n["state"] == "ALIVE"}

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
            shutil.rmtree(node.temp_dir, ignore_errors=True)


def wait_until(condition, timeout_s: float, what: str, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = condition()
        except AssertionError:
            raise
        except Exception:  # noqa: BLE001 - a service still starting answers with errors
            value = None
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"not true after {timeout_s} s: {what}")


def read_json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
