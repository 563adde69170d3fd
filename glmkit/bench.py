"""Measurements that end up in ``benchmarks/results/*.json``: environment, peaks, speed, OOM records.

The scripts in ``benchmarks/`` call these on a GPU with the full-size GLM-4-9B-Chat architecture
(random weights: same shapes, same memory and speed, meaningless words); the notebooks read the
JSON back through ``glmkit.results``, which renders them. Everything also runs on the CPU with the tiny model.

>>> env = environment_record()
>>> sorted(env)[:4]
['date', 'device', 'driver', 'gpus']
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from transformers import GlmForCausalLM

from glmkit import tables
from glmkit.env import environment_report, gpu_driver_note
from glmkit.fast_decode import FastDecoder
from glmkit.gemv import gemv, triton_available
from glmkit.generation import cache_argument, chunked_prefill
from glmkit.loading import load_model
from glmkit.models import ensure_random_checkpoint, glm4_9b_chat_config
from glmkit.monitor import explain_oom, nvml_memory, track_peak
from glmkit.parallel import free_port
from glmkit.planning import parse_size, plan_memory
from glmkit.results import RESULTS_DIR


def environment_record() -> dict[str, Any]:
    """Device name, driver, GPU list and library versions, stored with every result."""
    report = environment_report()
    gpus = [{"index": g.index, "name": g.name, "total_bytes": g.total_bytes} for g in report.gpus]
    return {
        "device": gpus[0]["name"] if gpus else platform.processor() or platform.machine(),
        "driver": gpu_driver_note(),
        "gpus": gpus,
        "python": report.python,
        "versions": report.versions,
        "torch_cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d"),
    }


def load_random_9b(checkpoint: str | Path = "/tmp/glm9b") -> torch.nn.Module:
    """GLM-4-9B-Chat with random weights, bf16, on ``cuda:0``: the model the one-GPU benchmarks measure. The
    checkpoint is built at ``checkpoint`` first when it is not there yet (about 30 s)."""
    ensure_random_checkpoint(checkpoint)
    return load_model(checkpoint, dtype=torch.bfloat16, device_map="cuda:0")


def save_result(name: str, payload: dict[str, Any], out_dirs: list[str | Path] | None = None) -> list[Path]:
    """Write ``payload`` (with the environment record) as ``NAME.json`` to each folder
    (default: ``benchmarks/results`` and ``$OUT`` when set)."""
    dirs = [Path(d) for d in (out_dirs or [RESULTS_DIR] + ([os.environ["OUT"]] if os.environ.get("OUT") else []))]
    payload = {"name": name, "environment": environment_record(), **payload}
    written = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{name}.json"
        path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        written.append(path)
    return written


def stage_runner(name: str, result: dict[str, Any],
                 out_dirs: list[str | Path] | None = None) -> Callable[..., Any]:
    """``stage(label, fn, *args, **kwargs)`` for a benchmark of several stages: runs ``fn``; if it raises, prints the
    traceback, records ``"label: error"`` in ``result["errors"]`` and returns None, so the other stages still run;
    either way saves ``result`` as ``name`` (``save_result``): a stage's results survive a later stage's crash.

    >>> import tempfile
    >>> result = {"errors": []}
    >>> stage = stage_runner("stages", result, out_dirs=[tempfile.mkdtemp()])
    >>> stage("ok", lambda: 3), stage("bad", lambda: 1 / 0), result["errors"]
    (3, None, ['bad: ZeroDivisionError: division by zero'])
    """
    import traceback

    def stage(label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # keep the other stages' results; say what failed
            traceback.print_exc()
            result["errors"].append(f"{label}: {type(exc).__name__}: {str(exc)[:300]}")
            return None
        finally:
            save_result(name, result, out_dirs)

    return stage


class NvmlBaseline:
    """This process's GPU memory as the driver sees it: used now minus used before CUDA started.

    Create it *before* the first CUDA call. Works where NVML's per-process list is empty (VMs).
    """

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self.before = self.used()

    def used(self) -> int:
        """Used bytes on the card as ``glmkit.monitor`` and nvidia-smi read them (NVML v2)."""
        import pynvml  # optional: only machines with an NVIDIA driver and nvidia-ml-py have it

        pynvml.nvmlInit()
        try:
            return nvml_memory(pynvml, pynvml.nvmlDeviceGetHandleByIndex(self.index))[1]
        finally:
            pynvml.nvmlShutdown()

    def process_bytes(self) -> int:
        return self.used() - self.before


def measure_generate_peak(model: torch.nn.Module, batch_size: int, prompt_len: int, new_tokens: int,
                          nvml: NvmlBaseline | None = None) -> dict[str, Any]:
    """Peak memory of one plain ``generate()`` call: PyTorch allocated/reserved peaks, non-PyTorch memory,
    and the measured peak a card must hold (reserved peak + non-PyTorch). Also prefill time."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size - 1000, (batch_size, prompt_len), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    mask = torch.ones_like(ids)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start_alloc = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak_alloc, peak_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    reserved_now = torch.cuda.memory_reserved()
    non_torch = nvml.process_bytes() - reserved_now if nvml else None
    del out, ids, mask
    return {
        "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "context_len": prompt_len + new_tokens, "seconds": seconds,
        "start_allocated": start_alloc, "peak_allocated": peak_alloc, "peak_reserved": peak_reserved,
        "non_torch": non_torch, "measured_peak": peak_reserved + (non_torch or 0),
    }


