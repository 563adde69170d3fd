"""Matrix-vector products for one decode token, as Triton kernels that read each weight once at full speed.

At batch 1 a decode step is ``weight @ vector`` for every projection: all time goes into reading the weights.
cuBLAS' kernels for these shapes read an H100's memory at 2.0-2.9 TB/s and, for ``o_proj`` and ``down_proj``, split
the sum into pieces that a second kernel adds up. These kernels give each program one to four whole rows and sum
them in fp32 in one pass: 2.6-3.2 TB/s on the same H100, and GLM-4-9B decodes at 150 instead of 134 tok/s
(``benchmarks/results/gemv_tune.json``, ``decode.json``). ``gemv_swiglu`` also applies GLM's MLP activation
(``up * silu(gate)``) before it writes, so the gate/up product never leaves the kernel. Both can also take the raw
residual stream and apply the RMSNorm before the product as they read it (``norm_weight``), and ``gemv`` can add the
residual stream to its result as it writes (``residual``): on ``FastDecoder``'s batch-1 step a decoder layer is then
four GEMV launches, the rotary/KV write and attention, with no norm or add kernel of its own (380 kernels a step
on GLM-4-9B before, measured on an H100 in ``benchmarks/results/profile_step.json``). ``FastDecoder`` uses them
at batch 1 on a GPU (``gemv="auto"``, the default). ``add_norm_gemv`` adds a second vector to x first and writes
the sum back out (a tensor-parallel rank's residual stream plus an all-reduced partial sum, ``glmkit.tp_decode``).

Launch shapes come from tables chosen by the GPU's name (``assets/gemv_tuned*.json``: H100 bf16; H200 once measured)
per kernel (bf16, fp16, nf4, fp4); ``glmkit tune`` measures the card in hand into the user's own table, which wins.
An untuned card uses rules of thumb and says so once. 4-bit weights have their own kernels: ``glmkit.gemv4bit``.

They need Triton (bundled with PyTorch's CUDA builds). On a CPU they run only in Triton's interpreter
(``TRITON_INTERPRET=1`` set before the first import of triton), which is how the tests check them.

>>> import torch
>>> if triton_available():  # a GPU, or TRITON_INTERPRET=1 on a CPU
...     device = "cuda" if torch.cuda.is_available() else "cpu"
...     w, x = torch.randn(256, 512, device=device), torch.randn(1, 1, 512, device=device)
...     assert torch.allclose(gemv(x, w), x @ w.T, rtol=1e-4, atol=1e-4)
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from glmkit.models import cache_dir

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels are then unavailable; triton_available() says so
    triton = None
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as Triton reads it when a kernel is defined
PDL = 0  # launches use programmatic dependent launch while this is 1 (``dependent_launches``)


def triton_available() -> bool:
    """True where these kernels can run: Triton with a GPU, or Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return triton is not None and (torch.cuda.is_available() or INTERPRETER)


@dataclass(frozen=True)
class GemvConfig:
    """Block shape of one kernel launch: ``block_n`` rows per program (per tile of rows, for glmkit's 4-bit kernels),
    ``block_k`` columns per loop step. ``tiles``: in a table of 4-bit shapes, the tiles of ``block_n`` rows a program
    read when the shape was timed (``None``: not recorded, shapes timed before the per-row kernel took two)."""

    block_n: int
    block_k: int
    num_warps: int
    tiles: int | None = field(default=None, repr=False, compare=False)


ASSETS = Path(__file__).parent / "assets"
TUNED_TABLE = ASSETS / "gemv_tuned.json"  # the H100 table (bf16); others: assets/gemv_tuned_*.json
USER_TABLE_NAME = "gemv_tuned.json"  # in glmkit's cache ($GLMKIT_CACHE or ~/.cache/glmkit), written by `glmkit tune`
# kernel names in the tables: the weight format each kernel reads ("bf16", "fp16", "fp32", "nf4", "fp4")
KERNELS = ("bf16", "fp16", "fp32", "nf4", "fp4")


