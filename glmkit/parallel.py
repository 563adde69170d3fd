"""Tensor parallelism: every layer split across processes (GPUs), launched with torchrun.

A device map (notebooks 02-03) puts whole layers on different cards: more memory, but one card works at a
time. Tensor parallelism splits every weight matrix so all cards work on every token: transformers does it
for GLM with ``tp_plan="auto"`` (q/k/v column-wise, o_proj row-wise). Because k/v are split by heads,
the degree must divide the number of KV heads: **GLM-4-9B-Chat has 2, so --tp 1 or 2**.

``glmkit generate --tp 2 ...`` relaunches itself under ``torch.distributed.run`` (NCCL on GPUs, gloo on CPUs);
only rank 0 prints. Several nodes (one GPU each, ``--tp 2``)::

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \\
        -m glmkit.cli generate --model /models/glm-4-9b-chat-hf --tp 2 --prompt "Hello"

Introduced in ``notebooks/08_tensor_parallel.ipynb``.

>>> from glmkit.models import glm4_9b_chat_config
>>> [tp_problem(glm4_9b_chat_config(), tp) is None for tp in (1, 2, 4, 8)]
[True, True, False, False]
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch, transformers, the loaders and the TP decoder are imported where they are used: `glmkit generate/serve --tp N`
# imports this module in its launcher, which only starts the N processes (they load the model) and waits; without
# torch it starts them about 1.5 s of CPU sooner.


def tp_problem(config: Any, tp: int) -> str | None:
    """Why ``tp`` processes cannot split this model (``None`` when they can)."""
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    heads = config.num_attention_heads
    if tp < 1:
        return f"the tensor-parallel degree must be at least 1, got {tp}"
    if kv % tp or heads % tp:
        replicas = (f" (Replicating KV heads, as vLLM does, would let {tp} ranks split the query heads, but every KV "
                    f"head and its cache would then live on {tp // kv} ranks: {tp // kv}x the KV-cache memory of the "
                    f"group, and each rank would still read as much cache per token as at --tp {kv}.)"
                    if tp > kv and tp % kv == 0 and heads % tp == 0 else "")
        return (f"{tp} processes cannot split {kv} KV heads ({heads} query heads): each would hold "
                f"{kv / tp:g} of a KV head. k_proj/v_proj are split by heads, so the degree must divide {kv}. "
                f"Use --tp {max(d for d in range(1, kv + 1) if kv % d == 0 and heads % d == 0)}, and for more GPUs "
                "add data-parallel replicas (one server per pair of GPUs) or a device map." + replicas)
    return None


def checkpoint_heads(folder: str | Path) -> SimpleNamespace:
    """The query and KV head counts from a checkpoint's ``config.json``, for ``tp_problem`` (read without
    transformers: the launcher checks ``--tp N`` before any process starts)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return SimpleNamespace(num_attention_heads=config["num_attention_heads"],
                           num_key_value_heads=config.get("num_key_value_heads"))