def try_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, chunk: int | None = None,
                 cache: Any = None) -> dict[str, Any]:
    """Greedy ``generate()`` of ``new_tokens`` after ``ids`` (after ``chunked_prefill`` in ``chunk``-token pieces if
    given, into ``cache`` if given), reporting an out-of-memory error instead of raising it. The KV cache is freed
    on return, so the next attempt starts from the same memory.

    >>> from glmkit.loading import load_model
    >>> try_generate(load_model(device_map="cpu"), torch.arange(1, 30)[None], 2, chunk=8)["ok"]
    True
    """
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            kwargs = {cache_argument(model): chunked_prefill(model, ids, chunk, new_tokens, cache=cache)} if chunk else {}
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, **kwargs)
        return {"ok": True, "seconds": time.perf_counter() - t0}
    except torch.OutOfMemoryError as exc:
        return {"ok": False, "oom": str(exc)[:420]}


def decode_tokens_per_second(model: torch.nn.Module, new_tokens: int = 128, prompt_len: int = 32,
                             batch_size: int = 1, **generate_kwargs: Any) -> float:
    """Plain ``generate()`` decode speed: new tokens per second over the whole call (prefill included;
    negligible at a 32-token prompt)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, 1000, (batch_size, prompt_len), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, **generate_kwargs)
    sync()
    return batch_size * new_tokens / (time.perf_counter() - t0)


def median_of(fn: Callable[[], float], repeats: int = 3) -> float:
    return statistics.median(fn() for _ in range(repeats))


def nvidia_smi_used_bytes(index: int = 0) -> int | None:
    """``memory.used`` of GPU ``index`` as nvidia-smi prints it (MiB -> bytes); None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return int(float(out.strip().splitlines()[0]) * 2**20)


def emulated_card_oom(budget: str | int = "12GiB", config: Any = None, device: int = 0) -> Any:
    """On a GPU: emulate a smaller card (``set_per_process_memory_fraction``), build GLM-4-9B-Chat in bf16
    on it, catch the real ``torch.OutOfMemoryError`` and return glmkit's explanation of it.

    The cap is lifted and the memory freed afterwards. Needs a GPU larger than ``budget``.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("emulated_card_oom needs a GPU; the recorded H100 run is in benchmarks/results/oom_12gib.json")
    config = config or glm4_9b_chat_config()
    cap = parse_size(budget)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(cap / total, 1.0), device)
    old = torch.get_default_dtype()
    model = None
    try:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(f"cuda:{device}"):
            model = GlmForCausalLM(config)
        return None  # it fitted: nothing to explain
    except torch.OutOfMemoryError as exc:
        return explain_oom(exc, plan_memory(config, {device: cap}, context_len=4096))
    finally:
        torch.set_default_dtype(old)
        del model
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


PATHS = ("generate", "static", "fast")


def measure_decode(model: torch.nn.Module, path: str = "generate", batch_size: int = 1, prompt_len: int = 32,
                   new_tokens: int = 64, attn_implementation: str | None = None,
                   fast_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One decode measurement: time to first token, decode tok/s (summed over the batch) and peak memory.

    Paths: ``generate`` (plain, dynamic cache), ``static`` (``generate(cache_implementation="static")``,
    which transformers compiles on a GPU), ``fast`` (``glmkit.fast_decode.FastDecoder``).
    ``attn_implementation`` (``sdpa``, ``eager``, ``flash_attention_2``) applies to the generate paths.
    """
    if path not in PATHS:
        raise ValueError(f"Unknown path '{path}': use one of {', '.join(PATHS)}.")
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if attn_implementation and path != "fast":
        model.set_attn_implementation(attn_implementation)
    ids = torch.randint(0, 1000, (batch_size, prompt_len), device=device, generator=torch.Generator(device).manual_seed(0))
    with track_peak() as peak:
        if path == "fast":
            decoder = FastDecoder(model, max_len=prompt_len + new_tokens, batch_size=batch_size, **(fast_options or {}))
            result = {**decoder.tokens_per_second(prompt_len, new_tokens), "gemv": decoder.gemv,
                      "attention": decoder.attention}
        else:
            kw: dict[str, Any] = {"do_sample": False, "attention_mask": torch.ones_like(ids)}
            if path == "static":
                kw["cache_implementation"] = "static"
            with torch.inference_mode():
                sync()
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
                sync()
                ttft = time.perf_counter() - t0
                t1 = time.perf_counter()
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
                sync()
                total = time.perf_counter() - t1
            result = {"ttft_s": ttft, "decode_tok_s": batch_size * (new_tokens - 1) / max(total - ttft, 1e-9)}
    dev = "cuda:0" if cuda else "cpu"
    return {"path": path, "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "attn_implementation": f"{result['attention']} (glmkit)" if path == "fast" else (
                attn_implementation or getattr(model.config, "_attn_implementation", None)),
            **({"fast_options": fast_options} if fast_options and path == "fast" else {}),
            **result, "peak_bytes": peak.report.device(dev).peak}


