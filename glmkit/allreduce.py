"""The all-reduce of a tensor-parallel decoder's partial sums: NCCL's, torch's symmetric-memory one-shot kernel or
glmkit's push kernel, whichever a measurement finds fastest.

A TP=2 GLM-4-9B token sums one ``[batch, 4096]`` hidden state over the ranks 81 times (the embedding, then after
``o_proj`` and ``down_proj`` in each of 40 layers): 8 KiB at batch 1, so the latency of a call decides TP's gain,
not the link's bandwidth. NCCL took 14.7 µs a call inside a CUDA graph on 2×H200 (``allreduce_latency.json``).

Torch's symmetric memory (``torch.distributed._symmetric_memory``) maps each rank's buffer into its peers' address
space. Its one-shot all-reduce is one small kernel: it copies the local partial into this rank's buffer, raises a
flag in each peer's signal pad and waits for theirs, then reads every rank's buffer over NVLink and sums them in
rank order (the same bits on every rank). A CUDA graph captures it like any kernel. NVLink multicast is not used
(``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` stays set: on shared machines it can take the host's GPUs out of service).

glmkit's own ``"push"`` kernel (two ranks) saves the read over NVLink: each rank *writes* its partial into the
peer's symmetric buffer (a slot per rank, two sets used in turn so that a call never overwrites what the peer may
still be reading from the call before), raises a counter in the peer's flags (release, system scope), waits for the
peer's counter in its own flags (acquire), and sums the two partials from its own memory in rank order. Launched
with programmatic dependent launch inside ``glmkit.gemv.dependent_launches`` (``TPDecoder``'s batch-1 step). On
2×H200 it took 5.6 µs a call in a CUDA graph against the one-shot kernel's 7.0 and NCCL's 13.0
(``benchmarks/results/tp_fast.json``), and every call of 81-call chains replayed from CUDA graphs equalled NCCL's sums
(``benchmarks/push_variants.py``, ``push_variants.json``; an earlier check that let the graph's input tensor be freed
between capture and replay read reused memory and was wrong, not the kernel).

Modes:

- ``"nccl"``: the process group's own all-reduce (NCCL on GPUs, gloo on CPUs);
- ``"symm"``: the one-shot kernel for tensors up to ``max_bytes`` (the group's all-reduce for bigger ones, e.g. a
  long prompt's prefill). Where it cannot run (CPUs, gloo, GPUs without peer access, processes on several hosts,
  a torch without the kernel) every rank falls back to ``"nccl"`` and ``reason`` says why;
- ``"push"``: glmkit's push kernel (two ranks on one host's GPUs with Triton; ``"nccl"`` where it cannot run);
- ``"auto"``: NCCL's, the one-shot kernel and the push kernel, where each runs, are timed (in a CUDA graph when
  ``graph``, else eagerly) on a ``[1, hidden]`` tensor and the fastest is kept; ``timings_us`` holds what was
  measured.

Every rank must build its ``AllReduce`` at the same point (the setup runs collectives). Introduced in
``notebooks/08_tensor_parallel.ipynb``. Without a group (one process) it returns its input:

>>> ar = AllReduce(None, torch.device("cpu"), torch.float32, mode="symm")
>>> ar.mode, ar.reason
('nccl', 'one process: nothing to sum')
>>> t = torch.ones(2, 4)
>>> ar(t) is t
True
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from glmkit.gemv import INTERPRETER, launch_options, triton

if triton is not None:
    import triton.language as tl

    from glmkit.gemv import wait_for_previous_kernel

MODES = ("nccl", "symm", "push", "auto")
PUSH_BLOCK = 4096  # elements each program of the push kernel sums (one token's hidden state of GLM-4-9B)
PER_TOKEN = 81  # all-reduces in one TP GLM-4-9B token: the embedding, then 2 per layer for 40 layers


if triton is not None:

    @triton.jit
    def _push_allreduce_kernel(x_ptr, out_ptr, mine_ptr, peer_ptr, my_flags, peer_flags, calls, N, CAP,
                               RANK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr, ON_GPU: tl.constexpr):
        # two ranks: this program's BLOCK values of x go into the peer's buffer (slot RANK of the set the call's
        # parity picks), then the call's number into the peer's flag for this program (release: the values are
        # visible before it); once the peer's number is in this rank's flag (acquire), both partials are read from
        # this rank's own memory and summed in rank order (fp32, rounded once: the same bits on both ranks)
        pid = tl.program_id(0)
        wait_for_previous_kernel(PDL)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        x = tl.load(x_ptr + offs, mask=ok, other=0.0)
        call = tl.load(calls + pid) + 1  # this program's calls on this rank, this one included
        tl.debug_barrier()
        tl.store(calls + pid, call)
        base = (call % 2) * 2 * CAP
        tl.store(peer_ptr + base + RANK * CAP + offs, x, mask=ok)
        # every thread's stores reach the peer before the flag: a system-scope fence in each thread (the flag's
        # release is made by one thread)
        if ON_GPU:  # (Triton's CPU interpreter has no inline PTX, and one memory for all)
            tl.inline_asm_elementwise("fence.acq_rel.sys; mov.u32 $0, 0;", "=r,r", [pid], dtype=tl.int32,
                                      is_pure=False, pack=1)
        tl.debug_barrier()
        tl.atomic_xchg(peer_flags + pid, call, sem="release", scope="sys")
        if ON_GPU:
            seen = tl.atomic_add(my_flags + pid, 0, sem="acquire", scope="sys")  # compiled to a load-acquire
            while seen < call:
                seen = tl.atomic_add(my_flags + pid, 0, sem="acquire", scope="sys")
        else:  # the interpreter's atomics are not atomic between processes: a plain read never undoes the peer's write
            seen = tl.load(my_flags + pid, volatile=True)
            while seen < call:
                seen = tl.load(my_flags + pid, volatile=True)
        tl.debug_barrier()
        other = tl.load(mine_ptr + base + (1 - RANK) * CAP + offs, mask=ok, other=0.0, cache_modifier=".cg")  # L2
        if RANK == 0:
            total = x.to(tl.float32) + other.to(tl.float32)
        else:
            total = other.to(tl.float32) + x.to(tl.float32)
        tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)


def symm_problem(group: dist.ProcessGroup | None, device: torch.device) -> str | None:
    """Why this rank cannot run the symmetric-memory one-shot all-reduce (``None`` when it can).

    >>> symm_problem(None, torch.device("cpu"))
    'one process: nothing to sum'
    """
    if group is None or dist.get_world_size(group) < 2:
        return "one process: nothing to sum"
    if device.type != "cuda":
        return "the tensors live on the CPU: symmetric memory maps GPU buffers"
    if "nccl" not in str(dist.get_backend(group)).lower():
        return f"the process group runs {dist.get_backend(group)}, not NCCL"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401  (registers the Python side)
    except ImportError as exc:
        return f"this torch has no symmetric memory: {exc}"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce"):
        return f"torch {torch.__version__} has no symm_mem.one_shot_all_reduce"
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is not None and int(local) < dist.get_world_size(group):
        return "the processes span several hosts: symmetric memory maps buffers within one host"
    return None


def agree(ok: bool, group: dist.ProcessGroup, device: torch.device) -> bool:
    """True only if every rank says ``ok`` (so all ranks take the same path)."""
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _peers_reachable(group: dist.ProcessGroup, device: torch.device) -> str | None:
    """Why some rank's GPU cannot read this rank's memory directly (``None`` when all can)."""
    world = dist.get_world_size(group)
    mine = torch.tensor([device.index if device.index is not None else torch.cuda.current_device()],
                        dtype=torch.int64, device=device)
    every = torch.empty(world, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(every, mine, group=group)
    me = int(mine.item())
    for peer in every.tolist():
        if peer != me and not torch.cuda.can_device_access_peer(me, peer):
            return f"GPU {me} cannot access GPU {peer} directly: no peer-to-peer path (NVLink or PCIe P2P)"
    return None


class AllReduce:
    """Sums a tensor over ``group``'s processes: ``ar(t)`` returns the sum (a new tensor, or ``t`` summed in place).

    Args:
        group: the ranks' process group (``None``: one process, ``ar(t)`` returns ``t``).
        device, dtype: where and in what the summed tensors are (the symmetric buffer is allocated for them).
        mode: ``"nccl"``, ``"symm"``, ``"push"`` or ``"auto"`` (see the module's docstring).
        max_bytes: the symmetric buffer's size on each GPU; bigger tensors go through the group's all-reduce.
        hidden: the last dimension the ``"auto"`` measurement sums ``[1, hidden]`` of (GLM-4-9B: 4096).
        graph: ``"auto"`` compares them inside CUDA graphs (as a decoder replays them), else eagerly.
    """

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device | str, dtype: torch.dtype,
                 mode: str = "auto", max_bytes: int = 2**20, hidden: int = 4096, graph: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"allreduce mode {mode!r} is not one of {', '.join(MODES)}.")
        self.group, self.device, self.dtype, self.requested = group, torch.device(device), dtype, mode
        self.world = dist.get_world_size(group) if group is not None else 1
        self.buffer: torch.Tensor | None = None
        self.push: dict[str, Any] | None = None  # the push kernel's buffers, where it runs (``_push_setup``)
        self.push_problem: str | None = None  # why not, where it was tried and cannot
        self.timings_us: dict[str, dict[str, float]] = {}
        self.mode, self.reason = "nccl", None
        if mode == "nccl":
            return
        self.reason = symm_problem(group, self.device)
        if self.group is None or self.world < 2:
            return
        # every step is agreed on by all ranks before the next, so they take the same path (and meet in the same
        # collectives; a one-shot kernel waits for its peers)
        for step in (lambda: _peers_reachable(self.group, self.device), lambda: self._allocate(max_bytes),
                     self._exchange, self._probe):
            if not self._all_ok():
                return
            self.reason = step()
        if not self._all_ok():
            return
        self.mode = "symm"
        if mode in ("push", "auto"):
            problem = self._push_setup(max_bytes)  # (agreed: a problem on one rank is a problem on every rank)
            if problem is not None:
                self.push, self.push_problem = None, problem
                if mode == "push":
                    self.mode, self.reason = "nccl", problem
                    return
            elif mode == "push":
                self.mode = "push"
        if mode == "auto":
            self._choose(hidden, graph)

    def _all_ok(self) -> bool:
        """Whether every rank can go on with symmetric memory; if not, all drop it (and say why)."""
        if agree(self.reason is None, self.group, self.device):
            return True
        self.reason, self.buffer = self.reason or "another rank cannot run it", None
        return False

    def _allocate(self, max_bytes: int) -> str | None:
        """The symmetric buffer on this GPU; why not, if it fails."""
        import torch.distributed._symmetric_memory as symm_mem

        try:
            if hasattr(symm_mem, "enable_symm_mem_for_group"):  # older torch needs it; newer deprecates it
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    symm_mem.enable_symm_mem_for_group(self.group.group_name)
            elem = torch.empty((), dtype=self.dtype).element_size()
            self.buffer = symm_mem.empty(max_bytes // elem, dtype=self.dtype, device=self.device).zero_()
        except Exception as exc:  # noqa: BLE001 - an optional fast path: say why and use NCCL
            return f"symmetric memory failed here: {type(exc).__name__}: {str(exc)[:200]}"
        return None

    def _exchange(self) -> str | None:
        """Map the ranks' buffers into each other (a collective); why not, if it fails."""
        import torch.distributed._symmetric_memory as symm_mem

        try:
            symm_mem.rendezvous(self.buffer, self.group.group_name)
        except Exception as exc:  # noqa: BLE001 - an optional fast path: say why and use NCCL
            return f"symmetric memory failed here: {type(exc).__name__}: {str(exc)[:200]}"
        return None

    def _probe(self) -> str | None:
        """One sum by the one-shot kernel against NCCL's (every rank runs both: the kernel waits for its peers)."""
        try:
            if not self._matches_nccl(self._symm, 64):
                return "its test sum differed from NCCL's"
        except Exception as exc:  # noqa: BLE001 - an optional fast path: say why and use NCCL
            return f"symmetric memory failed here: {type(exc).__name__}: {str(exc)[:200]}"
        return None

    def _matches_nccl(self, fn: Callable[[torch.Tensor], torch.Tensor], n: int) -> bool:
        """Whether ``fn`` sums a test tensor of ``n`` values (each rank's differs) as NCCL does (every rank runs
        both: a one-shot or push kernel waits for its peers)."""
        probe = torch.arange(n, dtype=self.dtype, device=self.device) % 97 + dist.get_rank(self.group)
        want = probe.clone()
        dist.all_reduce(want, group=self.group)
        return torch.equal(fn(probe), want)

    def _symm(self, t: torch.Tensor) -> torch.Tensor:
        """One-shot all-reduce of ``t`` through the symmetric buffer (it must fit)."""
        if t.storage_offset() * t.element_size() % 16 or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)  # the kernel wants buffer and input equally aligned
        inp = self.buffer[:t.numel()].view(t.shape)
        ops = torch.ops.symm_mem
        if hasattr(ops, "one_shot_all_reduce_copy"):  # the kernel copies t into the buffer itself
            return ops.one_shot_all_reduce_copy(inp, t, "sum", self.group.group_name)
        inp.copy_(t)
        return ops.one_shot_all_reduce(inp, "sum", self.group.group_name)

    def _push_setup(self, max_bytes: int) -> str | None:
        """The push kernel's symmetric buffer (two sets of one slot per rank) and flags, mapped into the peer, and
        tests of it against NCCL; why not, if it cannot run here. Both ranks agree on each step
        before the next: a rank that stopped alone would leave the other waiting in a collective, or spinning in the
        kernel for a partial that never comes."""
        problem = None
        if self.world != 2:
            problem = f"the push kernel sums over two ranks, not {self.world}"
        elif triton is None or INTERPRETER:
            problem = "the push kernel needs Triton on a GPU"
        # the last step does nothing: the probes' answer is agreed like every other
        for step in (lambda: self._push_allocate(max_bytes), self._push_exchange, self._push_probe, lambda: None):
            if not agree(problem is None, self.group, self.device):
                self.push = None
                return problem or "the other rank cannot run the push kernel"
            problem = step()
        return None

    def _push_allocate(self, max_bytes: int) -> str | None:
        import torch.distributed._symmetric_memory as symm_mem

        try:
            elem = torch.empty((), dtype=self.dtype).element_size()
            cap = max_bytes // elem // 4 // PUSH_BLOCK * PUSH_BLOCK
            programs = cap // PUSH_BLOCK
            self.push = {"cap": cap, "rank": dist.get_rank(self.group),
                         "data": symm_mem.empty(4 * cap, dtype=self.dtype, device=self.device).zero_(),
                         "flags": symm_mem.empty(programs, dtype=torch.int32, device=self.device).zero_(),
                         "calls": torch.zeros(programs, dtype=torch.int32, device=self.device)}
            torch.cuda.synchronize(self.device)
        except Exception as exc:  # noqa: BLE001 - an optional fast path: say why and use another
            return f"the push kernel's buffers failed here: {type(exc).__name__}: {str(exc)[:200]}"
        return None

    def _push_exchange(self) -> str | None:
        import torch.distributed._symmetric_memory as symm_mem

        p, peer = self.push, 1 - dist.get_rank(self.group)
        try:  # (a collective: both ranks are here)
            for name in ("data", "flags"):
                b = p[name]
                p["peer_" + name] = symm_mem.rendezvous(b, self.group.group_name).get_buffer(peer, (b.numel(),), b.dtype)
        except Exception as exc:  # noqa: BLE001
            return f"mapping the push kernel's buffers failed: {type(exc).__name__}: {str(exc)[:200]}"
        return None

    def _push_probe(self) -> str | None:
        """Sums of both sets of slots, several programs and a partial block against NCCL's (every probe runs on
        both ranks whatever the one before gave)."""
        same = True
        dist.barrier(group=self.group, device_ids=[self.device.index] if self.device.index is not None else None)
        try:
            for n in (64, 2 * PUSH_BLOCK + 5, 64):
                same &= self._matches_nccl(self._push, n)
        except Exception as exc:  # noqa: BLE001 - an optional fast path: say why and use another
            return f"the push kernel failed here: {type(exc).__name__}: {str(exc)[:200]}"
        return None if same else "the push kernel's test sum differed from NCCL's"

    def _push(self, t: torch.Tensor) -> torch.Tensor:
        """glmkit's push all-reduce of ``t`` (two ranks; it must fit the buffer)."""
        x = t.contiguous()
        out = torch.empty_like(x)
        n, p = x.numel(), self.push
        _push_allreduce_kernel[(triton.cdiv(n, PUSH_BLOCK),)](
            x, out, p["data"], p["peer_data"], p["flags"], p["peer_flags"], p["calls"], n, p["cap"],
            RANK=p["rank"], BLOCK=PUSH_BLOCK, ON_GPU=not INTERPRETER, num_warps=4, **launch_options())
        return out.view(t.shape)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.group is None or self.world < 2:
            return t
        if self.mode == "push" and t.dtype == self.dtype and t.numel() <= self.push["cap"]:
            return self._push(t)
        if self.mode in ("symm", "push") and t.dtype == self.dtype and t.numel() <= self.buffer.numel():
            return self._symm(t)
        dist.all_reduce(t, group=self.group)
        return t

    def _choose(self, hidden: int, graph: bool) -> None:
        """Time NCCL, the one-shot kernel and the push kernel (where set up) on ``[1, hidden]`` and keep the fastest
        (rank 0's timings decide)."""
        t = torch.zeros(1, hidden, dtype=self.dtype, device=self.device)
        use_graph = graph and self.device.type == "cuda"
        modes = ("nccl", "symm") + (("push",) if self.push is not None else ())
        for mode in modes:
            self.mode = mode
            self.timings_us[mode] = all_reduce_latency_us(self, t, self.group, graph=use_graph)
        key = "in_cuda_graph_us" if use_graph else "eager_us"
        times = torch.tensor([self.timings_us[m][key] for m in modes], device=self.device)
        dist.broadcast(times, src=dist.get_global_rank(self.group, 0), group=self.group)
        self.mode = modes[int(times.argmin())]
        self.reason = f"measured, {key}: " + ", ".join(f"{m} {v:.1f} µs" for m, v in zip(modes, times.tolist()))
        if self.push_problem:
            self.reason += f"; push not timed: {self.push_problem}"

    def describe(self) -> str:
        """One line: what sums (the one-shot kernel, or the group's backend) and why (for logs and benchmark JSON)."""
        if self.group is None or self.world < 2:
            return "nothing to sum (one process)"
        what = {"symm": "symmetric-memory one-shot", "push": "glmkit push kernel"}.get(
            self.mode, f"{dist.get_backend(self.group)} all-reduce")
        return what + (f" ({self.reason})" if self.reason else "")

    def __repr__(self) -> str:
        return f"AllReduce(mode={self.mode!r}, requested={self.requested!r}, world={self.world}, reason={self.reason!r})"


