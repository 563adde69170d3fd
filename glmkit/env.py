"""What this machine can run: library versions, GPUs and their free memory, and the notebooks' setup.

``environment_report()`` backs ``glmkit env``; ``notebook_setup()`` is the first cell of every
notebook (``notebooks/00_setup.ipynb`` introduces it). GPUs are read through NVML (the
``pynvml`` module of the ``nvidia-ml-py`` package), then ``torch.cuda``; no NVIDIA driver is a
normal case, reported in words, not as an error.

>>> report = environment_report()
>>> "torch" in report.versions
True
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from glmkit.models import default_model_path, model_label
from glmkit.monitor import gpu_memory
from glmkit.tables import gib, html_table, text_table
from glmkit.vocabulary import ALLOC_CONF_ENV, EXPANDABLE_SEGMENTS, SET_BY_GLMKIT_ENV

PACKAGES = ("torch", "triton", "transformers", "accelerate", "bitsandbytes", "nvidia-ml-py", "ipywidgets")


@dataclass
class GpuInfo:
    """One GPU as the driver reports it (bytes)."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int


# NVML's topology levels: the closest point two GPUs' PCIe paths share
PCIE_PATHS = {0: "same board", 10: "PCIe, one switch", 20: "PCIe, several switches", 30: "PCIe, one host bridge",
              40: "PCIe, host bridges of one NUMA node", 50: "PCIe, across CPU sockets"}


@dataclass
class GpuLink:
    """How two GPUs reach each other: NVLink, or the PCIe path between them (NVML)."""

    first: int
    second: int
    nvlink: bool
    pcie_path: str

    def describe(self) -> str:
        return "NVLink" if self.nvlink else self.pcie_path


@dataclass(repr=False)
class EnvReport:
    """Versions, GPUs, the links between them and a sentence about the GPU situation; renders as a table."""

    python: str
    versions: dict[str, str]
    gpus: list[GpuInfo] = field(default_factory=list)
    gpu_note: str = ""
    links: list[GpuLink] = field(default_factory=list)

    def rows(self) -> list[list[str]]:
        rows = [["python", self.python]] + [[k, v] for k, v in self.versions.items()]
        rows += [
            [f"GPU {g.index}", f"{g.name}: {gib(g.free_bytes)} free of {gib(g.total_bytes)}"]
            for g in self.gpus
        ]
        rows += [[f"GPU {link.first} - GPU {link.second}", link.describe()] for link in self.links]
        if self.gpu_note:
            rows.append(["GPUs", self.gpu_note])
        return rows

    def __repr__(self) -> str:
        return text_table(["what", "value"], self.rows())

    def _repr_html_(self) -> str:
        return html_table(["what", "value"], self.rows(), caption="glmkit environment")


