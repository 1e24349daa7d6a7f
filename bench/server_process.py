"""A real server in a process group of its own, for the benchmark and the soak test (loopback only)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(flags: list, log_path: Path, timeout: float = 300, ready_line: str = "ready to serve") -> subprocess.Popen:
    """Run ``jina_server.py FLAGS`` and wait until it is ready to serve."""
    command = [sys.executable, str(ROOT / "jina_server.py"), *flags]
    server = subprocess.Popen(command, cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    deadline = time.monotonic() + timeout
    while ready_line not in log_path.read_text(errors="replace"):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_server(server)
            raise SystemExit(f"the server did not start; see {log_path}")
        time.sleep(0.25)
    return server


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the whole group, SIGKILL to what is left of it after 30 s; returns when every process of the
    group is gone, not only its leader (a worker still stopping would share the CPU with the next server's
    measures)."""
    try:
        members = psutil.Process(server.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        members = []
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    except ProcessLookupError:
        pass
    _, alive = psutil.wait_procs(members, timeout=30)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def executor_process(server: subprocess.Popen) -> psutil.Process:
    """The child that holds the model: the one with the largest RSS."""
    return max(psutil.Process(server.pid).children(recursive=True), key=lambda p: p.memory_info().rss)


def cpu_seconds(process: psutil.Process, window: float) -> float:
    """CPU time (user + system) the process used during the next ``window`` seconds."""
    before = sum(process.cpu_times()[:2])
    time.sleep(window)
    return sum(process.cpu_times()[:2]) - before


def busiest(pids: list) -> int:
    """The process among ``pids`` that used the most CPU time over the next half second (the one generating)."""
    processes = [psutil.Process(pid) for pid in pids]
    before = [sum(p.cpu_times()[:2]) for p in processes]
    time.sleep(0.5)
    used = [sum(p.cpu_times()[:2]) - start for p, start in zip(processes, before)]
    return pids[used.index(max(used))]