# NVLink multicast (NVLS) off in NCCL, torch's symmetric memory and NVSHMEM: on shared machines a program using it
# can take the host's GPUs out of service, and one 8 KiB all-reduce per layer gains nothing from it
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def in_torchrun() -> bool:
    """True inside a process started by torchrun / torch.distributed.run."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def leave_process_group(exit_code: int | None = None) -> None:
    """Leave the process group, if any, before the process exits.

    gloo: the group is destroyed (a torchrun child that exits with gloo's threads still running can abort,
    "terminate called without an active exception", SIGABRT, after its work). NCCL, with ``exit_code``: the process
    exits at once with that code, streams flushed, without destroying the group: once CUDA graphs have captured
    NCCL all-reduces, ``destroy_process_group`` can wait forever (pytorch/pytorch#115388; ``glmkit serve --tp 2``
    hung so on 2×H200 after answering every request). The driver frees the GPUs' memory either way.
    """
    torch = sys.modules.get("torch")  # not loaded (a launcher): no group to leave
    if torch is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if exit_code is not None and "nccl" in str(torch.distributed.get_backend()).lower():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    torch.distributed.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now on ``host`` (the OS picks it): the processes' rendezvous, a server.

    >>> 0 < free_port() < 65536
    True
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


PR_SET_PDEATHSIG = 1  # Linux prctl option: a signal for this process when its parent exits


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have Linux send this process ``sig`` when its parent exits, however it exits (a no-op off Linux), so a
    killed launcher leaves no orphan behind. Mind that "parent" is the thread that started this process."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent:  # the parent left before the request took effect
        os.kill(os.getpid(), sig)


def relaunch(nproc: int, argv: list[str], follow_parent: bool = False) -> int:
    """Run ``python -m glmkit.cli ARGV`` under ``torch.distributed.run`` with ``nproc`` processes; return its exit code
    (0 when SIGINT/SIGTERM stopped it).

    A SIGINT or SIGTERM sent to this process is passed on to the workers (a server's rank 0 then shuts down and
    releases the other ranks, and all exit 0); a second one to torchrun, which stops its workers (SIGTERM, then
    SIGKILL 30 s later). torchrun runs in its own session (a terminal's Ctrl-C reaches this process only) and dies
    with this process even if it is killed outright; with ``follow_parent`` (a server), this process goes (SIGTERM)
    when its own parent exits."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           os.environ.get("GLMKIT_TP_PORT", str(free_port())), "-m", "glmkit.cli", *argv]
    env = dict(NO_MULTICAST, **os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if follow_parent:
        die_with_parent()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
    stopped: list[int] = []

    def pass_on(signum: int, _frame: Any) -> None:
        import psutil

        stopped.append(signum)
        try:
            workers = psutil.Process(proc.pid).children() if len(stopped) == 1 else []
        except psutil.Error:
            workers = []
        for target in workers or [proc]:
            try:
                target.send_signal(signum)
            except (psutil.Error, ProcessLookupError):
                pass  # it has just exited

    main = threading.current_thread() is threading.main_thread()  # (signal handlers live on the main thread)
    previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if stopped else code


def load_tp_model(path: Any, dtype: torch.dtype | str = "auto") -> torch.nn.Module:
    """Load a checkpoint split across the torchrun processes with transformers' tensor-parallel plan."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from glmkit.loading import check_checkpoint, resolve_checkpoint

    folder = resolve_checkpoint(path)
    check_checkpoint(folder)
    problem = tp_problem(AutoConfig.from_pretrained(folder), world_size())
    if problem:
        raise ValueError(problem)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    try:  # transformers >= 5.18 takes the plan through a DistributedConfig
        from transformers import DistributedConfig

        kwargs: dict[str, Any] = {"distributed_config": DistributedConfig(tp_plan="auto")}
    except ImportError:
        kwargs = {"tp_plan": "auto"}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()


def run_generate(model: Any, tp: int = 1, max_new_tokens: int = 16, dtype: str = "float32",
                 prompt: str | None = None, extra: list[str] | None = None) -> dict[str, Any]:
    """Run ``glmkit generate --json`` in fresh process(es), ``tp`` of them, and return rank 0's result
    (``tokens``, ``text``, ``processes``, ``ranks_agree``); ``extra``: more flags, e.g. ``["--fast-decode"]``.
    Raises ``RuntimeError`` with the processes' error text on failure."""
    cmd = [sys.executable, "-m", "glmkit.cli", "generate", "--model", str(model), "--json",
           "--max-new-tokens", str(max_new_tokens), "--dtype", dtype, "--tp", str(tp), *(extra or [])]
    if prompt is not None:
        cmd += ["--prompt", prompt]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or len(lines) != 1:
        raise RuntimeError(f"glmkit generate --tp {tp} failed (exit {out.returncode}): {out.stderr.strip()[-1500:]}")
    return json.loads(lines[0])


def init_process_group() -> torch.distributed.ProcessGroup:
    """Join the torchrun processes (NCCL on this process's GPU, gloo on CPUs), once; returns the world group."""
    import torch

    dist = torch.distributed
    if not dist.is_initialized():
        for key, value in NO_MULTICAST.items():
            os.environ.setdefault(key, value)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.group.WORLD


def command_group() -> torch.distributed.ProcessGroup:
    """A gloo group of all the torchrun processes for small Python objects (a server's commands to its followers),
    even when the tensors go over NCCL; it never times out, since a follower waits for as long as the server idles
    (a crashed leader does not leave it waiting: torchrun stops every process when one fails)."""
    import torch

    return torch.distributed.new_group(backend="gloo", timeout=timedelta(days=365))


def tp_decoder(model: torch.nn.Module, max_len: int, batch_size: int = 1) -> Any:
    """This torchrun process's ``TPDecoder`` for ``model`` (loaded whole on the CPU by every process; each keeps
    its slices on its GPU, or on the CPU without one). ``GLMKIT_TP_GEMV=triton`` in the environment runs the ranks'
    batch-1 step on glmkit's Triton GEMVs where ``gemv="auto"`` would not: on CPUs, in Triton's interpreter
    (``TRITON_INTERPRET=1``), which is how the tests check the GPU's step."""
    import torch

    from glmkit.tp_decode import TPDecoder

    gemv = os.environ.get("GLMKIT_TP_GEMV", "auto")
    if gemv not in ("auto", "triton"):
        raise ValueError(f"GLMKIT_TP_GEMV={gemv!r}: set it to 'triton' (glmkit's GEMV kernels at batch 1) or unset it.")
    group = init_process_group()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return TPDecoder(model, max_len, batch_size, group=group, device=device, gemv=gemv)


def ranks_agree(tokens: list[int]) -> bool:
    """True when every process of the group produced ``tokens`` (always True in one process)."""
    import torch

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, tokens)
    return all(g == tokens for g in gathered)