def pdl_supported(device: torch.device | str) -> bool:
    """Whether glmkit's kernels can use Hopper's programmatic dependent launch on this device: a GPU of compute
    capability 9.0 or newer and a Triton that knows ``griddepcontrol`` (never in the CPU interpreter).

    >>> pdl_supported("cpu")
    False
    """
    device = torch.device(device)
    if device.type != "cuda" or INTERPRETER or triton is None or not torch.cuda.is_available():
        return False
    cuda = getattr(getattr(tl, "extra", None), "cuda", None)
    return torch.cuda.get_device_capability(device) >= (9, 0) and hasattr(cuda, "gdc_wait")


def choose_pdl(pdl: bool | None, devices: list[torch.device]) -> bool:
    """A decoder's ``pdl`` setting resolved: ``None`` is on where every device supports it (``pdl_supported``);
    ``True`` where one does not is an error that says so.

    >>> choose_pdl(None, [torch.device("cpu")])
    False
    """
    supported = all(pdl_supported(d) for d in devices)
    if pdl and not supported:
        raise ValueError("pdl=True needs programmatic dependent launch: GPUs of compute capability 9.0 or newer "
                         "(Hopper) and a Triton that has it; leave pdl unset to use it where it runs.")
    return supported if pdl is None else pdl


def launch_options(pdl: int | None = None) -> dict[str, int | bool]:
    """The keyword arguments that launch one of glmkit's kernels with programmatic dependent launch or without
    (``pdl``; default: ``dependent_launches``'s setting): the kernel's ``PDL`` flag, always passed (torch.compile's
    analysis of a kernel wants every argument), and Triton's ``launch_pdl`` where it is on.

    >>> launch_options(0), launch_options(1)
    ({'PDL': 0}, {'PDL': 1, 'launch_pdl': True})
    """
    pdl = PDL if pdl is None else pdl
    return {"PDL": pdl, "launch_pdl": True} if pdl else {"PDL": pdl}


@contextmanager
def dependent_launches(enabled: bool = True) -> Iterator[None]:
    """Within the block, glmkit's GEMV and decode-attention launches use programmatic dependent launch (PDL, Hopper
    and later): each kernel lets the next one be launched as soon as all its programs have started (the decode
    attention once its reads of q/k/v have arrived, ``glmkit.attention.LAUNCH_NEXT_LATE``), and the next waits
    (``griddepcontrol.wait``) before it reads or writes anything the step writes (the decode attention reads its
    first tile of the cache, which earlier steps wrote, before; the batch-1 4-bit CUDA kernel, ``glmkit.gemv4bit_one``,
    its first weights and its lookup table's 16 values, which nothing in a step writes), so the gap between two
    kernels of a decode step is hidden without a race. ``FastDecoder`` (a 4-bit model's one-row step only where the
    batch-1 CUDA kernel runs and reads its weights: through the Triton 4-bit kernels a step was slower with it,
    ``benchmarks/results/nf4_fused.json``) and ``TPDecoder`` capture their batch-1 step this way where
    ``pdl_supported``; on an H200 GLM-4-9B decoded 207.3 tok/s so against 205.1 without
    (``benchmarks/results/pdl_decode.json``), in nf4 through the CUDA kernel 438.4 against 370.6
    (``nf4_one_step.json``). Launches inside ``torch.compile`` must not use it (its analysis of
    the kernel fails). Taught in ``notebooks/05_tuning.ipynb``.

    >>> import glmkit.gemv
    >>> with dependent_launches():
    ...     glmkit.gemv.PDL
    1
    >>> glmkit.gemv.PDL
    0
    """
    global PDL
    before, PDL = PDL, int(enabled)
    try:
        yield
    finally:
        PDL = before


def kernel_name(weight_dtype: torch.dtype | str) -> str:
    """The table's name for the kernel that reads weights of this dtype (or 4-bit format).

    >>> kernel_name(torch.bfloat16), kernel_name("nf4")
    ('bf16', 'nf4')
    """
    if isinstance(weight_dtype, str):
        return weight_dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[weight_dtype]


