"""torch's CPU threads follow the idle cores: a core another process keeps busy is left to it."""

import os

import pytest

from comfyui_distillery import cpu_share


@pytest.mark.parametrize("busy_share, expected", [(0.0, 2), (0.5, 1), (0.45, 1), (1.0, 1), (0.2, 2)])
def test_threads_are_the_idle_cores(monkeypatch, busy_share, expected):
    readings = iter([(0, 0), (int(busy_share * 1000), 1000)])
    monkeypatch.setattr(cpu_share, "_cpu_times", lambda: next(readings))
    monkeypatch.setattr(cpu_share.time, "sleep", lambda s: None)
    monkeypatch.setattr(cpu_share.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cpu_share.os, "cpu_count", lambda: 2)
    assert cpu_share.idle_cores() == expected


def test_a_users_choice_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_share.share_the_cpu() is None


def test_proc_stat_is_read_on_linux():
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat")
    busy, total = cpu_share._cpu_times()
    assert 0 <= busy <= total
