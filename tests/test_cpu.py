"""userllm.utils.cpu: the automatic thread count."""

import pytest

from userllm.utils import cpu


def test_omp_num_threads_is_taken_as_given(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu.automatic_threads() == 3


@pytest.mark.parametrize("busy, idle", [(0, 4), (200, 2), (290, 1), (400, 1)])
def test_idle_cores_counts_the_cores_others_keep_busy(monkeypatch, busy, idle):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 4)
    monkeypatch.setattr(cpu.os, "cpu_count", lambda: 4)
    samples = iter([(1000, 4000), (1000 + busy, 4000 + 400)])   # `busy` of 400 jiffies over 4 cores
    monkeypatch.setattr(cpu, "_cpu_jiffies", lambda: next(samples))
    assert cpu.idle_cores(sample_seconds=0) == idle


def test_unmeasurable_machines_get_one_thread(monkeypatch):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 8)
    monkeypatch.setattr(cpu, "_cpu_jiffies", lambda: None)
    assert cpu.idle_cores(sample_seconds=0) == 1


def test_reads_this_machine():
    assert 1 <= cpu.idle_cores() <= cpu.usable_cores()