def load_table(path: str | Path) -> tuple[str, dict[tuple[str, int, int], GemvConfig]]:
    """A table of launch shapes: the device it was tuned on, and (kernel, rows, columns) -> config; for gate_up
    the rows of one half (the kernel reads gate and up rows together). Entries without a kernel are bf16 (the
    first table's format).

    >>> device, table = load_table(TUNED_TABLE)
    >>> device, table[("bf16", 4096, 13696)]  # down_proj on an H100
    ('NVIDIA H100 80GB HBM3', GemvConfig(block_n=..., block_k=..., num_warps=...))
    """
    table = json.loads(Path(path).read_text())
    configs = {(c.get("kernel", "bf16"), c["rows"], c["columns"]):
               GemvConfig(c["block_n"], c["block_k"], c["num_warps"], c.get("tiles")) for c in table["configs"]
               if not _is_cuda_shape(c)}
    return table["tuned_on"], configs


# glmkit's CUDA kernels' launch shapes in a table, by kernel: the batch-1 4-bit kernel's (gemv4bit_one.OneShape), the
# 2-8-row 4-bit kernel's (gemv4bit_mma.MmaShape), the batch-1 16-bit kernel's (gemv16_one.Shape16) and the 16-bit MLP
# kernel's ring (mlp16_one.MlpShape.ring)
CUDA_SHAPE_KEYS = {"4bit-one": ("groups", "warps", "depth", "wide"), "4bit-mma": ("warps", "unroll", "min_blocks"),
                   "16bit-one": ("groups", "warps", "depth", "early"), "16bit-mlp": ("ring",)}


def _is_cuda_shape(entry: dict) -> bool:
    return entry.get("kernel") in CUDA_SHAPE_KEYS


def load_cuda_shapes(path: str | Path) -> tuple[str, dict[tuple[str, int, int], dict[str, int | bool]]]:
    """A table's launch shapes of glmkit's CUDA kernels (``CUDA_SHAPE_KEYS``: the 4-bit kernels', ``"4bit-one"`` and
    ``"4bit-mma"``, and the 16-bit ones', ``"16bit-one"`` and ``"16bit-mlp"``): the device it was tuned on, and
    (kernel, rows, columns) -> shape fields. Tables without any give an empty dict.

    >>> load_cuda_shapes(TUNED_TABLE)[1]  # the H100 table: bf16 Triton shapes only
    {}
    """
    table = json.loads(Path(path).read_text())
    shapes = {}
    for c in table["configs"]:
        if not _is_cuda_shape(c):
            continue
        keys = CUDA_SHAPE_KEYS[c["kernel"]]
        if not all(key in c for key in ("rows", "columns", *keys)):
            warnings.warn(f"{path}: a {c['kernel']} shape without rows, columns, {', '.join(keys)} is skipped ({c}); "
                          "run `glmkit tune` again to rewrite it.", UserWarning, stacklevel=2)
            continue
        shapes[(c["kernel"], c["rows"], c["columns"])] = {key: c[key] for key in keys}
    return table["tuned_on"], shapes


def load_tuned(path: str | Path = TUNED_TABLE) -> dict[tuple[int, int], GemvConfig]:
    """The bf16 launch shapes of one table file: (rows, columns) -> config.

    >>> load_tuned()[(4096, 13696)]  # down_proj, H100
    GemvConfig(block_n=..., block_k=..., num_warps=...)
    """
    return {(n, k): cfg for (kernel, n, k), cfg in load_table(path)[1].items() if kernel == "bf16"}


def user_table_path() -> Path:
    """Where ``glmkit tune`` writes the shapes it measured on the card in hand; they take precedence."""
    return cache_dir() / USER_TABLE_NAME


