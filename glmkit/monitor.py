"""See memory on every device: snapshots, peak tracking, OOM explanations (the live dashboard: ``glmkit.widgets``).

Sources, in order: NVML through ``pynvml`` (package ``nvidia-ml-py``; the separate ``pynvml``
package is a deprecated shim), then ``torch.cuda``, then host memory through ``psutil``, so the same
calls work on a laptop, in CI and on a multi-GPU server. No NVIDIA driver is a normal case.
Introduced in ``notebooks/01_single_gpu_oom.ipynb``.

>>> snap = snapshot()
>>> snap.devices[-1].device, snap.devices[-1].total > 0
('cpu', True)
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from glmkit.tables import gib, html_table, text_table

GiB = 2**30


@dataclass
class DeviceMemory:
    """Memory of one device at one moment (bytes). ``None`` where the source cannot tell."""

    device: str  # "cuda:0", ..., "cpu"
    name: str
    total: int
    used: int  # by every process (GPU) / the whole host (CPU)
    process: int | None  # this process: NVML per-process memory (GPU), RSS (CPU)
    torch_allocated: int | None = None
    torch_reserved: int | None = None
    utilization: float | None = None  # percent
    temperature: float | None = None  # degrees C
    power: float | None = None  # watts
    power_limit: float | None = None  # watts
    source: str = "psutil"

    @property
    def free(self) -> int:
        return self.total - self.used


def _fmt(value: float | None, unit: str, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f} {unit}"


@dataclass(repr=False)
class Snapshot:
    """Memory of every device at one moment; renders as a table."""

    devices: list[DeviceMemory]
    time: float = field(default_factory=time.time)

    def device(self, name: str) -> DeviceMemory:
        return next(d for d in self.devices if d.device == name)

    HEADERS = ["device", "name", "used", "total", "this process", "PyTorch allocated", "PyTorch reserved",
               "util", "temp", "power", "source"]

    def rows(self) -> list[list[str]]:
        def g(v: int | None) -> str:
            return "-" if v is None else gib(v)

        return [[d.device, d.name, g(d.used), g(d.total), g(d.process), g(d.torch_allocated),
                 g(d.torch_reserved), _fmt(d.utilization, "%"), _fmt(d.temperature, "C"), _fmt(d.power, "W"),
                 d.source] for d in self.devices]

    def __repr__(self) -> str:
        return text_table(self.HEADERS, self.rows())

    def _repr_html_(self) -> str:
        return html_table(self.HEADERS, self.rows(), caption="memory snapshot")


def _torch_stats(index: int) -> tuple[int | None, int | None]:
    """PyTorch's allocated/reserved bytes on GPU ``index``, without creating a CUDA context."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None, None
    return torch.cuda.memory_allocated(index), torch.cuda.memory_reserved(index)


def nvml_memory(pynvml: Any, handle: Any) -> tuple[int, int]:
    """Total and used bytes as nvidia-smi shows them: NVML's v2 figures, where ``used`` leaves out the
    memory the driver reserves for itself (the v1 call counts it, about 0.5 GB more on an H100)."""
    try:
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
    except (pynvml.NVMLError, AttributeError, TypeError):  # old driver or old nvidia-ml-py
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return int(mem.total), int(mem.used)