def decode_grid(model: torch.nn.Module, paths: tuple[str, ...] = PATHS, batch_sizes: tuple[int, ...] = (1,),
                prompt_lens: tuple[int, ...] = (32,), new_tokens: int = 64,
                attn_implementations: tuple[str | None, ...] = (None,)) -> list[dict[str, Any]]:
    """``measure_decode`` over a grid; returns rows (write them with ``save_result``, show with ``decode_table``)."""
    rows = []
    for path in paths:
        for attn in (attn_implementations if path != "fast" else (None,)):
            for b in batch_sizes:
                for n in prompt_lens:
                    rows.append(measure_decode(model, path, b, n, new_tokens, attn))
    return rows


def decode_table(rows: list[dict[str, Any]], caption: str = "") -> Any:
    """Rows of ``decode_grid`` as an HTML table."""
    from IPython.display import HTML  # optional: only a notebook shows it

    body = [[r["path"], str(r.get("attn_implementation") or "-"), str(r["batch_size"]), str(r["prompt_len"]),
             f"{1000 * r['ttft_s']:.1f}", f"{r['decode_tok_s']:.1f}", f"{r['peak_bytes'] / 2**30:.2f}"] for r in rows]
    return HTML(tables.html_table(["path", "attention", "batch", "prompt", "TTFT ms", "decode tok/s", "peak GiB"],
                                  body, caption=caption))


def copy_bandwidth(n_bytes: int = 2**31, repeats: int = 10, device: str | torch.device = "cuda") -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), the memory roofline's denominator; on a
    CPU, the host memory's.

    >>> copy_bandwidth(2**20, 2, device="cpu") > 0
    True
    """
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n_bytes * repeats / _seconds(lambda: dst.copy_(src), repeats, src.device)


def read_bandwidth(device: str | torch.device = "cuda", rows: int = 151552, columns: int = 4096,
                   rounds: int = 5) -> float:
    """Bytes/s at which one token's matrix-vector product reads a ``[rows, columns]`` weight (default: GLM-4-9B's
    lm_head, 1.24 GB in bf16): what a decode step does, which only reads, where ``copy_bandwidth`` reads and writes.
    On a GPU, glmkit's GEMV (``glmkit.gemv``, cuBLAS where it does not run) on a bf16 weight, a CUDA graph of 10
    launches; on a CPU, ``F.linear`` on a float32 one, 10 calls; the best of ``rounds``. H200s differ in how their
    copy and read compare (``benchmarks/card_bandwidth.py``); taught in ``notebooks/05_tuning.ipynb``.

    >>> read_bandwidth("cpu", rows=256, columns=1024, rounds=2) > 0
    True
    """
    device = torch.device(device)
    with _on(device):  # (a CUDA graph captures on the current device)
        return _read_bandwidth(device, rows, columns, rounds)


def _read_bandwidth(device: torch.device, rows: int, columns: int, rounds: int) -> float:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    w = torch.randn(rows, columns, device=device, dtype=dtype)
    x = torch.randn(1, 1, columns, device=device, dtype=dtype)
    out = torch.empty(rows, device=device, dtype=torch.float32)
    if cuda and triton_available():
        def product() -> Any:
            return gemv(x, w, out=out)
    else:
        def product() -> Any:
            return out.copy_(F.linear(x, w).view(-1))
    if cuda:  # ten launches in one CUDA graph: the launches' own cost out of the way
        product()
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                product()
        step = graph.replay
    else:
        def step() -> None:
            for _ in range(10):
                product()
    best = min(_seconds(step, 1, device) for _ in range(rounds))
    return 10 * w.numel() * w.element_size() / best


def _on(device: torch.device) -> Any:
    """``device`` made the current GPU for the block (its stream, its events); nothing on a CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Seconds ``repeats`` calls of ``fn`` take on ``device``, after one call: CUDA events on a GPU, the clock on a
    CPU."""
    fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return time.perf_counter() - start
    with _on(device):
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1000


def peer_copy_seconds(n_bytes: int, src: int = 0, dst: int = 1, repeats: int = 20) -> float:
    """Seconds to copy ``n_bytes`` from GPU ``src`` to GPU ``dst`` and wait for it (median of ``repeats``).

    Large copies give the link's bandwidth; a small one (a token's hidden state: 8 KiB for GLM-4-9B in bf16) gives
    the latency a device-map split pays at each boundary for every decode step.
    """
    if torch.cuda.device_count() < 2:
        raise RuntimeError(f"peer_copy_seconds needs two CUDA devices; this machine has {torch.cuda.device_count()}.")
    source = torch.empty(n_bytes, dtype=torch.uint8, device=f"cuda:{src}")
    target = torch.empty(n_bytes, dtype=torch.uint8, device=f"cuda:{dst}")
    times = []
    for _ in range(repeats + 1):  # the first copy sets up peer access: not counted
        torch.cuda.synchronize(src)
        start = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize(dst)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def bytes_read_per_token(model: torch.nn.Module) -> int:
    """Weight bytes one decode step must read: every parameter except the embedding table (one row of it)."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


