"""A fast decode path for GLM-4: static KV cache, fused QKV, compiled layer, CUDA graphs per step, on one device
or across a layer split.

Plain ``generate()`` spends most of a decode step in Python and kernel launches: at batch 1 the GPU idles.
``FastDecoder`` preallocates the KV cache, fuses each layer's q/k/v projections into one matrix, optionally
compiles the layer function once (``torch.compile``, reused by all 40 layers), and on a GPU captures the one-token
step (40 layers, norm, ``lm_head``) as CUDA graphs replayed for every token. On a model split by a device map each
device runs its share of the step as its own graph and only the hidden state crosses between the cards, so a split
costs the hop (18 µs of a ~5 ms token on NVLink), not the Python-bound ``generate()`` of a plain split.
Greedy decoding gives the same tokens as ``generate()`` (tested on the CPU, where it runs eagerly).
Introduced in ``notebooks/05_tuning.ipynb``; written for GLM (``GlmForCausalLM``) in 16/32-bit and in bitsandbytes
nf4/fp4 (read in place by ``glmkit.gemv4bit``'s kernels).

>>> from glmkit.loading import load_model
>>> model = load_model(device_map="cpu", dtype=torch.float32)
>>> ids = torch.tensor([[1, 2, 3, 4, 5]])
>>> fast = FastDecoder(model, max_len=32).generate(ids, max_new_tokens=6, ignore_eos=True)
>>> slow = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
>>> torch.equal(fast, slow)
True
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from glmkit import gemv4bit_one, gemv16_one, mlp16_one
from glmkit.attention import ONE_SPLIT_MAX, Grid, auto_attention, qkv_decode_attention
from glmkit.device_map import check_device_map
from glmkit.gemv import (
    active_table,
    choose_pdl,
    dependent_launches,
    gemv_swiglu,
    kernel_name,
    prefer_triton,
    triton_available,
)
from glmkit.gemv import gemv as triton_gemv
from glmkit.gemv4bit import (
    MAX_VECTORS,
    ROW_KERNEL_MAX_VECTORS,
    NormedStream,
    Packed4bit,
    gemv_4bit,
    gemv_4bit_multi,
    gemv_4bit_normed,
    gemv_4bit_residual,
    gemv_4bit_swiglu,
    is_4bit,
    linear_4bit,
    normed_stream,
    sms_left_by,
    tensor_cores,
    unsupported_quantization,
)
from glmkit.generation import cache_argument, chunked_prefill, pick_token, preallocated_cache
from glmkit.generation import eos_token_ids as model_eos
from glmkit.greedy import greedy_next
from glmkit.vocabulary import head_dim

# dtypes whose batch-1 step runs q/k/v and o_proj through glmkit.gemv16_one (where it leaves SMs to the attention):
# measured in bf16 (benchmarks/results/gemv16_step.json); fp16 keeps the Triton GEMVs until measured
GEMV16_DTYPES = (torch.bfloat16,)
ATTENTIONS = ("auto", "triton", "sdpa", "reduction")  # FastDecoder(attention=...)
HOPS = ("peer", "host")  # how the hidden state crosses between the devices of a split (FastDecoder(hop=...))
OWN_PREFILL_MAX = 1 << 20  # rows x prompt tokens x cache positions attended up to which a prefill runs the decoder's
# own layers (attention scores of at most 4 MiB per head in fp32); above, the model's chunked prefill (memory-lean)
RECOMPILE_LIMIT = 1024  # compiled shapes of the layer function one process may hold (torch's default: 8)
# A 4-bit model's steps of up to this many rows run glmkit's 4-bit kernels (``glmkit.gemv4bit``: a program per row
# up to ROW_KERNEL_MAX_VECTORS rows, above them one lookup per weight for all rows and the products on the tensor
# cores; on GPUs of compute capability 8.0+ one row glmkit.gemv4bit_one's CUDA kernel, 2-8 glmkit.gemv4bit_mma's);
# larger steps,
# bitsandbytes' dequantize-then-GEMM (FastDecoder, "auto"). GLM-4-9B nf4 on an H200
# (benchmarks/results/nf4_batch.json): glmkit's kernels faster than bitsandbytes' at every batch size up to 64
FOUR_BIT_MAX_BATCH = MAX_VECTORS


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as ``GlmRMSNorm`` computes it: in fp32, then back to the input dtype before the weight."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    # GLM interleaves: pairs (0, 1), (2, 3), ... rotate together
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GLM's rotary embedding of ``x`` ``[b, heads, s, head_dim]`` with ``cos``/``sin`` ``[b, 1, s, rotary_dim]``:
    only the first ``rotary_dim`` dims rotate."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat([rot * cos + _rotate_half(rot) * sin, rest], dim=-1)


def rotary_tables(model: torch.nn.Module, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM's rotary ``cos`` and ``sin`` for positions ``0..max_len-1``, ``[max_len, rotary_dim]`` each, in the model's
    dtype on its rotary embedding's device: the form ``rope`` and ``glmkit.attention.decode_attention`` read (each
    frequency repeated for its adjacent pair of dims, as GLM's ``apply_rotary_pos_emb``).

    >>> from glmkit.loading import load_model
    >>> cos, sin = rotary_tables(load_model(device_map="cpu", dtype=torch.float32), 8)
    >>> tuple(cos.shape), bool((cos[0] == 1).all() and (sin[0] == 0).all()), torch.equal(cos[:, 0], cos[:, 1])
    ((8, 32), True, True)
    """
    rotary = model.model.rotary_emb
    device = next(iter(rotary.buffers())).device
    with torch.no_grad():
        positions = torch.arange(max_len, device=device)[None]
        probe = torch.zeros(1, device=device, dtype=model.get_input_embeddings().weight.dtype)
        cos, sin = rotary(probe, positions)  # [1, max_len, 2 * rotary/2]
    half = cos.shape[-1] // 2
    # GLM uses each frequency for an adjacent pair of dims: repeat_interleave, as its apply_rotary_pos_emb
    return (cos[0, :, :half].repeat_interleave(2, dim=-1).contiguous(),
            sin[0, :, :half].repeat_interleave(2, dim=-1).contiguous())


Weight = torch.Tensor | Packed4bit | tuple[Packed4bit, ...]  # a tuple: 4-bit q, k, v, whose outputs are concatenated


def _projection_weight(*modules: torch.nn.Module) -> Weight:
    """The weight the decoder multiplies by: 16/32-bit weights concatenated along rows (fused q/k/v), bitsandbytes
    4-bit weights read where they are (``Packed4bit``; several stay a tuple: concatenating would copy them)."""
    if any(is_4bit(m.weight) for m in modules):
        packed = tuple(Packed4bit.from_bnb(m.weight) for m in modules)
        return packed[0] if len(packed) == 1 else packed
    return modules[0].weight if len(modules) == 1 else torch.cat([m.weight for m in modules])


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, gemv: bool | str) -> torch.Tensor:
    """``F.linear`` (cuBLAS); with ``gemv="triton"`` glmkit's Triton kernel for one token (``glmkit.gemv``; more
    rows: cuBLAS); with ``gemv=True`` (one token, compiled) a multiply-and-sum that inductor turns into one reduction
    kernel. A 4-bit weight goes through ``glmkit.gemv4bit`` (``"triton"``, up to its ``MAX_VECTORS`` rows) or
    bitsandbytes' ``matmul_4bit`` (several 4-bit weights and several rows: dequantized side by side, one GEMM)."""
    if isinstance(weight, Packed4bit):
        return gemv_4bit(x, weight, bias) if gemv == "triton" else linear_4bit(x, weight, bias)
    if isinstance(weight, tuple) and gemv == "triton":
        return gemv_4bit_multi(x, weight, bias)  # q, k and v in one launch, written side by side
    if isinstance(weight, tuple) and x.numel() == x.shape[-1]:  # 4-bit q, k, v of one token: bitsandbytes' kernel
        biases = [None] * len(weight) if bias is None else bias.split([w.shape[0] for w in weight])
        return torch.cat([linear_4bit(x, w, b) for w, b in zip(weight, biases)], dim=-1)
    if isinstance(weight, tuple):  # of several: one GEMM on their weights dequantized side by side, as bitsandbytes
        # multiplies several rows, but as one weight (three GEMMs, k's and v's of 256 rows, put the prompt's keys 4.96%
        # from fp32 against a 16-bit model's 4.61%: benchmarks/results/nf4_layer_errors_three_gemms.json)
        return F.linear(x, torch.cat([w.dequantize(x.dtype) for w in weight]), bias)
    if fuses(weight, gemv, x=x):
        return triton_gemv(x, weight, bias)
    if gemv == "triton" or not gemv:  # "triton": several rows (a 4-bit model's batch) or fp16 on an untuned shape
        return F.linear(x, weight, bias)
    y = (weight.float() * x.float()[..., None, :]).sum(-1)
    return (y if bias is None else y + bias.float()).to(x.dtype)


def mlp_activation(h: torch.Tensor, wgu: Weight, gemv: bool | str, norm_weight: torch.Tensor | None = None,
                   eps: float = 1e-5) -> torch.Tensor:
    """``up * silu(gate)`` of the fused gate/up projection; the Triton kernel applies it before it writes. With
    ``norm_weight``, h is the raw residual stream and its RMSNorm is multiplied (folded into the Triton kernel where
    that runs, ``fuses``)."""
    if norm_weight is not None and fuses(wgu, gemv, swiglu=True, x=h):
        return gemv_swiglu(h, wgu, norm_weight=norm_weight, eps=eps)
    if norm_weight is not None:
        h = rms_norm(h, norm_weight, eps)
    if gemv == "triton" and isinstance(wgu, Packed4bit):
        return gemv_4bit_swiglu(h, wgu)
    if fuses(wgu, gemv, swiglu=True, x=h):
        return gemv_swiglu(h, wgu)
    gate, up = linear(h, wgu, None, gemv).chunk(2, dim=-1)
    return up * F.silu(gate)