def device_name() -> str:
    """The name tables are chosen by: ``torch.cuda.get_device_name()`` on a GPU, else "cpu"."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def tables_for(name: str) -> dict[tuple[str, int, int], GemvConfig]:
    """Every tuned shape for the device called ``name``: the shipped tables (``assets/gemv_tuned*.json``) tuned on
    it, then the user's table (``glmkit tune``) if tuned on it, which wins where both have a shape.

    >>> ("bf16", 4096, 13696) in tables_for("NVIDIA H100 80GB HBM3"), tables_for("NVIDIA GeForce RTX 3060")
    (True, {})
    """
    return read_tables(name, load_table)


def cuda_shapes_for(name: str) -> dict[tuple[str, int, int], dict[str, int | bool]]:
    """``tables_for``'s CUDA kernel shapes (``load_cuda_shapes``): shipped, then the user's, which wins.

    >>> cuda_shapes_for("NVIDIA GeForce RTX 3060")
    {}
    """
    return read_tables(name, load_cuda_shapes)


def read_tables(name: str, load: Callable[[Path], tuple[str, dict[Any, Any]]]) -> dict[Any, Any]:
    """What ``load`` (path -> the device a table was tuned on, its entries) reads from every table tuned on ``name``:
    the shipped tables (``assets/gemv_tuned*.json``), then the user's, whose entries win."""
    found: dict[Any, Any] = {}
    for path in [*sorted(ASSETS.glob("gemv_tuned*.json")), user_table_path()]:
        if path.exists():
            tuned_on, entries = load(path)
            if tuned_on == name:
                found.update(entries)
    return found


_ACTIVE: dict[tuple[str, int, int], GemvConfig] | None = None
Shape = TypeVar("Shape")  # a CUDA kernel's launch shape (tuned_cuda_shape)
_ACTIVE_CUDA: dict[tuple[str, int, int], dict[str, int | bool]] | None = None


def active_table() -> dict[tuple[str, int, int], GemvConfig]:
    """The tuned shapes for this machine's GPU (read once; empty on a CPU or an untuned card, which then uses the
    rule of thumb and says so once). ``benchmarks/gemv_tune.py`` edits it in place while it tunes."""
    global _ACTIVE
    if _ACTIVE is None:
        name = device_name()
        _ACTIVE = tables_for(name)
        if not _ACTIVE and name != "cpu":
            warnings.warn(f"glmkit's GEMV kernels have no tuned launch shapes for {name}: they use defaults "
                          "(run `glmkit tune` once, a few minutes, to measure this card's).", UserWarning, stacklevel=3)
    return _ACTIVE


def active_cuda_shapes() -> dict[tuple[str, int, int], dict[str, int | bool]]:
    """The tuned CUDA kernel shapes for this machine's GPU (read once; ``active_table`` says when a card is untuned).
    ``glmkit tune`` adds what it measures while it runs."""
    global _ACTIVE_CUDA
    if _ACTIVE_CUDA is None:
        _ACTIVE_CUDA = cuda_shapes_for(device_name())
    return _ACTIVE_CUDA


def tuned_cuda_shape(kernel: str, rows: int, columns: int, build: Callable[..., Shape],
                     fits: Callable[[Shape], bool]) -> Shape | None:
    """The shape ``glmkit tune`` kept on this card for ``kernel``'s launch of ``rows`` x ``columns``
    (``active_cuda_shapes``), made from its fields by ``build``, where the kernel takes it (``fits``); else None (the
    kernel's default serves). Each of glmkit's CUDA kernels reads its shape this way (``launch_shape``)."""
    entry = active_cuda_shapes().get((kernel, rows, columns))
    shape = None if entry is None else build(**entry)
    return shape if shape is not None and fits(shape) else None