def package_version(name: str) -> str:
    """Installed version of a distribution, or ``'not installed'``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def gpu_driver_note() -> str:
    """One sentence on how GPUs are seen: NVML with its driver version, or why not."""
    try:
        import pynvml  # optional: NVML exists only where an NVIDIA driver and nvidia-ml-py are

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        return f"{count} NVIDIA GPU(s), driver {driver} (NVML)"
    except ImportError:
        why = "nvidia-ml-py is not installed"
    except Exception as exc:  # pynvml.NVMLError and subclasses: no driver, no library
        why = f"no NVIDIA driver ({type(exc).__name__})"

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} GPU(s) via torch.cuda ({why})"
    return f"none: {why}; glmkit runs on the CPU (tiny model) and plans GPU layouts"


def list_gpus() -> tuple[list[GpuInfo], str]:
    """GPUs with total/free memory (NVML first, then ``torch.cuda``) and a sentence about them."""
    gpus = [GpuInfo(int(d.device.split(":")[1]), d.name, d.total, d.free) for d in gpu_memory()]
    return gpus, gpu_driver_note()


def gpu_links() -> list[GpuLink]:
    """Every pair of GPUs and how they are linked (NVML: NVLink peer status, else the PCIe topology level).

    Empty without NVML or with fewer than two GPUs. A device-map split sends each token's hidden state over this
    link once per boundary; ``glmkit.bench.peer_copy_seconds`` measures what that costs.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError, or pynvml.NVMLError: no driver
        return []
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        links = []
        for i, a in enumerate(handles):
            for j in range(i + 1, len(handles)):
                b = handles[j]
                try:
                    status = pynvml.nvmlDeviceGetP2PStatus(a, b, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
                except pynvml.NVMLError:
                    status = None
                try:  # some boards and VMs answer "Not Supported"
                    level = pynvml.nvmlDeviceGetTopologyCommonAncestor(a, b)
                    path = PCIE_PATHS.get(level, f"NVML topology level {level}")
                except pynvml.NVMLError as exc:
                    path = f"unknown (NVML: {exc})"
                links.append(GpuLink(i, j, status == pynvml.NVML_P2P_STATUS_OK, path))
        return links
    finally:
        pynvml.nvmlShutdown()


def environment_report() -> EnvReport:
    """Versions of the libraries glmkit uses, the GPUs present and their links (``glmkit env``)."""
    gpus, note = list_gpus()
    versions = {p: package_version(p) for p in PACKAGES}
    return EnvReport(platform.python_version(), versions, gpus, note, gpu_links() if len(gpus) > 1 else [])


@dataclass(repr=False)
class NotebookSetup:
    """What a notebook runs on: environment kind, model checkpoint, and whether to keep it small."""

    kind: str  # "ci-cpu", "cpu", "1-gpu" or "multi-gpu"
    model_path: Path
    smoke_test: bool
    gpus: list[GpuInfo]
    allocator: str = "default"

    def rows(self) -> list[list[str]]:
        return [
            ["environment", self.kind],
            ["model", model_label(self.model_path)],
            ["SMOKE_TEST", str(self.smoke_test)],
            ["GPUs", ", ".join(f"{g.index}: {g.name}" for g in self.gpus) or "none"],
            ["PYTORCH_CUDA_ALLOC_CONF", self.allocator],
        ]

    def __repr__(self) -> str:
        return text_table(["setting", "value"], self.rows())

    def _repr_html_(self) -> str:
        return html_table(["setting", "value"], self.rows(), caption="notebook setup")


def notebook_setup() -> NotebookSetup:
    """The shared first cell of every notebook: pick environment, model and sizes.

    ``SMOKE_TEST`` is on when ``CI`` is set; the model is ``$GLMKIT_MODEL`` or the tiny checkpoint
    (built on first use); PyTorch's allocator gets ``expandable_segments`` (see ``use_expandable_segments``).
    """
    smoke = "CI" in os.environ
    allocator = use_expandable_segments()
    gpus, _ = list_gpus()
    kind = "multi-gpu" if len(gpus) > 1 else "1-gpu" if gpus else ("ci-cpu" if smoke else "cpu")
    return NotebookSetup(kind, default_model_path(), smoke, gpus, allocator)


def use_expandable_segments() -> str:
    """Turn on PyTorch's ``expandable_segments`` allocator unless the user chose a setting.

    Measured on an H100 with GLM-4-9B: it removes most of the memory the default allocator reserves
    but does not use during a long prefill (5.5 GiB at 4 x 32K tokens in bf16), and makes that slack
    predictable for the planner. It only takes effect before CUDA starts. Returns the setting in force.
    glmkit calls it in every process it starts (``notebook_setup``, ``glmkit serve``, ``load_model``), which is
    why the planner assumes it unless ``PYTORCH_CUDA_ALLOC_CONF`` says otherwise (``glmkit.costs.resolve_allocator``).
    """
    if ALLOC_CONF_ENV not in os.environ and not torch.cuda.is_initialized():
        os.environ[ALLOC_CONF_ENV] = EXPANDABLE_SEGMENTS
        os.environ[SET_BY_GLMKIT_ENV] = "1"  # so a plan can say whose setting it is
    return os.environ.get(ALLOC_CONF_ENV, "default")