def all_reduce_latency_us(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor,
                          group: dist.ProcessGroup | None = None, graph: bool = False, calls: int = PER_TOKEN,
                          repeats: int = 50) -> dict[str, float]:
    """Median µs of one ``fn(t)`` (an all-reduce) eagerly, and with ``graph`` per call in a CUDA graph of ``calls``
    of them (one token's worth, as a decoder replays them). Every rank must call it alike."""
    cuda = t.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(t.device)

    def barrier() -> None:
        if group is not None:
            dist.barrier(group=group, device_ids=[t.device.index] if cuda and t.device.index is not None else None)
        sync()

    for _ in range(10):  # warm-up: connections, buffers
        fn(t)
    eager = []
    for _ in range(repeats):
        barrier()
        t0 = time.perf_counter()
        fn(t)
        sync()
        eager.append((time.perf_counter() - t0) * 1e6)
    out = {"eager_us": statistics.median(eager)}
    if not (graph and cuda):
        return out
    stream = torch.cuda.Stream(t.device)
    stream.wait_stream(torch.cuda.current_stream(t.device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(t)
    torch.cuda.current_stream(t.device).wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        x = t
        for _ in range(calls):
            x = fn(x)
    g.replay()
    sync()
    replays = []
    for _ in range(max(repeats // 5, 5)):
        barrier()
        t0 = time.perf_counter()
        g.replay()
        sync()
        replays.append((time.perf_counter() - t0) * 1e6 / calls)
    out["in_cuda_graph_us"] = statistics.median(replays)
    del g
    return out


def latency_rows(group: dist.ProcessGroup, device: torch.device, modes: list[str], batches: list[int],
                 hidden: int = 4096, repeats: int = 200) -> list[dict[str, Any]]:
    """One row per (mode, batch) of ``[batch, hidden]`` bf16 all-reduces: the mode asked for, what ran (``symm``
    falls back where it cannot run) and ``all_reduce_latency_us``'s figures (in a CUDA graph on GPUs). Every rank
    calls it alike; rows are for ``benchmarks/allreduce_latency.py`` and ``benchmarks/tp_fast.py``."""
    rows = []
    for mode in modes:
        ar = AllReduce(group, device, torch.bfloat16, mode=mode, hidden=hidden)
        for batch in batches:
            t = torch.zeros(batch, hidden, dtype=torch.bfloat16, device=device)
            row: dict[str, Any] = {"allreduce": mode, "ran": ar.describe(), "batch_size": batch,
                                   "bytes": t.numel() * t.element_size(), "backend": str(dist.get_backend(group)),
                                   **all_reduce_latency_us(ar, t, group, graph=device.type == "cuda", repeats=repeats)}
            if ar.timings_us:
                row["auto_timings_us"] = ar.timings_us
            rows.append(row)
    return rows