def lookup_config(kernel: str, n: int, k: int) -> GemvConfig | None:
    """The tuned launch shape of ``kernel`` for an ``[n, k]`` weight on this machine's GPU, or None."""
    if INTERPRETER:  # the interpreter's own rule of thumb (few, large programs) beats any GPU's table there
        return None
    # inside torch.compile's trace only a dict lookup (FastDecoder reads the table before it compiles)
    table = _ACTIVE if _ACTIVE is not None or torch.compiler.is_compiling() else active_table()
    return (table or {}).get((kernel, n, k))


UNTUNED_FALLS_BACK = ("fp16",)  # kernels that give way to cuBLAS on shapes not tuned for the card in hand


def prefer_triton(kernel: str, n: int, k: int) -> bool:
    """Whether the decoder should run this kernel on an ``[n, k]`` weight rather than cuBLAS: always in bf16/fp32
    (the defaults beat cuBLAS on the cards measured) and 4 bits (bitsandbytes' kernel is slower still); in fp16
    only where this card has tuned shapes (fp16 serves pre-Ampere cards, where the defaults were never measured).

    >>> prefer_triton("bf16", 4096, 4096)
    True
    """
    return INTERPRETER or kernel not in UNTUNED_FALLS_BACK or lookup_config(kernel, n, k) is not None


def pick_config(n: int, k: int, kernel: str = "bf16") -> GemvConfig:
    """The launch shape for an ``[n, k]`` weight: the tuned one for this card, else a rule of thumb.

    On Triton's CPU interpreter every program is a Python loop, so there it takes few, large programs (256 rows:
    rank 0's TP=2 shard of the trained tiny GLM decodes 4.7x faster than with 64 on a 2-core x86 CPU).

    >>> pick_config(1000, 300)
    GemvConfig(block_n=..., block_k=..., num_warps=4)
    """
    tuned = lookup_config(kernel, n, k)
    if tuned is not None:
        return tuned
    block_k = min(512, triton.next_power_of_2(k)) if triton is not None else 512
    if INTERPRETER:
        return GemvConfig(block_n=256, block_k=block_k, num_warps=4)
    return GemvConfig(block_n=8, block_k=block_k, num_warps=4)


