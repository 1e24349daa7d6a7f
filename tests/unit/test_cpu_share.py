"""Replicas on one machine compute on their share of its cores (executor.executor.share_the_cpu); set-up runs in a
passing thread so that the engine thread alone keeps OpenMP workers (executor.model.in_passing_thread)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from executor.executor import CPU_THREADS_ENV, cpu_threads, share_the_cpu
from executor.model import in_passing_thread


def test_the_share_is_a_count_or_the_cores_divided_by_the_replicas():
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads("3") == 3
    assert cpu_threads("share:2") == max(1, cores // 2)
    assert cpu_threads(f"share:{cores * 4}") == 1, "never less than one thread"
    for unset in (None, "", "0", "-1", "share:0", "share:x", "many"):
        assert cpu_threads(unset) is None, unset


def test_the_replica_takes_its_share(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(CPU_THREADS_ENV, "1")
        share_the_cpu()
        assert torch.get_num_threads() == 1
        monkeypatch.delenv(CPU_THREADS_ENV)
        torch.set_num_threads(before)
        share_the_cpu()
        assert torch.get_num_threads() == before, "unset: torch's own choice stays"
    finally:
        torch.set_num_threads(before)


PARALLEL_WORK = """
import os, sys, time, torch
sys.path.insert(0, {root!r})
from executor.model import in_passing_thread

def threads(settled_at=None):
    # a finished thread's workers leave asynchronously: wait (5 s at most) for the count to settle
    deadline = time.monotonic() + 5
    while settled_at is not None and len(os.listdir("/proc/self/task")) != settled_at and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(os.listdir("/proc/self/task"))

def work():
    return float(torch.ones(1 << 22).sum())

start = threads()
assert in_passing_thread(work) == float(1 << 22)
after_passing = threads(settled_at=start)
work()
print(start, after_passing, threads())
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not os.path.isdir("/proc/self/task"),
                    reason="OpenMP starts workers only with 2+ CPUs; threads are counted in /proc")
def test_set_up_in_a_passing_thread_leaves_no_openmp_workers_behind():
    """The engine thread's decode steps are only fast while no other live thread holds OpenMP workers
    (model.in_passing_thread): work done in a passing thread leaves none, the same work in the main thread
    leaves its workers for the life of the process."""
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", PARALLEL_WORK.format(root=root)], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    start, after_passing, after_main = map(int, out)
    assert after_passing == start, "the passing thread's OpenMP workers ended with it"
    assert after_main > start, "the same work in the main thread keeps its workers (what the helper avoids)"


def test_a_passing_thread_returns_the_result_and_raises_the_error():
    assert in_passing_thread(lambda: 41 + 1) == 42
    with pytest.raises(ValueError, match="bad"):
        in_passing_thread(lambda: (_ for _ in ()).throw(ValueError("bad")))