def _nvml_devices() -> list[DeviceMemory]:
    """GPUs through NVML; raises ImportError or pynvml.NVMLError when there is no driver/library."""
    import pynvml  # optional: NVML exists only where an NVIDIA driver and nvidia-ml-py are

    pynvml.nvmlInit()
    try:
        pid = os.getpid()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            total, used = nvml_memory(pynvml, h)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name

            def read(fn: Callable[[], Any]) -> Any:
                try:
                    return fn()
                except pynvml.NVMLError:
                    return None

            procs = read(lambda h=h: pynvml.nvmlDeviceGetComputeRunningProcesses(h)) or []
            mine = [p.usedGpuMemory for p in procs if p.pid == pid and p.usedGpuMemory is not None]
            util = read(lambda h=h: pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            temp = read(lambda h=h: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
            power = read(lambda h=h: pynvml.nvmlDeviceGetPowerUsage(h) / 1000)
            limit = read(lambda h=h: pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000)
            allocated, reserved = _torch_stats(i)
            out.append(DeviceMemory(f"cuda:{i}", name, total, used, sum(mine) if mine else None,
                                    allocated, reserved, util, temp, power, limit, "nvml"))
        return out
    finally:
        pynvml.nvmlShutdown()


def _torch_devices() -> list[DeviceMemory]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        allocated, reserved = _torch_stats(i)
        out.append(DeviceMemory(f"cuda:{i}", torch.cuda.get_device_name(i), total, total - free, None,
                                allocated, reserved, source="torch.cuda"))
    return out


def host_memory() -> DeviceMemory:
    """The host: total and used RAM, this process's resident memory (RSS)."""
    vm = psutil.virtual_memory()
    return DeviceMemory("cpu", "host RAM", int(vm.total), int(vm.total - vm.available),
                        int(psutil.Process().memory_info().rss), source="psutil")


def gpu_memory() -> list[DeviceMemory]:
    """Every GPU: NVML if the driver answers, else ``torch.cuda``, else an empty list."""
    try:
        return _nvml_devices()
    except Exception:  # ImportError, pynvml.NVMLError (no driver / library): a normal case
        return _torch_devices()


def snapshot(include_host: bool = True) -> Snapshot:
    """Memory of every GPU (and the host) right now."""
    return Snapshot(gpu_memory() + ([host_memory()] if include_host else []))


# ---------------------------------------------------------------------------------------------- peaks


@dataclass
class DevicePeak:
    device: str
    start: int
    peak: int
    end: int
    what: str  # which figure: "PyTorch allocated" or "process RSS"

    @property
    def added(self) -> int:
        return self.peak - self.start


@dataclass(repr=False)
class PeakReport:
    """Peak memory per device during a block; renders as a table."""

    devices: list[DevicePeak] = field(default_factory=list)
    seconds: float = 0.0

    def device(self, name: str) -> DevicePeak:
        return next(d for d in self.devices if d.device == name)

    HEADERS = ["device", "measured", "before", "peak", "after", "peak - before"]

    def rows(self) -> list[list[str]]:
        return [[d.device, d.what, gib(d.start), gib(d.peak), gib(d.end), gib(d.added)] for d in self.devices]

    def __repr__(self) -> str:
        return text_table(self.HEADERS, self.rows())

    def _repr_html_(self) -> str:
        return html_table(self.HEADERS, self.rows(), caption=f"peak memory over {self.seconds:.2f} s")


def _peak_rss() -> int | None:
    """VmHWM, this process's peak resident memory, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (writing 5 to /proc/self/clear_refs, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _peak_rss() is not None
    except OSError:
        return False


class track_peak(contextlib.ContextDecorator):
    """Peak memory per device during a ``with`` block (or a decorated function).

    GPUs: PyTorch's peak allocated bytes (``torch.cuda.max_memory_allocated``, reset on entry).
    CPU: this process's peak RSS (Linux's exact high-water mark, reset on entry; elsewhere sampled every
    ``interval`` seconds by a background thread).

    >>> import torch
    >>> with track_peak() as peak:
    ...     x = torch.ones(256, 2**20, dtype=torch.uint8)  # 256 MiB, still alive when the block ends
    >>> peak.report.device("cpu").added >= 200 * 2**20
    True
    >>> del x
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.report = PeakReport()

    def __enter__(self) -> track_peak:
        self._gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        self._gpu_start = {}
        for i in self._gpus:
            torch.cuda.synchronize(i)
            torch.cuda.reset_peak_memory_stats(i)
            self._gpu_start[i] = torch.cuda.memory_allocated(i)
        self._process = psutil.Process()
        self._rss_start = self._rss_peak = self._process.memory_info().rss
        self._hwm = _reset_peak_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="glmkit-peak", daemon=True)
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._rss_peak = max(self._rss_peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        rss_end = self._process.memory_info().rss
        if self._hwm:  # Linux keeps the exact high-water mark since the reset; sampling can miss short peaks
            self._rss_peak = max(self._rss_peak, _peak_rss() or 0)
        devices = []
        for i in self._gpus:
            torch.cuda.synchronize(i)
            devices.append(DevicePeak(f"cuda:{i}", self._gpu_start[i], torch.cuda.max_memory_allocated(i),
                                      torch.cuda.memory_allocated(i), "PyTorch allocated"))
        devices.append(DevicePeak("cpu", self._rss_start, max(self._rss_peak, rss_end), rss_end, "process RSS"))
        self.report = PeakReport(devices, time.perf_counter() - self._t0)


# ------------------------------------------------------------------------------------------------ OOM

_SIZE = r"([0-9.]+ (?:bytes|KiB|MiB|GiB|TiB))"
_OOM_PATTERNS = {
    "requested": rf"Tried to allocate {_SIZE}",
    "device": r"GPU (\d+) has a total capacity",
    "capacity": rf"total capacity of {_SIZE}",
    "free": rf"of which {_SIZE} is free",
    "process": rf"(?:this process has|Process \d+ has) {_SIZE} memory in use",
    "allowed": rf"{_SIZE} allowed;",
    "allocated": rf"Of the allocated memory {_SIZE} is allocated by PyTorch",
    "unallocated": rf"and {_SIZE} is reserved by PyTorch but unallocated",
}
_UNIT = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _bytes(text: str) -> int:
    value, unit = text.split()
    return int(float(value) * _UNIT[unit])


@dataclass(repr=False)
class OomExplanation:
    """What an out-of-memory error means: where, how much was asked, what filled the card, what next."""

    device: str
    requested: int | None
    limit: int | None  # the smaller of capacity and the per-process cap
    in_use: int | None
    pytorch_allocated: int | None
    reserved_unallocated: int | None
    filled_by: dict[str, int]
    next_steps: list[str]

    def summary(self) -> str:
        parts = [f"Out of memory on {self.device}"]
        if self.requested is not None:
            parts.append(f"while asking for {gib(self.requested)}")
        if self.limit is not None and self.in_use is not None:
            parts.append(f"with {gib(self.in_use)} of {gib(self.limit)} in use")
        return " ".join(parts) + "."

    def __repr__(self) -> str:
        lines = [self.summary()]
        if self.filled_by:
            lines.append("What fills it: " + ", ".join(f"{k} {gib(v)}" for k, v in self.filled_by.items()) + ".")
        lines += ["Next steps:"] + [f"  - {s}" for s in self.next_steps]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = [[k, gib(v)] for k, v in self.filled_by.items()]
        steps = "".join(f"<li>{s}</li>" for s in self.next_steps)
        return (f"<p><b>{self.summary()}</b></p>" + html_table(["what fills it", "size"], rows)
                + f"<p>Next steps:</p><ul>{steps}</ul>")


def explain_oom(exc: BaseException | str | Any, plan: Any = None) -> OomExplanation:
    """Explain a ``torch.OutOfMemoryError`` (or its message, or a planner result that does not fit).

    With a ``MemoryPlan`` from ``glmkit.planning``, the breakdown (weights / KV cache / activations /
    CUDA context) comes from the plan for the device that ran out, and the next steps are the
    planner's checked fixes.

    >>> msg = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of "
    ...        "which 60.00 GiB is free. Including non-PyTorch memory, this process has 11.50 GiB memory in use. "
    ...        "12.00 GiB allowed; Of the allocated memory 10.90 GiB is allocated by PyTorch, and 100.00 MiB "
    ...        "is reserved by PyTorch but unallocated.")
    >>> explain_oom(msg).summary()
    'Out of memory on cuda:0 while asking for 2.00 GiB with 11.50 GiB of 12.00 GiB in use.'
    """
    if hasattr(exc, "devices") and hasattr(exc, "fits"):  # a MemoryPlan that does not fit
        plan, text = exc, ""
    else:
        text = str(exc)
    found = {k: re.search(p, text) for k, p in _OOM_PATTERNS.items()}
    size = {k: _bytes(m.group(1)) for k, m in found.items() if m and k != "device"}
    device = f"cuda:{found['device'].group(1)}" if found["device"] else "cuda:0"
    limit = min(v for v in (size.get("capacity"), size.get("allowed")) if v is not None) if (
        "capacity" in size or "allowed" in size) else None
    filled: dict[str, int] = {}
    steps: list[str] = []
    if plan is not None:
        worst = min(plan.devices, key=lambda d: d.headroom)
        target = next((d for d in plan.devices if d.name == device), worst) if text else worst
        device = target.name
        filled = {"weights": target.weights, "KV cache": target.kv_cache, "activations": target.activations,
                  "CUDA context": target.cuda_context}
        if limit is None:
            limit, size["process"] = target.budget, target.total
        steps = plan.fixes()
    else:
        if "allocated" in size:
            filled["PyTorch tensors"] = size["allocated"]
        if "unallocated" in size:
            filled["PyTorch cache (reserved, unused)"] = size["unallocated"]
        if "process" in size and "allocated" in size:
            filled["CUDA context and other non-PyTorch"] = max(
                size["process"] - size["allocated"] - size.get("unallocated", 0), 0)
        if size.get("unallocated", 0) > 0.1 * max(size.get("requested", 0), 1) and size.get("unallocated", 0) > GiB // 4:
            steps.append("much memory is reserved but unused (fragmentation): set "
                         "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before starting Python")
        steps += [
            "plan before loading: glmkit.planning.plan_memory(config, devices=[...], context_len=..., batch_size=...) "
            "shows what fills each card and which fix works",
            "quantize (quantization='nf4'), shorten the prompt or the batch, or prefill in chunks (prefill_chunk=2048)",
            "spread the model over more cards with glmkit.placement.kv_aware_device_map",
        ]
    return OomExplanation(device, size.get("requested"), limit, size.get("process"), size.get("allocated"),
                          size.get("unallocated"), filled, steps)
