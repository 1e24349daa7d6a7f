"""Replicas on one machine compute on their share of its cores (executor.executor.share_the_cpu)."""

import os

import torch

from executor.executor import CPU_THREADS_ENV, cpu_threads, share_the_cpu


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