SERVER_PROMPTS = ["Tell me about GPUs.", "What is a device map?", "How do I split the model over two GPUs?",
                  "What limits decode speed?"]


class ServeProcess:
    """``glmkit serve`` as its own process on a free loopback port (the command a user types), for benchmarks and
    tests: ``with`` starts it and waits for ``/health``, and on leaving kills it and every process it started
    (torchrun and its ranks); ``stop`` shuts it down as a user does and records how that went. Its output goes to
    a log file (``log()``), which a failed start shows.

    Args:
        model: the checkpoint folder for ``--model``.
        flags: more ``glmkit serve`` options, e.g. ``"--tp", "2"``.
        env: variables set for the server on top of this process's environment.
        timeout_s: how long loading (and compiling) may take before ``/health`` answers.

    >>> from glmkit.models import TRAINED_TINY_DIR
    >>> with ServeProcess(TRAINED_TINY_DIR, "--tp", "4") as server:  # refused before it loads anything
    ...     pass
    Traceback (most recent call last):
    RuntimeError: glmkit serve exited with code 2: ... 2 KV heads ...
    """

    def __init__(self, model: str | Path, *flags: str, env: dict[str, str] | None = None,
                 timeout_s: float = 120) -> None:
        port = free_port()
        self.root, self.url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/v1"  # url: what openai is given
        self.command = [sys.executable, "-m", "glmkit.cli", "serve", "--model", str(model), "--port", str(port),
                        *flags]
        self.env, self.timeout_s = dict(os.environ, **(env or {})), timeout_s
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        fd, self.log_path = tempfile.mkstemp(prefix="glmkit-serve-", suffix=".log")
        os.close(fd)

    def launch(self) -> ServeProcess:
        """Start the process and return at once (launch several, then ``wait_ready`` each: they load side by side)."""
        with open(self.log_path, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self._t0 = time.perf_counter()
        return self

    def wait_ready(self) -> ServeProcess:
        """Return once ``/health`` answers 200 (``startup_s``: seconds since launch); else kill it all and raise
        ``RuntimeError`` with its exit code and the end of its log."""
        import httpx  # the server extra's HTTP client

        while time.perf_counter() - self._t0 < self.timeout_s and self.proc.poll() is None:
            try:
                if httpx.get(self.root + "/health", timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - self._t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        code = self.proc.poll()
        self.kill()
        why = (f"exited with code {code}" if code is not None else
               f"did not answer {self.root}/health within {self.timeout_s:.0f} s (raise timeout_s if loading is slow)")
        raise RuntimeError(f"glmkit serve {why}: {' '.join(self.command)}\n"
                           f"--- the end of its log, which says why ---\n{self.log()[-3000:].rstrip()}")

    def log(self) -> str:
        """Everything the server (and its ranks) printed so far."""
        return Path(self.log_path).read_text(errors="replace")

    def stop(self) -> dict[str, Any]:
        """SIGTERM to ``glmkit serve``, as a user stops it: its exit code (None: it hung 90 s and was killed) and
        the seconds until every process it started is gone (those left after 30 s are killed and counted)."""
        children = psutil.Process(self.proc.pid).children(recursive=True) if self.proc.poll() is None else []
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(90)
        except subprocess.TimeoutExpired:  # recorded as a hang, then everything it started is killed
            code = None
            self.proc.kill()
        _, alive = psutil.wait_procs(children, timeout=30)
        for p in alive:
            p.kill()
        return {"exit_code": code, "hung": code is None, "processes": 1 + len(children), "left_after_30s": len(alive),
                "seconds": time.perf_counter() - t0}

    def kill(self) -> None:
        """Kill the server and every process it started, by pid (nothing else); a no-op once it has exited."""
        if self.proc is not None and self.proc.poll() is None:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def close(self) -> None:
        """``kill``, and delete the log."""
        self.kill()
        Path(self.log_path).unlink(missing_ok=True)

    def __enter__(self) -> ServeProcess:
        return self.launch().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.close()


def chat_sender(url: str, model: str = "glm-4", timeout: float = 900, **options: Any) -> Callable[[int, int], int]:
    """``send(i, max_tokens)`` for ``client_load``: client ``i`` asks ``SERVER_PROMPTS[i % 4]`` (temperature 0.8,
    seed ``i``, plus ``options`` such as ``logit_bias``) through its own official openai client at ``url`` (the
    server's ``/v1``) and gets back the number of completion tokens."""
    import openai  # optional: the dev extra's client, the one users call the server with

    clients: dict[int, Any] = {}  # one per client thread: each index is used by one thread at a time

    def send(i: int, max_tokens: int) -> int:
        if i not in clients:
            clients[i] = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=timeout)
        r = clients[i].chat.completions.create(
            model=model, max_tokens=max_tokens, temperature=0.8, seed=i, **options,
            messages=[{"role": "user", "content": SERVER_PROMPTS[i % len(SERVER_PROMPTS)]}])
        return r.usage.completion_tokens

    return send


def _in_threads(target: Callable[[int], Any], n: int) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def client_load(send: Callable[[int, int], int], clients: int, seconds: float, max_tokens: int,
                steps: Callable[[], int] | None = None) -> dict[str, Any]:
    """``clients`` threads each calling ``send(i, max_tokens)`` back to back for ``seconds``, after a warm-up round
    of as many concurrent 8-token calls (a batch this size gets built): requests, completion tokens and tokens/s
    summed over the clients; with ``steps`` (the engine's step counter) also engine steps/s.

    >>> row = client_load(lambda i, tokens: tokens, clients=2, seconds=0.05, max_tokens=4)
    >>> row["clients"], row["tokens"] == 4 * row["requests"] > 0
    (2, True)
    """
    _in_threads(lambda i: send(i, 8), clients)
    counts, lock = {"requests": 0, "tokens": 0}, threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(i: int) -> None:
        while time.perf_counter() < stop_at:
            got = send(i, max_tokens)
            with lock:
                counts["requests"] += 1
                counts["tokens"] += got

    start, steps0 = time.perf_counter(), steps() if steps else 0
    _in_threads(client, clients)
    took = time.perf_counter() - start
    row = {"clients": clients, "seconds": took, **counts, "tokens_per_s": counts["tokens"] / took}
    if steps:  # if HTTP threads held the Python lock against the engine, its steps would slow down under HTTP
        row["engine_steps_per_s"] = (steps() - steps0) / took
    return row


def http_load(url: str, model: str, clients: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    """``client_load`` of ``chat_sender`` clients: what a load-generating process runs (``--client-process`` of
    ``benchmarks/server_load.py``), so that the clients' own Python work does not share the server's."""
    return client_load(chat_sender(url, model, timeout=600), clients, seconds, max_tokens)


def first_token_seconds(url: str, content: str, model: str = "glm-4", timeout: float = 900) -> float:
    """Seconds from sending a streamed 8-token chat request to ``url`` (a server's ``/v1``) to the first chunk that
    carries text or a finish reason: the time to first token a user sees."""
    import openai  # optional: the dev extra's client

    c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=timeout)
    t0 = time.perf_counter()
    for chunk in c.chat.completions.create(model=model, max_tokens=8, temperature=0, stream=True,
                                           messages=[{"role": "user", "content": content}]):
        if chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            break
    return time.perf_counter() - t0