if triton is not None:

    @triton.jit
    def allow_next_kernel(PDL: tl.constexpr):
        # programmatic dependent launch (a kernel launched with launch_pdl=True, ``launch_options``): the next kernel
        # may start as soon as every program of this one has called this
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def wait_for_inputs(PDL: tl.constexpr):
        # returns once the kernel before has finished and its writes are visible: nothing it writes may be read,
        # and nothing may be written, before this
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def wait_for_previous_kernel(PDL: tl.constexpr):
        # both, first thing: the next kernel may start as soon as every program of this one has started; nothing
        # the previous kernel writes is read or written before it has finished. The first thing each of glmkit's
        # Triton GEMV kernels does (reading weights before the wait cost them more than it saved: the reads of the
        # kernel before waited behind them, benchmarks/results/early_loads.json and early_reads.json; the batch-1
        # 4-bit CUDA kernel, glmkit.gemv4bit_one, whose launches are short, does read its first weights before)
        allow_next_kernel(PDL)
        wait_for_inputs(PDL)

    @triton.jit
    def swiglu_as_pytorch(gate, up, out_dtype: tl.constexpr):
        # up * silu(gate) from fp32 sums, each of gate, up and silu(gate) rounded to the output's dtype as PyTorch's
        # F.linear, F.silu and the product would round them
        gate = gate.to(out_dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(out_dtype).to(tl.float32)
        return up.to(out_dtype).to(tl.float32) * silu

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, g_ptr, r_ptr, d_ptr, s_ptr, N, K, K_FULL, eps,
                     HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
                     ADD: tl.constexpr, ROUND_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
        # y[n] = sum_k w[n, k] x[k] for BLOCK_N rows; with SWIGLU the weight has 2N rows (gate, then up) and
        # y[n] = up[n] * silu(gate[n]), each rounded to y's dtype as PyTorch would round them.
        # NORM: x is the raw residual stream and the product is W @ rmsnorm(x) * g: the sum runs over x * g
        # alongside sum(x^2), and 1 / rms(x) (a scalar) multiplies the finished sums (one pass over x, no rounding
        # of the normalised x to 16 bits: closer to fp32 than PyTorch's own). RESIDUAL: y = r + W @ x, with
        # W @ x rounded to y's dtype first, as PyTorch's x + F.linear(a, W) rounds.
        # ADD (with NORM): the residual stream is x + d, rounded to x's dtype as PyTorch's x + d; every program forms
        # it as it reads it and program 0 alone also writes it to s (a buffer no program reads). ROUND_BITS: bf16
        # in Triton's CPU interpreter, which truncates fp32 to bf16 where a GPU rounds to nearest even: the rounding
        # is done on the bits there.
        wait_for_previous_kernel(PDL)
        s_end = tl.where(tl.program_id(0) == 0, K, 0)  # the columns of s this program writes: all, or none
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        row_ok = rows < N
        w_rows = w_ptr + rows[:, None] * K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K_FULL, BLOCK_K):  # K_FULL: K rounded down to whole blocks
            x = tl.load(x_ptr + k0 + cols)
            if ADD:
                x = x.to(tl.float32) + tl.load(d_ptr + k0 + cols).to(tl.float32)
                if ROUND_BITS:  # to nearest, ties to even (finite values), as a GPU's conversion rounds
                    bits = x.to(tl.uint32, bitcast=True)
                    x = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
                x = x.to(x_ptr.dtype.element_ty)
                tl.store(s_ptr + k0 + cols, x, mask=k0 + cols < s_end)
            x = x.to(tl.float32)
            if NORM:
                squares += x * x
                x = x * tl.load(g_ptr + k0 + cols).to(tl.float32)
            x = x[None, :]
            if EVEN_N:
                acc += tl.load(w_rows + k0 + cols[None, :]).to(tl.float32) * x
                if SWIGLU:
                    acc_up += tl.load(w_rows + N * K + k0 + cols[None, :]).to(tl.float32) * x
            else:
                acc += tl.load(w_rows + k0 + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * x
                if SWIGLU:
                    acc_up += tl.load(w_rows + N * K + k0 + cols[None, :], mask=row_ok[:, None],
                                      other=0.0).to(tl.float32) * x
        if not EVEN_K:  # the last, partial block of columns
            c = K_FULL + cols
            ok = row_ok[:, None] & (c < K)[None, :]
            x = tl.load(x_ptr + c, mask=c < K, other=0.0)
            if ADD:
                x = x.to(tl.float32) + tl.load(d_ptr + c, mask=c < K, other=0.0).to(tl.float32)
                if ROUND_BITS:
                    bits = x.to(tl.uint32, bitcast=True)
                    x = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
                x = x.to(x_ptr.dtype.element_ty)
                tl.store(s_ptr + c, x, mask=c < s_end)
            x = x.to(tl.float32)
            if NORM:
                squares += x * x
                x = x * tl.load(g_ptr + c, mask=c < K, other=0.0).to(tl.float32)
            x = x[None, :]
            acc += tl.load(w_rows + c[None, :], mask=ok, other=0.0).to(tl.float32) * x
            if SWIGLU:
                acc_up += tl.load(w_rows + N * K + c[None, :], mask=ok, other=0.0).to(tl.float32) * x
        out_dtype = x_ptr.dtype.element_ty  # the product's dtype, as PyTorch rounds it (y may be wider: out=)
        y = tl.sum(acc, axis=1)
        if NORM:  # rmsnorm's 1 / sqrt(mean(x^2) + eps), the same for every row: it factors out of the sums
            rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
            y = y * rstd
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if SWIGLU:
            up = tl.sum(acc_up, axis=1)
            if NORM:
                up = up * rstd
            y = swiglu_as_pytorch(y, up, out_dtype)
        if RESIDUAL:
            y = y.to(out_dtype).to(tl.float32) + tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(out_dtype).to(y_ptr.dtype.element_ty), mask=row_ok)