def fuses(weight: Weight, gemv: bool | str, swiglu: bool = False, x: torch.Tensor | None = None) -> bool:
    """Whether glmkit's 16/32-bit Triton GEMV multiplies by ``weight`` (``gemv="triton"``, a shape it runs, one row
    of input ``x``: more, as a 4-bit model's batch, go through cuBLAS), and so can fold the RMSNorm before it and the
    residual add after it into its own launch.

    >>> fuses(torch.zeros(8, 4), "triton"), fuses(torch.zeros(8, 4), False)
    (True, False)
    """
    if gemv != "triton" or (x is not None and x.numel() != x.shape[-1]) or not isinstance(weight, torch.Tensor):
        return False
    return prefer_triton(kernel_name(weight.dtype), weight.shape[0] // (2 if swiglu else 1), weight.shape[1])


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: Weight, bias: torch.Tensor | None,
                gemv: bool | str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(rms_norm(x, norm_weight, eps), weight, bias, gemv)``: in one Triton launch where ``fuses``, which
    normalises x as it reads it (no norm kernel). The fused decode step of ``notebooks/05_tuning.ipynb``. ``out``:
    where to write the result (returned), e.g. the fp32 logits buffer: the kernel widens as it writes.

    >>> x, g, w = torch.randn(1, 1, 16), torch.rand(16), torch.randn(8, 16)
    >>> gemv = "triton" if triton_available() else False  # glmkit's kernel (GPU, or TRITON_INTERPRET=1), else cuBLAS
    >>> torch.allclose(norm_linear(x, g, 1e-5, w, None, gemv), F.linear(rms_norm(x, g, 1e-5), w), atol=1e-5)
    True
    """
    if fuses(weight, gemv, x=x):
        return triton_gemv(x, weight, bias, norm_weight=norm_weight, eps=eps, out=out)
    y = linear(rms_norm(x, norm_weight, eps), weight, bias, gemv)
    return y if out is None else out.copy_(y.view(out.shape))


def residual_linear(residual: torch.Tensor, x: torch.Tensor, weight: Weight, gemv: bool | str) -> torch.Tensor:
    """``residual + linear(x, weight, None, gemv)``: in one Triton launch where ``fuses`` (the add in its epilogue,
    rounded as PyTorch rounds it). The fused decode step of ``notebooks/05_tuning.ipynb``.

    >>> residual, x, w = torch.randn(1, 1, 8), torch.randn(1, 1, 16), torch.randn(8, 16)
    >>> gemv = "triton" if triton_available() else False  # glmkit's kernel (GPU, or TRITON_INTERPRET=1), else cuBLAS
    >>> torch.allclose(residual_linear(residual, x, w, gemv), residual + F.linear(x, w), atol=1e-5)
    True
    """
    if fuses(weight, gemv, x=x):
        return triton_gemv(x, weight, None, residual=residual)
    return residual + linear(x, weight, None, gemv)


def gemv16_sms_left(x: torch.Tensor, wqkv: Weight, wo: Weight, gemv: bool | str, programs: int) -> int:
    """SMs the fused batch-1 step's q/k/v leaves to the ``programs`` programs of the decode attention after it when
    q/k/v and o_proj go through glmkit's 16-bit CUDA kernel (``glmkit.gemv16_one``), or 0: they take the Triton GEMV.
    The kernel pays only where it leaves SMs (the attention then reads its cache while q/k/v runs): in bf16
    (``GEMV16_DTYPES``) in an uncompiled layer, where the attention's programs are few and launched with programmatic
    dependent launch (``sms_left``: batch 1 on a short cache, Hopper), the Triton GEMV would run (``fuses``) and the
    kernel takes both weights (``usable``, ``ROLES``); its first-run check is asked last (it compiles and launches).

    >>> gemv16_sms_left(torch.zeros(1, 1, 512), torch.zeros(8, 512), torch.zeros(512, 8), "triton", 4)  # a CPU: 0
    0
    """
    if torch.compiler.is_compiling() or x.device.type != "cuda" or x.dtype not in GEMV16_DTYPES:
        return 0
    left = gemv16_one.sms_left(x.device, programs)
    if not left or not all(isinstance(w, torch.Tensor) and fuses(w, gemv, x=x) for w in (wqkv, wo)):
        return 0
    if not (gemv16_one.usable(x, wqkv, "qkv") and gemv16_one.takes(wo, x.dtype, x.device, "o_proj")):
        return 0
    return left if gemv16_one.check(x.device, x.dtype) else 0


def mlp16_takes(x: torch.Tensor, wgu: Weight, wd: Weight, gemv: bool | str,
                workspace: mlp16_one.Workspace | None) -> bool:
    """Whether the fused batch-1 step's MLP runs as glmkit's one CUDA kernel (``glmkit.mlp16_one``) instead of the two
    Triton GEMVs (or cuBLAS where Triton's shapes are untuned): on the Triton step (``gemv="triton"``), in an
    uncompiled layer (the kernel's checks read pointers), with the decoder's workspace for it, on Hopper in bf16/fp16
    at a shape it takes (``usable``); its first-run check is asked last (it compiles and launches).

    >>> mlp16_takes(torch.zeros(1, 1, 512), torch.zeros(2048, 512), torch.zeros(512, 1024), "triton", None)
    False
    """
    if workspace is None or gemv != "triton" or torch.compiler.is_compiling():
        return False
    if not (isinstance(wgu, torch.Tensor) and isinstance(wd, torch.Tensor) and workspace.fits(x, wd.shape[-1])):
        return False
    return mlp16_one.usable(x, wgu, wd) and mlp16_one.check(x.device, x.dtype)


def auto_gemv(device: torch.device, batch_size: int, dtype: torch.dtype = torch.bfloat16,
              four_bit: bool = False) -> str | bool:
    """What ``gemv="auto"`` picks: ``"triton"`` at batch 1 (a 4-bit model: up to ``FOUR_BIT_MAX_BATCH`` rows where
    the 4-bit tensor-core kernel runs, ``gemv4bit.tensor_cores``; else ``ROW_KERNEL_MAX_VECTORS``) on a
    GPU with Triton installed, of compute capability 8.0 or newer (Ampere and later), or 7.0 or newer for
    fp16/fp32 (a 2080 Ti: Triton builds for Volta and Turing, which have no bf16); otherwise ``False`` (cuBLAS, or
    bitsandbytes' ``matmul_4bit``). If the kernels then fail there, the decoder warns and uses those.

    >>> auto_gemv(torch.device("cpu"), 1)
    False
    """
    rows = (FOUR_BIT_MAX_BATCH if tensor_cores(device) else ROW_KERNEL_MAX_VECTORS) if four_bit else 1
    if device.type != "cuda" or batch_size > rows or not triton_available():
        return False
    capability = torch.cuda.get_device_capability(device)
    return "triton" if capability >= (8, 0) or (capability >= (7, 0) and dtype != torch.bfloat16) else False


def _attention_reduction(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """One query per sequence attending over the whole static cache, written as multiply-and-sum reductions in fp32
    (the compiler turns them into a few fused kernels instead of a cuDNN call); q: [b, heads, 1, hd]."""
    b, heads, _, hd = q.shape
    kv = k_cache.shape[1]
    qg = q.view(b, kv, heads // kv, 1, hd).float()  # query heads grouped by the KV head they share
    scores = (qg * k_cache[:, :, None].float()).sum(-1) * hd**-0.5 + mask.view(b, 1, 1, -1)  # [b, kv, g, L]
    out = (scores.softmax(-1)[..., None] * v_cache[:, :, None].float()).sum(-2)  # [b, kv, g, hd]
    return out.to(q.dtype).view(b, heads, 1, hd)


def decoder_layer(x: torch.Tensor, h: torch.Tensor | NormedStream, pos: torch.Tensor, batch_index: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, wqkv: torch.Tensor,
                  bqkv: torch.Tensor | None, wo: torch.Tensor, ln2: torch.Tensor, wgu: torch.Tensor, wd: torch.Tensor,
                  next_norm: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, eps: float, heads: int,
                  kv_heads: int, head_dim: int, gemv: bool | str = False, attention: str = "sdpa",
                  in_norm: torch.Tensor | None = None, tickets: torch.Tensor | None = None,
                  mlp_workspace: mlp16_one.Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor | NormedStream]:
    """One GLM decoder layer for one new token per sequence, writing its K/V at ``pos`` in the static cache.

    x: the residual stream [b, 1, hidden]; h: ``x`` already normalised by this layer's input norm; returns the new
    residual stream and it normalised by ``next_norm`` (the next layer's input norm, or the final norm), so the
    residual add and the next norm run as one kernel (on the fused Triton path, ``in_norm`` below, neither runs as a
    kernel of its own). pos, batch_index: [b];
    k_cache/v_cache: [b, kv_heads, max_len, head_dim]; mask: additive [b, 1, 1, max_len] (0 up to pos, else -inf;
    None with attention="triton", which does not read it).
    attention: ``"triton"`` (rope, cache write and attention in ``glmkit.attention``'s kernel: it reads pos, not the
    mask), ``"sdpa"`` or ``"reduction"``.

    in_norm: this layer's input norm, given on the Triton batch-1 path (``FastDecoder.fuses_norms``): then the
    GEMVs do the norms and the residual adds (``norm_linear``, ``residual_linear``), h is not read and the layer
    returns ``(x, x)``: a layer is four GEMV launches and attention, with no norm or add kernel. 4-bit weights:
    h is the ``NormedStream`` the layer before returned (a segment's first layer makes one from x), and the layer
    returns x and the next norm's (``gemv_4bit_normed``, ``gemv_4bit_residual``).

    cos/sin: at each row's position ``[b, 1, 1, rotary]``; with ``attention="triton"`` the tables ``[max_len,
    rotary]`` may be given instead (2-D): the kernel reads row ``pos`` itself, no gather kernels before it.
    tickets: int32 zeros, one per row and KV head, for glmkit's attention kernel (``decode_attention``): the splits
    of a cache are then combined in the same kernel, and a short cache at batch 1 is split into tiles side by side.
    mlp_workspace: the decoder's own ``glmkit.mlp16_one.Workspace`` on this GPU: where given and the kernel takes the
    step (``mlp16_takes``), the whole MLP runs as that one kernel instead of the two Triton GEMVs.
    """
    b = x.shape[0]
    fused = in_norm is not None
    four_bit = fused and isinstance(wo, Packed4bit)  # 4 bits: each norm travels as a NormedStream
    # q/k/v may leave an SM to each of the attention's few programs (with programmatic dependent launch): they start
    # while it runs and read their cache tiles meanwhile (glmkit.gemv4bit_one / gemv16_one .LEAVE_SMS_MAX)
    programs = Grid.of(b, k_cache.shape[1], k_cache.shape[2], tickets is not None, early=True).programs \
        if fused and attention == "triton" and not torch.compiler.is_compiling() else 0
    left = 0  # SMs q/k/v leaves to the attention's programs
    if four_bit:
        stream = h if isinstance(h, NormedStream) else normed_stream(x, in_norm)  # (a segment's first layer)
        left = sms_left_by(stream, wqkv, programs)
        qkv = gemv_4bit_normed(stream, wqkv, bqkv, eps, leave_sms=left)
    elif fused and (left := gemv16_sms_left(x, wqkv, wo, gemv, programs)):  # q/k/v and o_proj: glmkit.gemv16_one
        qkv = gemv16_one.gemv_16_one(x, wqkv, bqkv, norm_weight=in_norm, eps=eps, leave_sms=left)
    else:  # [b, 1, (heads + 2 kv_heads) * head_dim]
        qkv = norm_linear(x, in_norm, eps, wqkv, bqkv, gemv) if fused else linear(h, wqkv, bqkv, gemv)
    if attention == "triton":  # one kernel: rope, the K/V write at pos and attention over 0..pos
        attn = qkv_decode_attention(qkv, k_cache, v_cache, pos, batch_index, cos, sin, tickets,
                                    cos_table=cos.dim() == 2, early=left > 0)  # [b, heads, 1, hd]
    else:
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q = rope(q.view(b, 1, heads, head_dim).transpose(1, 2), cos, sin)
        k = rope(k.view(b, 1, kv_heads, head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, 1, kv_heads, head_dim).transpose(1, 2)
        k_cache[batch_index, :, pos] = k[:, :, 0]
        v_cache[batch_index, :, pos] = v[:, :, 0]
        if attention == "sdpa":
            attn = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
        else:
            attn = _attention_reduction(q, k_cache, v_cache, mask)
    attn = attn.transpose(1, 2).reshape(b, 1, heads * head_dim)
    if four_bit:
        x, stream = gemv_4bit_residual(attn, wo, x, ln2)
        x, stream = gemv_4bit_residual(gemv_4bit_normed(stream, wgu, None, eps, swiglu=True), wd, x, next_norm)
        return x, stream
    # (glmkit.gemv16_one's o_proj keeps off the SMs the attention's programs hold, and lets gate/up launch last)
    x = gemv16_one.gemv_16_one(attn, wo, residual=x, leave_sms=left, role="o_proj") if left \
        else residual_linear(x, attn, wo, gemv)
    if fused and mlp16_takes(x, wgu, wd, gemv, mlp_workspace):  # norm, gate/up, SwiGLU, down, add: one kernel
        y = mlp16_one.mlp_16_one_or_off(x, wgu, wd, ln2, eps, mlp_workspace)  # (None: it failed, turned off)
        if y is not None:
            return y, y
    mlp = mlp_activation(x, wgu, gemv, ln2, eps) if fused else mlp_activation(rms_norm(x, ln2, eps), wgu, gemv)
    x = residual_linear(x, mlp, wd, gemv)
    return x, (x if fused else rms_norm(x, next_norm, eps))


def prefill_layer(x: torch.Tensor, h: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  mask: torch.Tensor, wqkv: Weight, bqkv: torch.Tensor | None, wo: Weight, ln2: torch.Tensor,
                  wgu: Weight, wd: Weight, next_norm: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  eps: float, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``decoder_layer`` for ``s`` prompt tokens of each of ``b`` sequences at once (x, h: ``[b, s, hidden]``), run
    eagerly (cuBLAS for 16/32-bit weights, bitsandbytes' kernel for 4-bit ones): their K/V go to ``positions``
    ``[s]`` of the rows' caches ``[b, kv_heads, max_len, head_dim]``, and they attend to the cache up to their own
    position (``mask``: ``[s, L]`` booleans over the first ``L`` cache positions, ``L`` = the last position + 1)."""
    b, s, _ = x.shape
    qkv = linear(h, wqkv, bqkv, False)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = rope(q.view(b, s, heads, head_dim).transpose(1, 2), cos, sin)
    k = rope(k.view(b, s, kv_heads, head_dim).transpose(1, 2), cos, sin)
    k_cache[:, :, positions] = k
    v_cache[:, :, positions] = v.view(b, s, kv_heads, head_dim).transpose(1, 2)
    filled = mask.shape[-1]
    attn = F.scaled_dot_product_attention(q, k_cache[:, :, :filled], v_cache[:, :, :filled], attn_mask=mask,
                                          enable_gqa=True)  # [b, heads, s, head_dim]
    x = x + linear(attn.transpose(1, 2).reshape(b, s, heads * head_dim), wo, None, False)
    h = rms_norm(x, ln2, eps)
    x = x + linear(mlp_activation(h, wgu, False), wd, None, False)
    return x, rms_norm(x, next_norm, eps)


def check_prefill(input_ids: torch.Tensor, slot: int | None, start: int, batch_size: int,
                  max_len: int) -> tuple[int, int]:
    """The prompts' ``(b, n)`` once they fit a decoder of ``batch_size`` rows and a ``max_len`` static cache
    (all rows, or one prompt into row ``slot``, from position ``start``); else ``ValueError`` saying what to change.

    >>> check_prefill(torch.zeros(2, 5, dtype=torch.long), None, 0, batch_size=2, max_len=5)
    (2, 5)
    """
    b, n = input_ids.shape
    if slot is None and b != batch_size:
        raise ValueError(f"This decoder was built for batch size {batch_size}, got {b} prompts.")
    if slot is not None and (b != 1 or not 0 <= slot < batch_size):
        raise ValueError(f"A slot takes one prompt and is one of 0..{batch_size - 1}; got {b} prompts "
                         f"for slot {slot}.")
    if n < 1 or start < 0:
        raise ValueError(f"prefill needs at least one token and start >= 0 (got {n} tokens, start={start}).")
    if start + n > max_len:
        raise ValueError(f"The prompt reaches position {start + n}; the static cache holds {max_len} "
                         "(raise max_len).")
    return b, n


@dataclass(frozen=True)
class Segment:
    """Consecutive parts of the model that one device-map entry placed: one CUDA graph per step runs them.

    ``entry`` is the map's value as written (``0``, ``"cuda:0"``, ``"cpu"``...). Entries are compared as written, so
    a map that names one device two ways (``0`` and ``"cuda:0"``) runs as two segments on it: the one-GPU proxy of
    a two-GPU split, with the same hand-over of the hidden state between segments.
    """

    entry: Any
    device: torch.device
    layers: range  # the decoder layers it runs (may be empty: the embeddings or lm_head alone)
    embed: bool  # it starts from the token ids (holds the input embeddings)
    head: bool  # it ends with lm_head (holds the output layer) and writes the logits


def _entry_key(entry: Any) -> tuple[str, str]:
    return type(entry).__name__, str(entry)


def _map_entry(device_map: dict[str, Any], name: str) -> tuple[bool, Any]:
    """(found, entry) for module ``name``: its own key, else its closest parent's, else the whole-model key ``""``."""
    while True:
        if name in device_map:
            return True, device_map[name]
        if "." not in name:
            return ("" in device_map), device_map.get("")
        name = name.rsplit(".", 1)[0]


def _entry_device(entry: Any, name: str) -> torch.device:
    """The device a map entry names; a clear error for offloaded modules and GPUs this machine lacks."""
    if isinstance(entry, str) and entry in ("disk", "meta"):
        raise ValueError(f"The device map offloads {name} to '{entry}'; FastDecoder needs every weight on a device "
                         "(use generate(), or a map that fits: glmkit.placement.kv_aware_device_map).")
    device = torch.device("cuda", entry) if isinstance(entry, int) else torch.device(entry)
    if device.type == "cuda":
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= have:
            raise ValueError(f"The device map puts {name} on {device}, but this machine has {have} GPU"
                             f"{'s' if have != 1 else ''}: load the model with a map of the GPUs that are here.")
    return device


def _weights_device(module: torch.nn.Module, name: str, entry: Any) -> torch.device:
    devices = {p.device for p in module.parameters()}
    if any(d.type == "meta" for d in devices):
        raise ValueError(f"{name} is offloaded (its weights are loaded on demand, device map entry {entry!r}); "
                         "FastDecoder needs every weight on a device: use a map that fits "
                         "(glmkit.placement.kv_aware_device_map) or generate().")
    if len(devices) != 1:
        raise ValueError(f"{name} has weights on {sorted(map(str, devices))}; FastDecoder needs each of the embeddings, "
                         "each decoder layer and lm_head on one device.")
    return devices.pop()


def layer_segments(model: torch.nn.Module) -> list[Segment]:
    """The segments ``FastDecoder`` runs a (possibly split) GLM model as: runs of consecutive modules (embeddings,
    decoder layers, ``lm_head``) with the same device-map entry. A model on one device is one segment.

    Raises a clear error for a map that leaves a module unplaced, offloads one (``"cpu"`` beside GPUs, ``"disk"``),
    or names a GPU that is not there.

    >>> from glmkit.loading import load_model
    >>> [(s.device.type, len(s.layers)) for s in layer_segments(load_model(device_map="cpu"))]
    [('cpu', 6)]
    """
    layers = model.model.layers
    names = ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(len(layers))] + ["lm_head"]
    modules = [model.get_input_embeddings(), *layers, model.get_output_embeddings()]
    device_map = getattr(model, "hf_device_map", None) or {}
    if device_map:
        check_device_map(model, device_map)  # unplaced or unknown modules: an error that names the fix
    items = []  # (entry, device) per name
    for name, module in zip(names, modules):
        if not device_map:
            weights = _weights_device(module, name, None)
            items.append((str(weights), weights))
            continue
        found, entry = _map_entry(device_map, name)
        if not found:
            raise ValueError(f"{name} is not in the model's device map: every decoder layer needs a device "
                             "(glmkit.device_map.check_device_map says which are missing).")
        device = _entry_device(entry, name)
        weights = _weights_device(module, name, entry)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if weights != device:
            raise ValueError(f"The device map puts {name} on {device}, but its weights are on {weights}: load the model "
                             "with that map (glmkit.loading.load_model(device_map=...)).")
        items.append((entry, weights))
    segments: list[Segment] = []
    start = 0
    for i in range(1, len(items) + 1):
        if i < len(items) and _entry_key(items[i][0]) == _entry_key(items[start][0]):
            continue
        first, last = start, i - 1  # positions in names: 0 = embeddings, 1..n = layers, n + 1 = lm_head
        layer_range = range(max(first, 1) - 1, min(last, len(layers)))
        segments.append(Segment(items[start][0], items[start][1], layer_range, first == 0, last == len(items) - 1))
        start = i
    return segments


def raise_recompile_limit() -> None:
    """Let one process hold ``RECOMPILE_LIMIT`` compiled shapes of a function. Every decoder compiles the same layer
    function for its own shapes (batch, cache length), and dynamo counts them all against one limit (8 by default;
    fullgraph turns the 9th into an error): a notebook session that tries many settings would hit it. Each shape
    compiles once and is reused."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, RECOMPILE_LIMIT)


def smallest_bucket(buckets: Sequence[int], k: int) -> int:
    """The step size that decodes ``k`` live rows: the smallest of ``buckets`` (sorted, from ``bucket_sizes``) >= k.

    >>> smallest_bucket([1, 2, 4, 6], 3)
    4
    """
    if not 1 <= k <= buckets[-1]:
        raise ValueError(f"A step decodes 1 to batch_size={buckets[-1]} rows, got {k} tokens.")
    return next(b for b in buckets if b >= k)


def check_step(buckets: Sequence[int], tokens: torch.Tensor, pos: int | torch.Tensor) -> tuple[int, int]:
    """``(k, step size)`` for a decode step of ``tokens`` ``[k]`` at ``pos`` (one int for all rows, or one per
    token), checked before anything runs; else ``ValueError`` saying what to change.

    >>> check_step([1, 2, 4], torch.tensor([5, 6, 7]), torch.tensor([9, 9, 9]))
    (3, 4)
    """
    k = tokens.numel()
    b = smallest_bucket(buckets, k)
    if isinstance(pos, torch.Tensor) and pos.numel() != k:
        raise ValueError(f"decode_step got {k} tokens and {pos.numel()} positions: give one position per "
                         "token (rows 0..k-1), or one int for all.")
    return k, b


def bucket_sizes(batch_size: int, graph_batch_sizes: Sequence[int] | None = None) -> list[int]:
    """Batch sizes a decoder captures a step for: ``graph_batch_sizes`` (default 1, 2, 4, ... below
    ``batch_size``), always with ``batch_size`` itself; a step for k rows runs the smallest one >= k.

    >>> bucket_sizes(12), bucket_sizes(8, [1, 8])
    ([1, 2, 4, 8, 12], [1, 8])
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if graph_batch_sizes is None:
        sizes = {1 << i for i in range(batch_size.bit_length()) if 1 << i < batch_size}
    else:
        sizes = set(graph_batch_sizes)
        bad = [b for b in sizes if not isinstance(b, int) or not 1 <= b <= batch_size]
        if bad:
            raise ValueError(f"graph_batch_sizes must be whole numbers from 1 to batch_size={batch_size}; got {bad}.")
    return sorted(sizes | {batch_size})


SPAN_STEP = 4  # each cache span 4x the one before


def spans_for(max_len: int) -> list[int]:
    """Cache lengths a decoder with ``cache_spans`` captures its batch-1 step for: from
    ``glmkit.attention.ONE_SPLIT_MAX`` (the longest cache one program a KV head attends to whole), each
    ``SPAN_STEP`` times the one before, below ``max_len``, then ``max_len``; a step replays the shortest that holds
    its position.

    >>> spans_for(300), spans_for(8192), spans_for(131072)
    ([300], [512, 2048, 8192], [512, 2048, 8192, 32768, 131072])
    """
    spans, n = [], ONE_SPLIT_MAX
    while n < max_len:
        spans.append(n)
        n *= SPAN_STEP
    return [*spans, max_len]


@dataclass
class Fallback:
    """A kernel of glmkit's that a decoder chose itself (``"auto"``) and can do without where it fails to build or
    run: ``use(True)`` switches the decoder to the replacement, ``use(False)`` back (``warm_up_or_fall_back``)."""

    what: str  # what may fail, in the user's words: "glmkit's Triton decode attention"
    instead: str  # what runs in its place, and the setting that asks for it: "attention='sdpa'"
    use: Callable[[bool], None]


def attention_fallback(decoder: Any) -> list[Fallback]:
    """``[Fallback]`` to ``attention="sdpa"`` for a decoder (``FastDecoder``, ``TPDecoder``) whose
    ``attention="auto"`` chose glmkit's Triton kernel; ``[]`` otherwise (an explicit choice is kept, and raises).

    >>> class Decoder:
    ...     auto_attention, attention = True, "triton"
    >>> decoder = Decoder()
    >>> [f.instead for f in attention_fallback(decoder)]
    ["attention='sdpa'"]
    >>> attention_fallback(decoder)[0].use(True); decoder.attention
    'sdpa'
    """
    if not (decoder.auto_attention and decoder.attention == "triton"):
        return []

    def use(on: bool) -> None:
        decoder.attention = "sdpa" if on else "triton"

    return [Fallback("glmkit's Triton decode attention", "attention='sdpa'", use)]


def pdl_fallback(decoder: Any) -> list[Fallback]:
    """``[Fallback]`` to plain launches for a decoder (``FastDecoder``, ``TPDecoder``) that chose programmatic
    dependent launch itself (``pdl=None`` on a GPU that has it); ``[]`` otherwise.

    >>> class Decoder:
    ...     auto_pdl, pdl = True, True
    >>> decoder = Decoder()
    >>> [f.instead for f in pdl_fallback(decoder)]
    ['plain launches (pdl=False)']
    >>> pdl_fallback(decoder)[0].use(True); decoder.pdl
    False
    """
    if not (decoder.auto_pdl and decoder.pdl):
        return []

    def use(on: bool) -> None:
        decoder.pdl = not on

    return [Fallback("programmatic dependent launch", "plain launches (pdl=False)", use)]


def _error(fn: Callable[[], None]) -> Exception | None:
    """What ``fn()`` raised, or ``None``."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - told apart by the caller, raised again if no fallback helps
        return exc
    return None


def warm_up_or_fall_back(warm_up: Callable[[], None], fallbacks: Sequence[Fallback], decoder: str,
                         failed_anywhere: Callable[[bool], bool] = bool) -> None:
    """Run ``warm_up()``; if it fails, find which of ``fallbacks`` it needs, switch to it and warn naming what failed
    and what runs instead (``FastDecoder`` and ``TPDecoder``'s first step, ``notebooks/05_tuning.ipynb``).

    Which kernel failed is found by trying, not guessed from the error: each fallback alone first (the kernel whose
    replacement makes the warm-up pass is the one that failed), then all together (several failed). If none helps,
    the failure is not one of those kernels: the first error is raised, the choices left as they were.
    ``failed_anywhere(failed)``: whether this attempt failed in any process (``TPDecoder``: an all-reduce of the flag,
    so that every rank falls back alike, even when one rank alone failed); by default, in this one.

    >>> import warnings
    >>> kernels = {"attention": "triton", "gemv": "triton"}
    >>> def warm_up():  # the GEMVs fail: trying attention alone does not help, trying the GEMVs alone does
    ...     if kernels["gemv"] == "triton":
    ...         raise RuntimeError("no kernel image is available")
    >>> fallbacks = [Fallback(f"glmkit's Triton {name}", f"{name}=False", lambda on, name=name:
    ...                       kernels.update({name: False if on else "triton"})) for name in kernels]
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warm_up_or_fall_back(warm_up, fallbacks, "FastDecoder")
    >>> kernels
    {'attention': 'triton', 'gemv': False}
    >>> print(caught[0].message)
    glmkit's Triton gemv failed here (RuntimeError: no kernel image is available); FastDecoder uses gemv=False instead.
    """
    first = _error(warm_up)
    if not failed_anywhere(first is not None):
        return
    tries = [[f] for f in fallbacks] + ([list(fallbacks)] if len(fallbacks) > 1 else [])
    for chosen in tries:
        for f in chosen:
            f.use(True)
        if not failed_anywhere(_error(warm_up) is not None):
            where = f"here ({type(first).__name__}: {str(first)[:200]})" if first is not None else "in another process"
            warnings.warn(f"{' and '.join(f.what for f in chosen)} failed {where}; {decoder} uses "
                          f"{' and '.join(f.instead for f in chosen)} instead.", RuntimeWarning, stacklevel=4)
            return
        for f in chosen:
            f.use(False)
    if first is None:
        raise RuntimeError(f"{decoder}'s warm-up failed in another process (its error says why); this one stops too.")
    raise first


class _Stage:
    """A segment's share of the decoder: its layers' fused weights, its slice of the static KV cache, and the
    static buffers its step reads and writes (its CUDA graphs replay on them)."""

    def __init__(self, segment: Segment, weights: list[tuple], batch_size: int, max_len: int, kv_heads: int,
                 head_dim: int, hidden: int, vocab: int, dtype: torch.dtype, cos: torch.Tensor,
                 sin: torch.Tensor) -> None:
        dev = self.device = segment.device
        self.segment, self.weights = segment, weights
        shape = (len(segment.layers), batch_size, kv_heads, max_len, head_dim)
        self.k_cache = torch.zeros(shape, device=dev, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=dev, dtype=dtype)
        self.cos, self.sin = cos.to(dev), sin.to(dev)
        self.positions = torch.arange(max_len, device=dev)
        self.batch_index = torch.arange(batch_size, device=dev)
        # control: row 0 the tokens, row 1 the positions, row 2 the number of live rows k (in every column);
        # the first stage's is written by decode_step, the others copy it (one small copy per hop); the head stage's
        # step writes its rows 0-1 for the next step too (the greedy pick, glmkit.greedy: decode_greedy)
        self.control = torch.zeros(3, batch_size, dtype=torch.long, device=dev)
        # glmkit's attention kernel's tickets (decode_attention): zeros it leaves as it finds them, for all layers;
        # and the greedy pick's (greedy_next), one per row
        self.tickets = torch.zeros(batch_size * kv_heads, dtype=torch.int32, device=dev)
        self.greedy_tickets = torch.zeros(batch_size, dtype=torch.int32, device=dev)
        # glmkit's one-kernel MLP's h, grid-barrier counter and row split (glmkit.mlp16_one), where it may run here
        wd = weights[0][5] if weights else None
        self.mlp_workspace = mlp16_one.Workspace(dev, hidden, wd.shape[1], dtype) \
            if isinstance(wd, torch.Tensor) and mlp16_one.usable_on(dev, dtype, hidden, wd.shape[1]) else None
        # the hidden state in and out: x (residual stream) and h (x normalised for the next layer) [batch, 1, hidden]
        self.x_in, self.h_in, self.x_out, self.h_out = (
            torch.zeros(batch_size, 1, hidden, device=dev, dtype=dtype) for _ in range(4))
        self.logits = torch.zeros(batch_size, vocab, device=dev, dtype=torch.float32) if segment.head else None
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # by step size and cache span
        self.staging: list[torch.Tensor] | None = None  # pinned host buffers of a hop through host memory
        # the norms glmkit's fused Triton GEMVs apply (FastDecoder.fuses_norms): each layer's input norm, and the
        # final norm before lm_head; set by FastDecoder
        self.in_norms: list[torch.Tensor] = []
        self.final_norm: torch.Tensor | None = None


class FastDecoder:
    """Static-cache decoder for a loaded GLM model on one device or split over several by a device map.

    On a split (``split_layers(..., [20, 20])``, ``kv_aware_device_map``, ``device_map="auto"``) each segment of the
    map (``layer_segments``) keeps its layers' fused weights and its layers' slice of the static KV cache on its own
    device and runs its share of a step as its own CUDA graph; only the hidden state ``[batch, hidden]`` crosses
    between devices. A short prompt goes through the decoder's own weights (``prefill_layer``), a long one through the
    model itself (``chunked_prefill``, memory-lean); both write straight into the static cache.

    Steps are captured for a few batch sizes (``graph_batch_sizes``): ``decode_step`` with k tokens runs the
    smallest size >= k, so a server decodes any number of live rows without a decoder per batch size.

    Args:
        model: a ``GlmForCausalLM`` in bf16/fp16/fp32 or bitsandbytes nf4/fp4 (± double quantization: its packed
            weights are read in place by ``glmkit.gemv4bit``'s kernels, no copy), on one device or dispatched by a
            device map (nothing offloaded). int8 is refused (``glmkit.gemv4bit.unsupported_quantization``).
        max_len: prompt + new tokens the static cache holds per row.
        batch_size: rows of the static cache (sequences decoded together).
        cuda_graph: capture each segment's step as a CUDA graph, per batch size (default: on a GPU).
        compile: ``torch.compile`` the layer function; fuses norms, RoPE and SiLU. Default: on a GPU, except on the
            batch-1 Triton step (``fuses_norms``), whose layer is glmkit's kernels alone: there the compiled layer
            launches the same kernels and on an H200 decoded 202.9 tok/s against 205.1 uncompiled
            (``benchmarks/results/pdl_decode.json``), and ``pdl`` needs Triton's own launches; in 4 bits that
            uncompiled step, its norms and adds folded into the GEMVs, took 3.2% less time than the compiled layer
            (``nf4_fused.json``; 7.5% less through the batch-1 CUDA kernel, ``nf4_one_step.json``); and except on
            a 4-bit step through bitsandbytes' kernel (eager). A 4-bit decoder with several rows compiles each step
            size through glmkit's 4-bit kernels (a few seconds more to build per size).
        gemv: how each projection is computed. ``"auto"`` (default, ``auto_gemv``): ``"triton"`` for the batch-1
            step on a GPU of compute capability 8.0+ with Triton, else cuBLAS; if the kernels fail to build there, a
            warning and cuBLAS; a 4-bit model: glmkit's 4-bit Triton GEMVs for steps of up to
            ``FOUR_BIT_MAX_BATCH`` rows (PyTorch ops the compiled layer calls, ``torch.ops.glmkit.gemv_4bit*``; on
            an H200 at batch 1 279.3 tok/s against 145.3 with bitsandbytes' own kernel,
            ``benchmarks/results/nf4_gemv.json``; should the layer not compile, a warning and eager layers),
            (above ``ROW_KERNEL_MAX_VECTORS`` rows the tensor-core kernel, ``notebooks/04_quantization.ipynb``),
            bitsandbytes' dequantize-then-GEMM above (in eager layers unless ``compile=True``).
            ``"triton"``: glmkit's kernels for one token (``glmkit.gemv``: one pass over each
            weight, no split-K, SwiGLU applied before the write; batch_size 1 only, a 4-bit model up to
            ``glmkit.gemv4bit.MAX_VECTORS`` rows, 16-bit weights then through cuBLAS); on an H100 they decode GLM-4-9B
            12% faster than cuBLAS (150.3 vs 133.7 tok/s, benchmarks/results/decode.json); a bf16 batch-1 step on a
            short cache takes q/k/v and o_proj through glmkit's 16-bit CUDA kernel instead (``gemv16_sms_left``,
            ``glmkit.gemv16_one``), and a bf16/fp16 batch-1 step on Hopper its whole MLP through one CUDA kernel
            (``mlp16_takes``, ``glmkit.mlp16_one``). ``False``: cuBLAS
            (``F.linear``). ``True``: a multiply-and-sum that the compiler turns into one reduction kernel (-11% to
            +3.5% against cuBLAS).
        compile_options: extra ``torch.compile`` arguments, e.g. ``{"mode": "max-autotune-no-cudagraphs"}`` (the
            decoder captures its own graph). On H100s max-autotune was -0.7% to +3.4% against the default, run to run
            (benchmarks/results/decode_variants.json, decode.json), and autotuning added 11-18 s to building a decoder, so the
            default is the plain compile.
        attention: how a decode step attends. ``"auto"`` (default, ``glmkit.attention.auto_attention``): ``"triton"``
            on a GPU where glmkit's Triton kernels run, at every batch size (if it fails to build there, a warning
            and ``"sdpa"``), else ``"sdpa"``. ``"triton"``: ``glmkit.attention.decode_attention``, one kernel for
            the rotary embedding, the K/V write and attention, each K/V tile read once for all the query heads that
            share it (GLM-4-9B: 16), split over programs on long caches. ``"sdpa"``: rope and the cache write as
            compiled ops, then PyTorch's fused kernel (cuDNN on an H100: 4.3 µs a layer at 32 cached tokens,
            profile_step.json). ``"reduction"``: multiply-and-sum the compiler fuses (meant for the compiled path: run
            eagerly it builds a [b, heads, cache, head_dim] temporary); on an H100 slower than sdpa: -1.8% with a
            288-token cache, -15% with 2048 (decode_variants.json).
        graph_batch_sizes: the step sizes to capture (default 1, 2, 4, ... and ``batch_size``; ``bucket_sizes``).
        hop: how the hidden state crosses from one segment's device to the next on a split. ``"peer"`` (default):
            a device-to-device copy (NVLink or PCIe peer-to-peer). ``"host"``: staged through pinned host memory,
            each half waited for, as it goes between cards that have no peer-to-peer access (two consumer cards on
            PCIe often have none); notebook 02 compares the two.
        fuse_norms: on the Triton batch-1 step (``fuses_norms``), the GEMVs apply the RMSNorms and the residual
            adds as they read and write (``glmkit.gemv.gemv``'s ``norm_weight`` and ``residual``; 4 bits:
            ``glmkit.gemv4bit.gemv_4bit_normed`` and ``gemv_4bit_residual``): two kernels fewer per layer. ``False``
            keeps the norms as compiled kernels of their own (16/32-bit: the residual adds stay in o_proj's and
            down_proj's GEMVs; to compare: ``benchmarks/profile_step.py``, ``benchmarks/decode.py``,
            ``benchmarks/nf4_fused.py``).
        pdl: capture the uncompiled batch-1 Triton step with programmatic dependent launch
            (``glmkit.gemv.dependent_launches``: each kernel launches while the one before finishes). Default: where
            every device supports it (``glmkit.gemv.pdl_supported``: compute capability 9.0+); if it fails there,
            a warning and plain launches. A 4-bit model: its one-row step, where glmkit's batch-1 CUDA 4-bit kernel
            runs on every device and reads every weight (``glmkit.gemv4bit_one``: blocksize 64, no double
            quantization; each launch fetches its first weights and writes its lookup table while the kernel before
            ends; GLM-4-9B's step took 16% less time with it on an H200, ``benchmarks/results/nf4_one_step.json``),
            else off unless ``pdl=True`` (through the Triton 4-bit kernels the step took 1.8% more time with it,
            ``nf4_fused.json``).
        cache_spans: capture the batch-1 step on glmkit's decode attention once for each of ``spans_for(max_len)``
            (512, 2048, 8192, ... positions and max_len) and replay, at each position, the graph of the shortest
            span that holds it: its attention is launched for that span, not the whole cache (the launch is chosen
            from the cache length, and one graph for a long cache decodes a short context slower). On by
            default: on an H200, GLM-4-9B in nf4 built for 520-8192 positions decoded the same short chat 8-13%
            faster with spans than with one graph for the whole cache, and bf16 from 0.7% slower to 2.1% faster;
            with spans both stayed within 5% of their best at every cache length from 168 to 32768
            (``benchmarks/results/max_len_spans.json``, notebook 05). ``False``: one graph for the whole cache.
    """

    def __init__(self, model: torch.nn.Module, max_len: int = 2048, batch_size: int = 1,
                 cuda_graph: bool | None = None, compile: bool | None = None, gemv: bool | str = "auto",
                 compile_options: dict[str, Any] | None = None, attention: str = "auto",
                 graph_batch_sizes: Sequence[int] | None = None, hop: str = "peer",
                 fuse_norms: bool = True, pdl: bool | None = None, cache_spans: bool = True) -> None:
        self.check(model)
        if hop not in HOPS:
            raise ValueError(f"hop must be one of {HOPS} (device to device, or through host memory), not {hop!r}.")
        self.hop = hop
        self.fuse_norms = fuse_norms
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be 'auto', 'triton', 'sdpa' or 'reduction', not {attention!r}.")
        if attention == "triton" and not triton_available():
            raise RuntimeError("attention='triton' needs Triton and a GPU (or TRITON_INTERPRET=1 on a CPU); "
                               "use attention='sdpa'.")
        if gemv not in ("auto", False, True, "triton"):
            raise ValueError(f"gemv must be 'auto', 'triton', False (cuBLAS) or True (compiled reductions), not {gemv!r}.")
        quantized = any(is_4bit(p) for p in model.parameters())
        if gemv == "triton" and batch_size > (MAX_VECTORS if quantized else 1):
            raise ValueError(f"gemv='triton' decodes one sequence (batch_size=1; a 4-bit model: up to {MAX_VECTORS}), "
                             f"got batch_size={batch_size}; at larger batches cuBLAS (gemv=False) is the fast path "
                             "(gemv='auto' uses the Triton kernels for the batch-1 step, a 4-bit model's up to "
                             f"{FOUR_BIT_MAX_BATCH} rows, and cuBLAS or bitsandbytes above).")
        if gemv == "triton" and not triton_available():
            raise RuntimeError("gemv='triton' needs Triton and a GPU (or TRITON_INTERPRET=1 on a CPU); "
                               "use gemv=False for cuBLAS.")
        self.segments = layer_segments(model)
        self.buckets = bucket_sizes(batch_size, graph_batch_sizes)
        dtype = model.get_input_embeddings().weight.dtype
        self.quantized = quantized
        self.auto_gemv = gemv == "auto"
        # per step size: 16-bit Triton GEMVs only for one token (a 4-bit model's kernels up to MAX_VECTORS rows), and
        # under "auto" only where every segment's GPU runs them.
        # 4-bit under "auto": glmkit's 4-bit kernels (custom ops that the compiled layer calls as they are) for steps
        # of up to FOUR_BIT_MAX_BATCH rows, bitsandbytes' dequantize-then-GEMM above (benchmarks/results/nf4_batch.json)
        self.gemv_by_bucket: dict[int, bool | str] = {
            b: (("triton" if all(auto_gemv(s.device, b, dtype, quantized) == "triton" for s in self.segments)
                 else False) if gemv == "auto" else gemv) for b in self.buckets}
        self.auto_attention = attention == "auto"
        self.attention = (("triton" if all(auto_attention(s.device, dtype) == "triton" for s in self.segments)
                           else "sdpa") if self.auto_attention else attention)
        cfg = model.config
        self.model = model
        self.device = model.get_input_embeddings().weight.device  # where the inputs go
        self.devices = list(dict.fromkeys(s.device for s in self.segments))
        self.dtype = model.get_input_embeddings().weight.dtype
        on_gpu = all(d.type == "cuda" for d in self.devices)
        self.use_graph = on_gpu if cuda_graph is None else cuda_graph
        # 4-bit: compiled where a step runs glmkit's 4-bit ops (which compile calls as they are); steps through
        # bitsandbytes' own kernel (gemv=False) keep eager layers unless compile=True (layer_fn_for): not measured
        # compiled
        glmkit_4bit = any(g == "triton" for g in self.gemv_by_bucket.values())
        self.compiled = (on_gpu and (glmkit_4bit or not self.quantized)) if compile is None else compile
        self.compile_auto = compile is None
        # (4 bits: on where the batch-1 CUDA kernel runs on every device, nf4_one_step.json; through the Triton 4-bit
        # kernels off unless asked for: that step decoded 1.8% slower with it on an H200, nf4_fused.json)
        one_kernel = all(gemv4bit_one.runs_on(d, dtype) for d in self.devices) and \
            all(gemv4bit_one.reads_state(p.quant_state) for p in model.parameters() if is_4bit(p))
        self.pdl = choose_pdl(pdl, self.devices) and not (pdl is None and quantized and not one_kernel)
        self.auto_pdl = pdl is None
        if on_gpu and "triton" in self.gemv_by_bucket.values():
            active_table()  # this card's launch shapes, read (and an untuned card named) before anything compiles
        self.max_len, self.batch_size = max_len, batch_size
        self.cache_spans = cache_spans
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = head_dim(cfg)
        self.eps = cfg.rms_norm_eps
        cos, sin = rotary_tables(model, max_len)
        self.head_weight = _projection_weight(model.get_output_embeddings())  # 16-bit, or 4-bit read in place
        self.stages = [_Stage(s, self._gather_weights(s), batch_size, max_len, self.kv_heads, self.head_dim,
                              cfg.hidden_size, cfg.vocab_size, self.dtype, cos, sin) for s in self.segments]
        first, last = self.stages[0], self.stages[-1]
        self.first_norm = model.model.layers[0].input_layernorm.weight.to(first.device)  # after the embeddings
        for st in self.stages:  # the norms the fused GEMVs apply (fuses_norms): each layer's input norm, the final
            st.in_norms = [model.model.layers[i].input_layernorm.weight.to(st.device) for i in st.segment.layers]
            st.final_norm = model.model.norm.weight.to(st.device) if st.segment.head else None
        self.logits = last.logits  # [batch, vocab] fp32, on lm_head's device
        # per layer of the whole model, its K/V buffer [batch, kv_heads, max_len, head_dim] (prefill writes there)
        self.k_layers = [k for st in self.stages for k in st.k_cache]
        self.v_layers = [v for st in self.stages for v in st.v_cache]
        if self.compiled:
            raise_recompile_limit()
        self.layer_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = (
            torch.compile(decoder_layer, fullgraph=True, dynamic=False, **(compile_options or {}))
            if self.compiled else decoder_layer)
        self._pools: dict[torch.device, Any] = {}  # one CUDA graph memory pool per device, shared by its graphs
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # a capture stream per device
        self.ready = False  # the first prefill (or step) warms the steps up (compiles, captures) once
        self._captured_spans: dict[int, list[int]] = {}  # per step size, the spans its warm-up ran (span_for reads)
        self._greedy: tuple[int, int] | None = None  # decode_greedy's next step: (live rows, position), or none

    def rows(self) -> list[list[str]]:
        """Per segment: the map entry, the device, what it runs, and the memory the decoder adds there."""
        from glmkit.tables import gib

        out = []
        for st in self.stages:
            seg = st.segment
            runs = ([f"layers {seg.layers.start}..{seg.layers.stop - 1}"] if len(seg.layers) else [])
            runs = (["embeddings"] if seg.embed else []) + runs + (["lm_head"] if seg.head else [])
            # (a 4-bit model's q/k/v are read in place, three packed weights: no fused copy)
            fused = sum(w[0].numel() * w[0].element_size() for w in st.weights if isinstance(w[0], torch.Tensor))
            cache = st.k_cache.numel() * st.k_cache.element_size() * 2
            out.append([repr(seg.entry), str(st.device), ", ".join(runs), gib(fused), gib(cache)])
        return out

    def _headers(self) -> list[str]:
        return ["map entry", "device", "runs", "fused q/k/v copy", f"KV cache ({self.batch_size} x {self.max_len})"]

    def __repr__(self) -> str:
        from glmkit.tables import text_table

        return text_table(self._headers(), self.rows())

    def _repr_html_(self) -> str:
        from glmkit.tables import html_table

        return html_table(self._headers(), self.rows(), caption=f"FastDecoder: {len(self.stages)} segment(s), "
                          f"step sizes {self.buckets}")

    def layer_fn_for(self, b: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """The layer function of the step of ``b`` rows: uncompiled on the fused Triton step with glmkit's decode
        attention (its layer is glmkit's kernels alone) and on a 4-bit step through bitsandbytes' kernel unless
        ``compile=True`` was asked for, else ``layer_fn``."""
        alone = self.fuses_norms(b) and self.attention == "triton"
        bitsandbytes = self.quantized and self.gemv_by_bucket[b] != "triton"
        return decoder_layer if self.compile_auto and (alone or bitsandbytes) else self.layer_fn

    def spans(self, b: int) -> list[int]:
        """The cache lengths the step of ``b`` rows runs on (``cache_spans``): ``spans_for(max_len)`` for the
        uncompiled batch-1 step on glmkit's decode attention, else the whole cache."""
        if self.cache_spans and b == 1 and self.attention == "triton" and self.layer_fn_for(1) is decoder_layer:
            return spans_for(self.max_len)
        return [self.max_len]

    def span_for(self, b: int, reach: int) -> int:
        """The cache length the step of ``b`` rows runs on when its highest position is ``reach``: the shortest of
        ``spans(b)`` that holds it."""
        spans = self._captured_spans.get(b) or self.spans(b)  # (after the warm-up: its list, not rebuilt a step)
        return next((n for n in spans if reach < n), self.max_len)

    def uses_pdl(self, b: int) -> bool:
        """Whether the step of ``b`` rows launches glmkit's kernels with programmatic dependent launch (``pdl``, on
        the uncompiled Triton step only; a 4-bit model's one-row step only, the batch-1 CUDA kernel's)."""
        return self.pdl and self.gemv_by_bucket[b] == "triton" and self.layer_fn_for(b) is decoder_layer and \
            (b == 1 or not self.quantized)

    def fuses_norms(self, b: int) -> bool:
        """Whether the step of ``b`` rows runs glmkit's Triton GEMVs with the RMSNorms and the residual adds folded in
        (``decoder_layer``'s ``in_norm``): two kernels fewer per layer. 16/32-bit weights: the batch-1 step; 4-bit:
        the one-row step of an uncompiled layer (``glmkit.gemv4bit.gemv_4bit_normed``, ``gemv_4bit_residual``).
        ``notebooks/05_tuning.ipynb`` profiles the step both ways.

        >>> from glmkit.loading import load_model
        >>> model = load_model(device_map="cpu", dtype=torch.float32)
        >>> FastDecoder(model, max_len=16, gemv=False).fuses_norms(1)  # cuBLAS: the norms run as kernels of their own
        False
        >>> if triton_available():  # glmkit's GEMVs (a GPU, or TRITON_INTERPRET=1 on a CPU) apply them
        ...     assert FastDecoder(model, max_len=16, gemv="triton").fuses_norms(1)
        """
        if not (self.fuse_norms and self.gemv_by_bucket[b] == "triton"):
            return False
        # 4 bits: the one-row step (glmkit.gemv4bit_one's CUDA kernel on a GPU, the Triton per-row kernel elsewhere),
        # in an uncompiled layer (its fused launches are no ops that torch.compile can call: FastDecoder compiles the
        # layer of a step that does not fuse)
        return not self.quantized or (b == 1 and (not self.compiled or (self.compile_auto and self.attention == "triton")))

    @property
    def gemv(self) -> bool | str:
        """The projection kernels of the full-batch step (``gemv_by_bucket`` has them per step size)."""
        return self.gemv_by_bucket[self.batch_size]

    def _gather_weights(self, segment: Segment) -> list[tuple]:
        """Per layer of ``segment``: fused QKV weight and bias, o_proj, post-attention norm, gate_up, down, and the
        norm that follows the layer (the next layer's input norm, the final norm after the last layer), all on the
        segment's device (a norm that lives on the next device is copied: ``hidden`` numbers)."""
        layers, dev = self.model.model.layers, segment.device
        weights = []
        for i in segment.layers:
            layer = layers[i]
            a = layer.self_attn
            next_norm = layers[i + 1].input_layernorm.weight if i + 1 < len(layers) else self.model.model.norm.weight
            bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            weights.append((_projection_weight(a.q_proj, a.k_proj, a.v_proj), bias,
                            _projection_weight(a.o_proj), layer.post_attention_layernorm.weight,
                            _projection_weight(layer.mlp.gate_up_proj), _projection_weight(layer.mlp.down_proj),
                            next_norm.to(dev)))
        return weights

    @staticmethod
    def check(model: torch.nn.Module) -> None:
        """Raise a clear error unless ``model`` is a GLM in 16/32-bit or bitsandbytes nf4/fp4 with every weight on a
        device (what this decoder runs; a split by a device map is fine)."""
        layer = getattr(getattr(model, "model", None), "layers", [None])[0]
        needed = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
        if layer is None or not all(hasattr(layer, n) for n in needed) or not hasattr(layer.mlp, "gate_up_proj"):
            raise TypeError(f"FastDecoder is written for GLM models (GlmForCausalLM), not {type(model).__name__}.")
        reason = unsupported_quantization(model)
        if reason is not None:
            raise ValueError(reason)
        layer_segments(model)  # a split must place every module on a device that is here

    @torch.no_grad()
    def _run_stage(self, st: _Stage, b: int, span: int) -> None:
        """``_stage_step``, its kernels launched with programmatic dependent launch where ``uses_pdl``."""
        with dependent_launches(self.uses_pdl(b)):
            self._stage_step(st, b, span)

    def _stage_step(self, st: _Stage, b: int, span: int) -> None:
        """One token for rows 0..b-1 through one segment: reads its control and hidden-state buffers, writes its
        outputs (the hidden state, or the logits) and its cache rows. Rows k..b-1 (k = live rows) run a dummy
        token at position 0 whose K/V write is undone before the step ends: their cache rows are left as they were.
        The attention reads the cache's first ``span`` positions (``cache_spans``), which hold every row's position."""
        m = self.model
        live = st.batch_index[:b] < st.control[2, :b] if b > 1 else None  # a one-row step's row is always live
        tokens = st.control[0, :1] if live is None else torch.where(live, st.control[0, :b], 0)
        fused = self.fuses_norms(b)  # the GEMVs normalise their input themselves: h is x, never normalised apart
        if st.segment.embed:
            x = F.embedding(tokens[:, None], m.get_input_embeddings().weight)  # [b, 1, hidden]
            h = x if fused else rms_norm(x, self.first_norm, self.eps)
        else:
            x, h = st.x_in[:b], st.h_in[:b]
        if len(st.segment.layers):
            pos = st.control[1, :1] if live is None else torch.where(live, st.control[1, :b], 0)
            if self.attention == "triton":  # the tables: glmkit's kernel reads each row's position itself
                cos, sin = st.cos, st.sin
            else:
                cos, sin = st.cos[pos][:, None, None, :], st.sin[pos][:, None, None, :]
            # additive mask, built once per step for all layers: 0 up to each row's position, -inf after (glmkit's
            # decode attention reads the positions instead: no mask to build)
            mask = None
            if self.attention != "triton":
                mask = torch.zeros(b, 1, 1, self.max_len, dtype=self.dtype, device=st.device)
                mask = mask.masked_fill(st.positions[None, None, None, :] > pos[:, None, None, None], float("-inf"))
            if live is not None:  # the dummy rows' K/V at position 0, to put back
                k0, v0 = st.k_cache[:, :b, :, 0].clone(), st.v_cache[:, :b, :, 0].clone()
            gemv, layer_fn = self.gemv_by_bucket[b], self.layer_fn_for(b)
            for j, (wqkv, bqkv, wo, ln2, wgu, wd, next_norm) in enumerate(st.weights):
                x, h = layer_fn(x, h, pos, st.batch_index[:b], cos, sin, mask, wqkv, bqkv, wo, ln2, wgu, wd,
                                next_norm, st.k_cache[j, :b, :, :span], st.v_cache[j, :b, :, :span], self.eps,
                                self.heads, self.kv_heads, self.head_dim, gemv, self.attention,
                                st.in_norms[j] if fused else None, st.tickets, st.mlp_workspace)
            if live is not None:
                keep = live.view(1, b, 1, 1)
                st.k_cache[:, :b, :, 0] = torch.where(keep, st.k_cache[:, :b, :, 0], k0)
                st.v_cache[:, :b, :, 0] = torch.where(keep, st.v_cache[:, :b, :, 0], v0)
        if st.segment.head:
            # h: after the final norm; lm_head runs outside the compiled layer, so the reduction form (a
            # [vocab, hidden] fp32 temporary if run eagerly) is not used for it
            head = "triton" if self.gemv_by_bucket[b] == "triton" and b == 1 else False
            if fused:  # written into the fp32 logits as they are made (no copy kernel on the Triton path)
                norm_linear(x, st.final_norm, self.eps, self.head_weight, m.lm_head.bias, head, out=st.logits[:b])
            else:
                st.logits[:b].copy_(linear(h, self.head_weight, m.lm_head.bias, head)[:, -1].float())
            # each row's greedy token and next position into the control row: decode_greedy's next step reads them
            greedy_next(st.logits[:b], st.control, st.greedy_tickets, kernel=self.gemv_by_bucket[b] == "triton")
        else:
            st.x_out[:b].copy_(x)
            st.h_out[:b].copy_(x if fused else h)  # (fused: the next segment normalises x itself)

    def _capture(self, st: _Stage, b: int, span: int) -> None:
        with torch.cuda.device(st.device):  # the warm-up, the capture stream and the graph on the stage's GPU
            if st.device not in self._streams:
                self._streams[st.device] = torch.cuda.Stream()
            stream = self._streams[st.device]
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up: compiles, autotunes, allocates workspaces outside the graph
                    self._run_warm_up(st, b, span)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # the graphs of one device share a memory pool: they never run at the same time, and every output
            # goes to the stage's static buffers
            with torch.cuda.graph(graph, pool=self._pools.get(st.device), stream=stream):
                self._run_stage(st, b, span)
            self._pools.setdefault(st.device, graph.pool())
            st.graphs[b, span] = graph

    def _run_warm_up(self, st: _Stage, b: int, span: int) -> None:
        """A warm-up step: token 0 at position 0 (its garbage K/V go where a prefill writes first; the greedy pick
        of the step before had moved the position on)."""
        st.control[:2].zero_()
        self._run_eager(st, b, span)

    def _run_eager(self, st: _Stage, b: int, span: int) -> None:
        if st.device.type == "cuda":
            with torch.cuda.device(st.device):  # Triton launches on the current GPU: make it the stage's
                self._run_stage(st, b, span)
        else:
            self._run_stage(st, b, span)

    def _warm_up(self, b: int) -> None:
        self._captured_spans[b] = self.spans(b)
        for st in self.stages:
            for span in self._captured_spans[b]:
                self._capture(st, b, span) if self.use_graph else self._run_warm_up(st, b, span)

    def _warm_up_all(self) -> None:
        for st in self.stages:  # (graphs of an earlier attempt, with other kernels, go)
            st.graphs.clear()
        for b in sorted(self.buckets, reverse=True):
            self._warm_up(b)

    def _fallbacks(self) -> list[Fallback]:
        """What this decoder chose itself and can do without, should it fail here (``warm_up_or_fall_back``):
        programmatic dependent launch (``pdl=None``), glmkit's decode attention (``attention="auto"``), the compiled
        4-bit layer, glmkit's GEMVs (``gemv="auto"``)."""
        found = pdl_fallback(self) + attention_fallback(self)
        if self.quantized and self.compiled:  # 4 bits: a layer that does not compile runs eagerly (slower)
            compiled = self.layer_fn

            def eager(on: bool) -> None:
                self.compiled, self.layer_fn = (False, decoder_layer) if on else (True, compiled)

            found.append(Fallback("compiling the 4-bit decoder layer", "eager layers (compile=False)", eager))
        chosen = [b for b, g in self.gemv_by_bucket.items() if g == "triton"] if self.auto_gemv else []
        if chosen:
            def cublas(on: bool) -> None:
                self.gemv_by_bucket.update(dict.fromkeys(chosen, False if on else "triton"))

            instead = "bitsandbytes' matmul_4bit" if self.quantized else "cuBLAS"
            found.append(Fallback("glmkit's Triton GEMV kernels", f"{instead} (gemv=False)", cublas))
        return found

    def _first_step(self) -> None:
        """Run each step size once (compiling it) and capture its graphs, largest first; if a kernel that the decoder
        chose itself fails on this machine (``_fallbacks``), warn and use what replaces it; anything else raises
        (an explicit ``gemv="triton"`` or ``attention="triton"`` too). The warm-up writes garbage K/V at position 0:
        it runs before any prompt is in the cache."""
        warm_up_or_fall_back(self._warm_up_all, self._fallbacks(), "FastDecoder")
        self.ready = True

    def bucket(self, k: int) -> int:
        """The step size that decodes k live rows: the smallest captured size >= k."""
        return smallest_bucket(self.buckets, k)

    def prefill(self, input_ids: torch.Tensor, chunk: int | None = None, slot: int | None = None,
                start: int = 0) -> torch.Tensor:
        """Run the prompt through the decoder's own layers (short prompts: ``prefill_layer``) or the model (long ones,
        ``chunked_prefill``), in ``chunk``-token pieces if given; fill the static cache and return the logits of the
        last prompt position ``[b, vocab]``.

        ``slot``: fill only that row of the cache with one prompt ``[1, n]``, so that prompts of different lengths
        share a batch; then give ``decode_step`` a position per row. ``start``: the prompt continues one whose
        first ``start`` positions are already in the cache (an earlier ``prefill`` of the same row): its K/V go to
        positions ``start .. start + n - 1``. A server prefills a long prompt one piece per step this way.
        """
        b, n = check_prefill(input_ids, slot, start, self.batch_size, self.max_len)
        rows = slice(None) if slot is None else slice(slot, slot + 1)
        self._greedy = None
        if not self.ready:
            self._first_step()  # before the cache is filled: the warm-up steps write garbage K/V at position 0
        input_ids = input_ids.to(self.device)
        step = chunk or n
        if b * step * (start + n) <= OWN_PREFILL_MAX:  # short prompts: the decoder's own layers, no module overhead
            for at in range(0, n, step):
                logits = self._own_prefill(input_ids[:, at:at + step], rows, start + at)
            return logits
        # the prompt's K/V go straight into the static cache (each layer's on its own device): no second copy
        keys, values = [k[rows] for k in self.k_layers], [v[rows] for v in self.v_layers]
        cache = preallocated_cache(self.model.config, self.max_len, keys, values)
        if start:
            for layer, k, v in zip(cache.layers, keys, values):
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k[..., :start, :], v[..., :start, :]
        if n > 1:
            chunked_prefill(self.model, input_ids, step, cache=cache)
        with torch.inference_mode():
            out = self.model(input_ids[:, -1:], use_cache=True, logits_to_keep=1, **{cache_argument(self.model): cache})
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def _own_prefill(self, ids: torch.Tensor, rows: slice, start: int) -> torch.Tensor:
        """``ids`` ``[b, s]`` through the decoder's own weights (``prefill_layer``, eagerly: a short prompt costs a
        few hundred kernel launches instead of the model's ~100 ms of module calls on a GPU), their K/V into
        ``rows`` of the cache from position ``start``; the logits of the last token ``[b, vocab]``."""
        m, s = self.model, ids.shape[1]
        x = F.embedding(ids, m.get_input_embeddings().weight)
        h = rms_norm(x, self.first_norm, self.eps)
        for st in self.stages:
            x, h = x.to(st.device), h.to(st.device)
            positions = torch.arange(start, start + s, device=st.device)
            cos, sin = st.cos[positions][None, None], st.sin[positions][None, None]
            mask = st.positions[None, :start + s] <= positions[:, None]  # [s, start + s]: causal over the cache
            for j, (wqkv, bqkv, wo, ln2, wgu, wd, next_norm) in enumerate(st.weights):
                x, h = prefill_layer(x, h, positions, cos, sin, mask, wqkv, bqkv, wo, ln2, wgu, wd, next_norm,
                                     st.k_cache[j, rows], st.v_cache[j, rows], self.eps, self.heads, self.kv_heads,
                                     self.head_dim)
        return linear(h[:, -1:], self.head_weight, m.lm_head.bias, False)[:, -1].float()

    def decode_step(self, tokens: torch.Tensor, pos: int | torch.Tensor, reach: int | None = None) -> torch.Tensor:
        """Logits ``[k, vocab]`` for ``tokens`` ``[k]`` (rows 0..k-1, any 1 <= k <= batch_size) at position ``pos``
        (one for all rows, or ``[k]``); their K/V go into the cache. Runs the smallest captured step size >= k
        (``bucket``); the other rows of the cache are left as they were. The logits are a view of a static buffer
        on ``lm_head``'s device, valid until the next step (clone them to keep them). The step also picks each row's
        greedy token (``glmkit.greedy``), which ``decode_greedy`` decodes next. ``reach``: the highest of the rows'
        positions where ``pos`` is a tensor (it picks the cache span, ``cache_spans``; default: the whole cache)."""
        k, b = check_step(self.buckets, tokens, pos)
        if not self.ready:
            self._first_step()
        first = self.stages[0]
        first.control[0, :k].copy_(tokens.view(-1))
        if isinstance(pos, torch.Tensor):
            first.control[1, :k].copy_(pos.view(-1))
        else:
            first.control[1].fill_(pos)
        first.control[2].fill_(k)
        if reach is None:
            reach = self.max_len - 1 if isinstance(pos, torch.Tensor) else pos
        self._run_stages(b, self.span_for(b, reach))
        self._greedy = None if isinstance(pos, torch.Tensor) else (k, pos + 1)
        return self.logits[:k]

    def decode_greedy(self) -> torch.Tensor:
        """Greedy decoding's next step: decode the tokens the step before picked (each row's argmax, which that step
        wrote into the control row itself) at the next position, and return the tokens this step picks ``[k]`` (a
        new tensor). Nothing runs between the two steps' CUDA graphs but that copy: on an H200 GLM-4-9B's greedy loop
        decodes 1.3% faster in nf4 and 0.3% in bf16 than ``decode_step`` + argmax (``benchmarks/results/
        greedy_tail.json``; ``glmkit.greedy``, ``notebooks/05_tuning.ipynb``).
        Continues ``decode_step`` with one position for all rows (an int), or the ``decode_greedy`` before.

        >>> from glmkit.loading import load_model
        >>> model = load_model(device_map="cpu", dtype=torch.float32)
        >>> decoder, ids = FastDecoder(model, max_len=8), torch.tensor([[1, 2, 3]])
        >>> first = decoder.prefill(ids).argmax(-1)
        >>> second = decoder.decode_step(first, 3).argmax(-1)
        >>> new = torch.stack([first, second, decoder.decode_greedy()], dim=1)
        >>> torch.equal(new, model.generate(ids, max_new_tokens=3, min_new_tokens=3)[:, 3:])
        True
        """
        if self._greedy is None:
            raise RuntimeError("decode_greedy continues greedy decoding: call decode_step(tokens, pos) with one "
                               "position for all rows (an int) first, after each prefill.")
        k, pos = self._greedy
        if pos >= self.max_len:
            raise ValueError(f"decode_greedy would decode position {pos}, past max_len={self.max_len}: make the "
                             f"decoder with a larger max_len.")
        b, first, head = self.bucket(k), self.stages[0], self.stages[-1]
        if first is not head:  # a split: the picked tokens and positions go back to the first device
            picked = head.control[:2, :b]
            first.control[:2, :b].copy_(picked.cpu() if self.hop == "host" else picked)
        self._run_stages(b, self.span_for(b, pos))
        self._greedy = (k, pos + 1)
        return head.control[0, :k].to(self.device, copy=True)  # (on a split: lm_head's device to the inputs')

    def _run_stages(self, b: int, span: int) -> None:
        """The step of ``b`` rows on the first stage's control row over the cache's first ``span`` positions: each
        stage's graph (or eager step) in turn."""
        previous = None
        for st in self.stages:
            if previous is not None:  # the hop: the control row and the hidden state [b, 1, hidden], nothing more
                self._hand_over(self.stages[0].control, previous, st, b)
            if (b, span) in st.graphs:
                with torch.cuda.device(st.device):
                    st.graphs[b, span].replay()
            else:
                self._run_eager(st, b, span)
            previous = st

    def _hand_over(self, control: torch.Tensor, previous: _Stage, st: _Stage, b: int) -> None:
        """Copy the control rows and the hidden state of ``b`` rows from ``previous``'s outputs to ``st``'s inputs."""
        pairs = [(control, st.control), (previous.x_out[:b], st.x_in[:b]), (previous.h_out[:b], st.h_in[:b])]
        if self.hop == "peer":
            for src, dst in pairs:
                dst.copy_(src)
            return
        if st.staging is None:  # pinned host twins of the three buffers, made on the first host hop
            pin = st.device.type == "cuda"
            st.staging = [torch.empty_like(buf, device="cpu", pin_memory=pin) for buf in (st.control, st.x_in, st.h_in)]
        for (src, dst), host in zip(pairs, st.staging):
            n = src.shape[0]
            host[:n].copy_(src)  # device -> host: waits for the copy (and the step before it)
            dst.copy_(host[:n])  # host -> device: waits too

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, eos_token_ids: list[int] | None = None, ignore_eos: bool = False,
               prefill_chunk: int | None = None, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token ``[b]`` for each step (greedy at temperature 0, else sampled with top-p)."""
        eos = torch.tensor(eos_token_ids or model_eos(self.model), device=self.device)
        yield from decode_tokens(self, input_ids, max_new_tokens, temperature, top_p, generator, eos, ignore_eos,
                                 prefill_chunk)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 128, **kwargs: Any) -> torch.Tensor:
        """Prompt + new tokens ``[b, n + new]`` (stops early when every sequence said an end token)."""
        new = list(self.stream(input_ids, max_new_tokens, **kwargs))
        return torch.cat([input_ids.to(self.device), torch.stack(new, dim=1)], dim=1)

    def tokens_per_second(self, prompt_len: int = 32, new_tokens: int = 256) -> dict[str, float]:
        """Decode speed on random prompt ids after a warm-up (compile and graph capture excluded): see
        ``decode_speed``."""
        return decode_speed(self, prompt_len, new_tokens)


def decode_tokens(decoder: Any, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
                  generator: torch.Generator | None, eos: torch.Tensor, ignore_eos: bool,
                  prefill_chunk: int | None) -> Iterator[torch.Tensor]:
    """The decoders' ``stream`` (``FastDecoder``, ``TPDecoder``): ``decoder.prefill`` the prompts ``[b, n]``, then
    yield the next token ``[b]`` per step (greedy at temperature 0, else sampled with top-p from ``generator``) and
    decode it at the next position, until ``max_new_tokens`` or, unless ``ignore_eos``, until every row has said
    one of ``eos`` (ids ``[e]``; none: never). Each token's step is queued before the token is yielded, so the GPU
    does not wait for the caller (a stop at an end token has decoded that token too: its K/V are in the cache at its
    position, where the next prefill or step writes). Greedy on a ``FastDecoder``: the step picks the next token
    itself (``decode_greedy``).

    >>> from glmkit.loading import load_model
    >>> model, ids = load_model(device_map="cpu", dtype=torch.float32), torch.tensor([[1, 2, 3]])
    >>> new = decode_tokens(FastDecoder(model, max_len=8), ids, 2, 0.0, 1.0, None, torch.tensor([]), True, None)
    >>> torch.equal(torch.stack(list(new), dim=1), model.generate(ids, max_new_tokens=2, min_new_tokens=2)[:, 3:])
    True
    """
    n = input_ids.shape[1]
    if n + max_new_tokens > decoder.max_len:
        raise ValueError(f"{n} prompt + {max_new_tokens} new tokens exceed max_len={decoder.max_len}.")
    greedy = temperature <= 0 and hasattr(decoder, "decode_greedy")  # the step picks the next token itself
    token = pick_token(decoder.prefill(input_ids, prefill_chunk), temperature, top_p, generator).to(decoder.device)
    check = EndCheck(token.shape[0], decoder.device) if not ignore_eos and eos.numel() else None
    for i in range(max_new_tokens):
        if check:  # asked for now, before the next step is queued: its answer waits for this token only
            check.ask(token, eos)
        following = None
        if i + 1 < max_new_tokens:  # the next step is queued before this token is looked at: the GPU keeps busy
            if greedy and i:
                following = decoder.decode_greedy()  # (on the inputs' device)
            else:
                logits = decoder.decode_step(token, n + i)
                following = pick_token(logits, temperature, top_p, generator).to(decoder.device)
        yield token
        if (check and check.all_done()) or following is None:
            return
        token = following


class EndCheck:
    """Whether every row has said an end token, asked on the device as each token is made and read on the host
    later without waiting for what was queued after the question (``decode_tokens``: the next step).

    >>> check = EndCheck(2, torch.device("cpu"))
    >>> check.ask(torch.tensor([5, 2]), torch.tensor([2])); check.all_done()
    False
    >>> check.ask(torch.tensor([2, 7]), torch.tensor([2])); check.all_done()
    True
    """

    def __init__(self, rows: int, device: torch.device) -> None:
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        cuda = device.type == "cuda"
        self.answer = torch.zeros((), dtype=torch.bool, pin_memory=cuda)  # host memory the device writes into
        self.ready = torch.cuda.Event() if cuda else None

    def ask(self, token: torch.Tensor, eos: torch.Tensor) -> None:
        """Mark the rows whose ``token`` is one of ``eos`` and queue the question: all rows done?"""
        self.done |= torch.isin(token, eos)
        self.answer.copy_(self.done.all(), non_blocking=True)
        if self.ready is not None:
            self.ready.record()

    def all_done(self) -> bool:
        """The last question's answer (waits for the work queued before it, not after)."""
        if self.ready is not None:
            self.ready.synchronize()
        return bool(self.answer)


def decode_speed(decoder: Any, prompt_len: int = 32, new_tokens: int = 256) -> dict[str, float]:
    """Time to first token (prefill) and decode tok/s summed over the batch of ``decoder`` (a ``FastDecoder`` or
    a ``TPDecoder``: its ``stream``, ``batch_size``, ``device`` and ``devices``) on random prompt ids, after a
    warm-up (compile and graph capture excluded), so that the decoders' speeds compare directly. The decode rate is
    the ``new_tokens - 1`` steps after the first token over their time: a whole stream's time less a one-token
    stream's (the prompt and its first token), whichever way the token loop orders its steps (``decode_tokens``
    queues each step before it yields the token before)."""
    ids = torch.randint(0, 1000, (decoder.batch_size, prompt_len), device=decoder.device)

    def sync() -> None:
        for d in decoder.devices:
            if d.type == "cuda":
                torch.cuda.synchronize(d)

    for _ in decoder.stream(ids, 3, ignore_eos=True):  # warm-up: compiles the layer, captures the graph
        pass
    ttft, steps_s = stream_rate(lambda new: decoder.stream(ids, new, ignore_eos=True), new_tokens, sync)
    return {"ttft_s": ttft, "decode_tok_s": decoder.batch_size * steps_s}


def stream_rate(stream: Callable[[int], Iterable[Any]], new_tokens: int, sync: Callable[[], None],
                clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """Seconds to the first token of ``stream(1)`` (the faster of two), and decode steps a second after it: the
    ``new_tokens - 1`` steps of ``stream(new_tokens)`` over its time less the one-token stream's (``decode_speed``;
    ``benchmarks/greedy_tail.py``'s loops). ``sync`` waits for the devices; ``clock`` reads seconds. The one-token
    stream runs twice, before and after the whole one, and the faster counts: one that happened to take longer once
    (an allocation, a clock) would shorten the decode time and raise the rate (GLM-4-9B nf4 on an H200 once gave
    448.6 tok/s in a first round, 430.5 and 428.3 in the next two, with the replayed steps unmoved:
    ``benchmarks/results/nf4_split.json``'s ``in_step_first_run``).

    >>> def tokens(n):  # a stream whose every token takes at least 10 ms
    ...     for i in range(n):
    ...         time.sleep(0.01)
    ...         yield i
    >>> ttft, rate = stream_rate(tokens, 8, lambda: None)
    >>> ttft >= 0.01 and rate > 0
    True
    """
    def seconds(new: int) -> tuple[float, int]:
        sync()
        start = clock()
        count = sum(1 for _ in stream(new))
        sync()
        return clock() - start, count

    before, _ = seconds(1)
    total, count = seconds(new_tokens)
    first = min(before, seconds(1)[0])
    decode = total - first  # the count - 1 steps after the first token
    return first, max(count - 1, 0) / decode if decode > 0 else 0.0
