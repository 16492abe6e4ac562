"""Threads from the cores actually free (``models.cpu``), and runtimes that use them:
measured on real processes (a pinned busy loop, an affinity mask), not on mocks."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.cpu import default_threads, free_cores, usable_cores

ROOT = Path(__file__).resolve().parents[1]


def test_usable_cores_follow_the_affinity_mask():
    """A process pinned to one core (as ``taskset`` or a container's cpuset does) sizes its
    pools to that core, whatever the machine has."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from models.cpu import usable_cores, default_threads; print(usable_cores(), default_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
    assert out == ["1", "1"]


@pytest.mark.skipif(usable_cores() < 2, reason="needs 2 usable cores to see one of them busy")
def test_a_busy_process_takes_a_core_off_the_default():
    """A process spinning on one core: the free cores measured over the window drop by
    about one (machine-wide /proc/stat; anything else running only lowers them more)."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        free = free_cores(window=0.5)
    finally:
        busy.kill()
        busy.wait()
    assert 0.0 <= free <= usable_cores() - 0.6, free


def test_default_threads_are_within_the_usable_cores():
    n = default_threads()
    assert 1 <= n <= usable_cores()


def test_onnxruntime_sessions_get_the_free_cores_and_sleep_when_shared(tmp_path):
    """ONNX Runtime with no ``threads`` option: intra-op threads = the free cores, and
    spinning off when that is fewer than the usable cores (its workers would otherwise
    busy-wait against the other process)."""
    from device_tests.runners.onnxruntime import OnnxRuntimeRunner
    import models.cpu as cpu
    runner = OnnxRuntimeRunner()
    so = runner._session_options()
    assert so.intra_op_num_threads == runner._threads_used == default_threads()
    try:
        spinning = so.get_session_config_entry("session.intra_op.allow_spinning")
    except Exception:       # ORT raises when the entry was never set (spinning: its default, on)
        spinning = None
    assert (spinning == "0") == cpu.shared(runner._threads_used)
    assert f"threads={runner._threads_used} (free cores)" in runner.label
    named = OnnxRuntimeRunner(threads=1)
    assert named._session_options().intra_op_num_threads == 1 and "threads=1)" in named.label