def _check_vector(name: str, t: torch.Tensor, size: int, like: torch.Tensor) -> torch.Tensor:
    if t.numel() != size or t.device != like.device or t.dtype != like.dtype:
        raise ValueError(f"gemv's {name} must hold {size} values on {like.device} in {like.dtype} (one token), got "
                         f"shape {tuple(t.shape)} on {t.device} in {t.dtype}.")
    return t.contiguous()


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, swiglu: bool,
            config: GemvConfig | None, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
            residual: torch.Tensor | None = None, add: torch.Tensor | None = None,
            added: torch.Tensor | None = None, pdl: int | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("glmkit.gemv needs Triton: it comes with PyTorch's CUDA builds (pip install triton).")
    if swiglu and bias is not None:
        raise ValueError("The SwiGLU GEMV takes no bias (GLM's gate/up projection has none); add it with F.linear's "
                         "bias before the activation instead.")
    if not (weight.is_cuda or INTERPRETER):
        raise ValueError("gemv runs on a GPU (or in Triton's CPU interpreter, TRITON_INTERPRET=1); this weight is on "
                         f"{weight.device}: use F.linear there.")
    if x.device != weight.device or x.dtype != weight.dtype:
        raise ValueError(f"gemv needs x and weight on one device in one dtype, got {x.device}/{x.dtype} and "
                         f"{weight.device}/{weight.dtype}.")
    k = weight.shape[1]
    if x.shape[-1] != k or x.numel() != k:
        raise ValueError(f"gemv multiplies one vector of {k} values (batch 1, one token), got a tensor of shape "
                         f"{tuple(x.shape)}; use F.linear for more rows.")
    if not weight.is_contiguous() or weight.numel() >= 2**31:
        raise ValueError("gemv needs a contiguous weight of fewer than 2**31 elements.")
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    if norm_weight is not None:
        norm_weight = _check_vector("norm_weight", norm_weight, k, x)
    if residual is not None:
        residual = _check_vector("residual", residual, n, x)
    if add is not None:
        add = _check_vector("add", add, k, x)
    if out is not None and (out.numel() != n or out.device != x.device or not out.is_contiguous()
                            or out.dtype not in (x.dtype, torch.float32)):
        raise ValueError(f"gemv's out must be a contiguous tensor of {n} values on {x.device} in x's {x.dtype} or "
                         f"in float32; got shape {tuple(out.shape)} in {out.dtype} on {out.device}.")
    y = out if out is not None else torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    cfg = config or pick_config(n, k, kernel_name(weight.dtype))
    grid = (triton.cdiv(n, cfg.block_n),)
    _gemv_kernel[grid](x.contiguous(), weight, bias if bias is not None else weight, y,
                       norm_weight if norm_weight is not None else weight,
                       residual if residual is not None else weight, add if add is not None else weight,
                       added if added is not None else weight, n, k, k - k % cfg.block_k, eps,
                       HAS_BIAS=bias is not None, SWIGLU=swiglu, NORM=norm_weight is not None,
                       RESIDUAL=residual is not None, ADD=add is not None,
                       ROUND_BITS=add is not None and INTERPRETER and x.dtype == torch.bfloat16,
                       BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                       EVEN_N=n % cfg.block_n == 0, EVEN_K=k % cfg.block_k == 0, num_warps=cfg.num_warps,
                       **launch_options(pdl))
    return y


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
         residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for one token: x holds one vector ``[..., k]``, weight is ``[n, k]``.
    ``config`` overrides the launch shape (default: ``pick_config``).

    Two steps of a decoder layer can ride along in the same launch (the weight read dominates; they cost no kernel
    of their own): ``norm_weight`` (``[k]``) takes x as the raw residual stream and multiplies its RMSNorm instead,
    ``F.linear(rms_norm(x, norm_weight, eps), weight, bias)`` (as ``GlmRMSNorm``); ``residual`` (``[..., n]``) adds
    the product to it, ``residual + F.linear(x, weight, bias)``, rounded as PyTorch rounds that sum. ``out``: a
    tensor of n values to write the result into (and return), also in a wider dtype: ``F.linear(...).float()`` of
    the logits in one launch, with no copy kernel after it.

    >>> import torch.nn.functional as F
    >>> if triton_available():
    ...     device = "cuda" if torch.cuda.is_available() else "cpu"
    ...     w, x, g = (torch.randn(*s, device=device) for s in ((96, 64), (1, 1, 64), (64,)))
    ...     r = torch.randn(1, 1, 96, device=device)
    ...     normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g  # RMSNorm in fp32
    ...     assert torch.allclose(gemv(x, w, norm_weight=g), F.linear(normed, w), atol=1e-4)
    ...     assert torch.allclose(gemv(x, w, residual=r), r + F.linear(x, w), atol=1e-4)
    """
    return _launch(x, weight, bias, swiglu=False, config=config, norm_weight=norm_weight, eps=eps, residual=residual,
                   out=out)


def gemv_swiglu(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None,
                norm_weight: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """GLM's MLP activation of one token: ``up * silu(gate)`` where ``gate, up = F.linear(x, weight).chunk(2, -1)``;
    with ``norm_weight`` of ``rms_norm(x, norm_weight, eps)`` instead of x (see ``gemv``).

    >>> import torch.nn.functional as F
    >>> if triton_available():
    ...     device = "cuda" if torch.cuda.is_available() else "cpu"
    ...     w, x = torch.randn(2 * 48, 64, device=device), torch.randn(1, 1, 64, device=device)
    ...     gate, up = F.linear(x, w).chunk(2, dim=-1)
    ...     assert torch.allclose(gemv_swiglu(x, w), up * F.silu(gate), atol=1e-4)
    """
    if weight.shape[0] % 2:
        raise ValueError(f"gemv_swiglu needs a gate/up weight with an even number of rows, got {weight.shape[0]}.")
    return _launch(x, weight, None, swiglu=True, config=config, norm_weight=norm_weight, eps=eps)



def add_norm_gemv(x: torch.Tensor, add: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor,
                  bias: torch.Tensor | None = None, eps: float = 1e-5, swiglu: bool = False,
                  config: GemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add, the RMSNorm and the product of one token in one launch: ``s = x + add`` (rounded as
    PyTorch's ``x + add``), then ``F.linear(rms_norm(s, norm_weight, eps), weight, bias)`` (``gemv_swiglu``'s
    ``up * silu(gate)`` of it with ``swiglu``); returns ``(product, s)``. Each program forms s as it reads x and
    ``add``; the first also writes it to a new tensor (never x or ``add``, which others are reading). A tensor-parallel
    rank (``glmkit.tp_decode``) adds an all-reduced partial sum to its residual stream this way, with no add or norm
    kernel between the all-reduce and the next projection.

    >>> import torch.nn.functional as F
    >>> if triton_available():
    ...     device = "cuda" if torch.cuda.is_available() else "cpu"
    ...     w, x, d, g = (torch.randn(*s, device=device) for s in ((96, 64), (1, 1, 64), (1, 1, 64), (64,)))
    ...     y, s = add_norm_gemv(x, d, w, g)
    ...     normed = (x + d) * torch.rsqrt((x + d).pow(2).mean(-1, keepdim=True) + 1e-5) * g
    ...     assert torch.equal(s, x + d) and torch.allclose(y, F.linear(normed, w), atol=1e-4)
    """
    if swiglu and weight.shape[0] % 2:
        raise ValueError(f"add_norm_gemv's SwiGLU needs a gate/up weight with an even number of rows, got "
                         f"{weight.shape[0]}.")
    added = torch.empty_like(x, memory_format=torch.contiguous_format)
    y = _launch(x, weight, bias, swiglu=swiglu, config=config, norm_weight=norm_weight, eps=eps, add=add,
                added=added)
    return y, added
