import json
import sys
import threading
import time

import pytest
import torch

from glmkit.bench import RESULTS_DIR
from glmkit.models import glm4_9b_chat_config
from glmkit.monitor import (
    explain_oom,
    gpu_memory,
    host_memory,
    snapshot,
    track_peak,
)
from glmkit.planning import plan_memory
from glmkit.widgets import LiveMonitor, MemoryPoller


def _monitor_threads():
    return [t for t in threading.enumerate() if t.name == "glmkit-monitor"]


def test_snapshot_without_nvidia_driver_falls_back_to_torch_then_host():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the fallback is exercised on CPU-only machines (CI)")
    snap = snapshot()
    assert [d.device for d in snap.devices] == ["cpu"]
    cpu = snap.device("cpu")
    assert cpu.source == "psutil" and 0 < cpu.used <= cpu.total and cpu.process > 0
    assert gpu_memory() == []
    assert "cpu" in repr(snap) and "<table>" in snap._repr_html_()


def test_snapshot_when_nvidia_ml_py_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    snap = snapshot()
    assert snap.devices[-1].device == "cpu"
    assert all(d.source in ("torch.cuda", "psutil") for d in snap.devices)


def test_host_memory_agrees_with_psutil():
    import psutil

    host = host_memory()
    assert host.total == psutil.virtual_memory().total
    assert abs(host.process - psutil.Process().memory_info().rss) < 64 * 2**20


def test_track_peak_catches_a_short_allocation_on_cpu():
    with track_peak() as peak:
        x = torch.ones(96, 2**20, dtype=torch.uint8)  # 96 MiB, freed at once
        del x
    cpu = peak.report.device("cpu")
    assert cpu.added >= 90 * 2**20
    assert cpu.end < cpu.peak
    assert "peak" in peak.report._repr_html_()


def test_track_peak_as_a_decorator():
    tracker = track_peak()

    @tracker
    def work():
        y = torch.zeros(48, 2**20, dtype=torch.uint8)
        return int(y.sum())

    assert work() == 0
    assert tracker.report.device("cpu").added >= 40 * 2**20


def test_explain_oom_on_the_real_h100_message():
    record = json.loads((RESULTS_DIR / "oom_12gib.json").read_text())
    exc = torch.OutOfMemoryError(record["message"])
    raw = explain_oom(exc)
    assert raw.device == "cuda:0"
    assert raw.requested == int(17.51 * 2**30)
    assert raw.limit == 12 * 2**30  # the per-process cap, not the 80 GiB card
    assert "allocate" not in raw.summary() and "17.51 GiB" in raw.summary()
    planned = explain_oom(exc, plan_memory(glm4_9b_chat_config(), ["12GiB"], context_len=4096))
    assert planned.filled_by["weights"] > planned.limit
    assert any("quantize" in step for step in planned.next_steps)


def test_explain_oom_flags_fragmentation():
    msg = ("CUDA out of memory. Tried to allocate 1.00 GiB. GPU 1 has a total capacity of 23.68 GiB of which "
           "0.50 GiB is free. Including non-PyTorch memory, this process has 23.10 GiB memory in use. Of the "
           "allocated memory 18.00 GiB is allocated by PyTorch, and 4.50 GiB is reserved by PyTorch but unallocated.")
    out = explain_oom(msg)
    assert out.device == "cuda:1" and out.limit == int(23.68 * 2**30)
    assert out.filled_by["PyTorch cache (reserved, unused)"] == int(4.5 * 2**30)
    assert "expandable_segments" in out.next_steps[0]


def test_explain_oom_from_a_plan_that_does_not_fit():
    out = explain_oom(plan_memory(glm4_9b_chat_config(), ["8GiB"], quantization="nf4", context_len=65536))
    assert out.device == "cuda:0" and out.filled_by["KV cache"] == 40 * 1024 * 65536


def test_poller_runs_in_the_background_and_stops():
    seen = []
    poller = MemoryPoller(seen.append, interval=0.01).start()
    time.sleep(0.5)
    assert poller.running and len(seen) >= 3 and poller.busy_seconds > 0
    poller.stop()
    assert not poller.running and not _monitor_threads()
    with pytest.raises(ValueError, match="positive"):
        MemoryPoller(seen.append, interval=0)


def test_live_monitor_does_not_block_and_cleans_up_its_thread():
    start = time.perf_counter()
    mon = LiveMonitor(interval=0.02)
    assert time.perf_counter() - start < 2  # returns at once, polling continues in the background
    time.sleep(0.5)
    assert mon.running and mon.poller.polls >= 3
    assert mon.box.children and "cpu" in mon.box.children[-1].children[0].value
    assert 0 < mon.box.children[-1].children[1].value <= 1
    again = LiveMonitor(interval=0.02)  # re-running the cell replaces the old monitor
    assert not mon.running and again.running
    assert len(_monitor_threads()) == 1
    again.widget.close()  # closing the widget (notebook closed) stops the thread
    time.sleep(0.05)
    assert not again.running and not _monitor_threads()
    assert "stopped" in again.status.value


def test_live_monitor_warns_when_hot():
    mon = LiveMonitor(interval=10, temperature_limit=50)
    mon.stop()
    from glmkit.monitor import DeviceMemory, Snapshot

    hot = DeviceMemory("cuda:0", "test card", 12 * 2**30, 11 * 2**30, None, temperature=88.0, power=340.0,
                       power_limit=350.0, source="nvml")
    mon.update(Snapshot([hot]))
    assert len(mon.warnings) == 2 and "88 C" in mon.status.value and "340 W" in mon.status.value
