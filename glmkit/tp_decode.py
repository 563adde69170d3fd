"""Tensor-parallel fast decode for GLM-4: every layer split over the torchrun processes, one CUDA graph per token.

A layer split (notebooks 02-03) adds memory but not speed: one card works at a time. Tensor parallelism splits
every weight so all cards read their half of it for every token, and the two halves meet in an all-reduce.
GLM-4-9B-Chat has 2 KV heads, which makes two ranks natural: rank r keeps KV head r and the 16 query heads that
share it, so attention needs no communication at all. Per layer:

- q/k/v: the rank's heads (column split of the fused q/k/v projection);
- ``o_proj``: the columns that read those heads (row split), its partial sum all-reduced;
- gate/up: a slice of the MLP's width (column split), ``down_proj``: the matching columns, all-reduced;
- ``lm_head``: a slice of the vocabulary; the logits of all ranks are gathered, so every rank picks the same token;
- the embedding: the same slice of the vocabulary (as Megatron's and vLLM's ``VocabParallelEmbedding``): a rank
  looks up the ids it holds, zeros for the others, and one all-reduce sums the rows (exactly: one is not zero).
  It halves the table on each card (0.58 GiB of GLM-4-9B's 1.16 GiB in bf16) for one more all-reduce a token.

Two all-reduces of one ``[batch, hidden]`` hidden state per layer, and the embedding's: 81 per token for GLM-4-9B,
by NCCL, torch's symmetric-memory one-shot kernel or glmkit's push kernel, whichever measures fastest
(``glmkit.allreduce``). Each rank
runs the same compiled pieces as ``glmkit.fast_decode`` (Triton GEMVs at batch 1 on a GPU), with the collectives in
between, and on a GPU captures the whole token, all-reduces included, as one CUDA graph. At batch 1 the GEMV after
each all-reduce adds the all-reduced sum to the residual stream and normalises it as it reads them
(``glmkit.gemv.add_norm_gemv``): a rank's layer is q/k/v, attention, o_proj, all-reduce, gate/up, down, all-reduce,
with no add or norm kernel between them.
Run it with ``glmkit generate --tp 2 --fast-decode`` (or ``glmkit bench``). Introduced in
``notebooks/08_tensor_parallel.ipynb``.

One process can build one rank's shard without a process group (``group=None, rank=0, world=2``): it then
skips the collectives, which measures what one card does of a TP=2 token (the bound on TP's speed-up):

>>> from glmkit.loading import load_model
>>> model = load_model(device_map="cpu", dtype=torch.float32)
>>> shard = TPDecoder(model, max_len=32, rank=0, world=2)
>>> [tuple(w.shape) for w in shard.layers[0][:1]], tuple(shard.lm_head.shape), tuple(shard.embed.shape)
([(256, 256)], (512, 256), (512, 256))
>>> TPDecoder(model, max_len=32).generate(torch.tensor([[1, 2, 3]]), 4, ignore_eos=True).shape
torch.Size([1, 7])
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from glmkit.allreduce import AllReduce, agree
from glmkit.attention import auto_attention, qkv_decode_attention
from glmkit.fast_decode import (
    Fallback,
    FastDecoder,
    attention_fallback,
    auto_gemv,
    bucket_sizes,
    check_prefill,
    check_step,
    decode_speed,
    decode_tokens,
    fuses,
    linear,
    mlp_activation,
    norm_linear,
    pdl_fallback,
    raise_recompile_limit,
    rms_norm,
    rope,
    rotary_tables,
    smallest_bucket,
    warm_up_or_fall_back,
)
from glmkit.gemv import add_norm_gemv, choose_pdl, dependent_launches
from glmkit.vocabulary import head_dim


def _unreduced(t: torch.Tensor) -> torch.Tensor:
    """A partial sum left as it is (``TPDecoder._forward(alone=True)``: the kernels without the collectives)."""
    return t


def tp_shard(model: torch.nn.Module, rank: int, world: int) -> dict[str, Any]:
    """Rank ``rank``'s slices of a GLM model's weights for ``world``-way tensor parallelism (views of the model's
    tensors, not copies): per layer (fused q/k/v weight and bias, o_proj columns, post-attention norm, gate/up rows,
    down columns, next norm), plus the rank's ``lm_head`` rows and the same rows of the embedding (``embed``; its
    first id is ``embed_start``).

    >>> from glmkit.loading import load_model
    >>> shard = tp_shard(load_model(device_map="cpu"), rank=1, world=2)
    >>> [tuple(w.shape) for w in shard["layers"][0] if w is not None][:3]
    [(256, 256), (256,), (256, 128)]
    """
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = head_dim(cfg)
    inter, vocab = cfg.intermediate_size, cfg.vocab_size
    for what, n in (("query heads", heads), ("KV heads", kv), ("MLP width", inter), ("vocabulary", vocab)):
        if n % world:
            raise ValueError(f"{world} ranks cannot split {n} {what} evenly; GLM-4-9B-Chat takes --tp 1 or 2.")
    q = slice(rank * heads // world * hd, (rank + 1) * heads // world * hd)
    k = slice(rank * kv // world * hd, (rank + 1) * kv // world * hd)
    m = slice(rank * inter // world, (rank + 1) * inter // world)
    layers = model.model.layers
    next_norms = [layer.input_layernorm.weight for layer in layers[1:]] + [model.model.norm.weight]
    out = []
    for layer, next_norm in zip(layers, next_norms):
        a, mlp = layer.self_attn, layer.mlp
        wqkv = torch.cat([a.q_proj.weight[q], a.k_proj.weight[k], a.v_proj.weight[k]])
        bqkv = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias[q], a.k_proj.bias[k], a.v_proj.bias[k]])
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        out.append((wqkv, bqkv, a.o_proj.weight[:, q], layer.post_attention_layernorm.weight,
                    torch.cat([gate[m], up[m]]), mlp.down_proj.weight[:, m], next_norm))
    v = slice(rank * vocab // world, (rank + 1) * vocab // world)
    return {"layers": out, "lm_head": model.lm_head.weight[v],
            "lm_head_bias": None if model.lm_head.bias is None else model.lm_head.bias[v],
            "embed": model.get_input_embeddings().weight[v], "embed_start": v.start}


def embed_part(tokens: torch.Tensor, embed: torch.Tensor, start: int) -> torch.Tensor:
    """This rank's share of the embedding lookup: the rows of the ids in ``[start, start + rows of embed)``, zeros
    for the others; summed over the ranks, it is the whole table's lookup.

    tokens: [b, s] ids; embed: [vocab / world, hidden] -> [b, s, hidden].

    >>> table = torch.arange(8.0).view(4, 2)
    >>> embed_part(torch.tensor([[0, 3]]), table[2:], 2) + embed_part(torch.tensor([[0, 3]]), table[:2], 0)
    tensor([[[0., 1.],
             [6., 7.]]])
    """
    local = tokens - start
    outside = (local < 0) | (local >= embed.shape[0])
    x = F.embedding(local.masked_fill(outside, 0), embed)
    return x.masked_fill(outside[..., None], 0)


def attention_half(h: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor | None, wqkv: torch.Tensor, bqkv: torch.Tensor | None, wo: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                   gemv: bool | str, attention: str = "sdpa", tickets: torch.Tensor | None = None) -> torch.Tensor:
    """The rank's heads for ``s`` new tokens per row, their K/V written at ``pos`` in the static cache; returns
    this rank's partial ``o_proj`` output (to be all-reduced).

    h: normalised input [b, s, hidden]; pos: [b, s] positions; cos/sin: [b, 1, s, rotary] (with ``"triton"``
    attention of one token a row, the tables ``[max_len, rotary]`` may be given instead: the kernel reads row pos
    itself, no gather kernels before it); mask: additive
    [b, 1, s, max_len] (``None`` with ``"triton"`` attention of one token a row); k_cache/v_cache:
    [b, kv_heads, max_len, head_dim]. attention: ``"triton"`` for one token per row
    (``glmkit.attention.decode_attention``: rope, the K/V write and attention in one kernel; ``tickets``, int32
    zeros one per row and KV head, let it split a cache and combine in the same kernel) or ``"sdpa"``.
    """
    return attend(linear(h, wqkv, bqkv, gemv), pos, cos, sin, mask, wo, k_cache, v_cache, heads, kv_heads, head_dim,
                  gemv, attention, tickets)


def add_norm_attention_half(x: torch.Tensor, d: torch.Tensor | None, in_norm: torch.Tensor, eps: float,
                            pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                            wqkv: torch.Tensor, bqkv: torch.Tensor | None, wo: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, heads: int, kv_heads: int, head_dim: int, gemv: bool | str,
                            attention: str = "sdpa",
                            tickets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_half`` from the raw residual stream x: ``x + d`` (d: the all-reduced ``down_proj`` output of the
    layer before; ``None`` for the first layer), this layer's input norm and q/k/v in one GEMV launch where glmkit's
    Triton kernel runs (``add_norm_linear``). Returns the new residual stream and the partial ``o_proj`` output.
    A rank's fused layer in ``notebooks/08_tensor_parallel.ipynb``.

    >>> from glmkit.gemv import triton_available
    >>> x, d, g, wqkv = torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.ones(8), torch.randn(16, 8)
    >>> k_cache, v_cache = torch.zeros(2, 1, 1, 8, 4)  # 2 query heads sharing 1 KV head of 4 dims; 8 positions
    >>> cos, sin, pos = torch.ones(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), torch.tensor([[0]])  # position 0
    >>> mask = torch.zeros(1, 1, 1, 8).masked_fill(torch.arange(8) > 0, float("-inf"))
    >>> gemv = "triton" if triton_available() else False  # glmkit's kernels (GPU, or TRITON_INTERPRET=1), else cuBLAS
    >>> s, o = add_norm_attention_half(x, d, g, 1e-5, pos, cos, sin, mask, wqkv, None, torch.eye(8), k_cache, v_cache,
    ...                                2, 1, 4, gemv)
    >>> qkv = F.linear(rms_norm(x + d, g, 1e-5), wqkv)
    >>> want = attend(qkv, pos, cos, sin, mask, torch.eye(8), k_cache, v_cache, 2, 1, 4, False, "sdpa")
    >>> torch.allclose(s, x + d), torch.allclose(o, want, atol=1e-5)
    (True, True)
    """
    if d is None:
        qkv = norm_linear(x, in_norm, eps, wqkv, bqkv, gemv)
    else:
        qkv, x = add_norm_linear(x, d, in_norm, eps, wqkv, bqkv, gemv)
    return x, attend(qkv, pos, cos, sin, mask, wo, k_cache, v_cache, heads, kv_heads, head_dim, gemv, attention,
                     tickets)


def attend(qkv: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
           wo: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
           gemv: bool | str, attention: str, tickets: torch.Tensor | None = None) -> torch.Tensor:
    """The rank's heads from their q/k/v ``[b, s, (heads + 2 kv_heads) head_dim]``: rope, the K/V write, attention
    and the rank's ``o_proj`` columns (its partial output). Arguments as ``attention_half``; taught in
    ``notebooks/08_tensor_parallel.ipynb``. At position 0 each query head's output is its KV head's v:

    >>> from glmkit.gemv import triton_available
    >>> qkv = torch.randn(1, 1, (2 + 2 * 1) * 4)  # one token: 2 query heads sharing 1 KV head of 4 dims
    >>> k_cache, v_cache = torch.zeros(2, 1, 1, 8, 4)  # [rows, kv_heads, max_len, head_dim]
    >>> cos, sin = torch.ones(1, 1, 1, 4), torch.zeros(1, 1, 1, 4)  # position 0: no rotation
    >>> mask = torch.zeros(1, 1, 1, 8).masked_fill(torch.arange(8) > 0, float("-inf"))  # attends to position 0
    >>> attention = "triton" if triton_available() else "sdpa"  # glmkit's kernel (GPU, or TRITON_INTERPRET=1)
    >>> o = attend(qkv, torch.tensor([[0]]), cos, sin, mask, torch.eye(8), k_cache, v_cache, 2, 1, 4, False, attention)
    >>> v = qkv[..., -4:]
    >>> torch.allclose(o, v.repeat(1, 1, 2)), torch.equal(v_cache[0, 0, 0], v[0, 0])
    (True, True)
    """
    b, s, _ = qkv.shape
    rows = torch.arange(b, device=qkv.device)[:, None]
    if attention == "triton" and s == 1:  # one kernel: rope, the K/V write at pos and attention over 0..pos
        attn = qkv_decode_attention(qkv, k_cache, v_cache, pos[:, 0], rows[:, 0], cos, sin, tickets,
                                    cos_table=cos.dim() == 2)
    else:
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q = rope(q.view(b, s, heads, head_dim).transpose(1, 2), cos, sin)
        k = rope(k.view(b, s, kv_heads, head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, s, kv_heads, head_dim).transpose(1, 2)
        k_cache[rows, :, pos] = k.transpose(1, 2)  # [b, s, kv, hd] into [b, kv, max_len, hd] at (row, :, pos)
        v_cache[rows, :, pos] = v.transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)  # [b, heads, s, hd]
    return linear(attn.transpose(1, 2).reshape(b, s, heads * head_dim), wo, None, gemv)


def mlp_half(x: torch.Tensor, o: torch.Tensor, ln2: torch.Tensor, wgu: torch.Tensor, wd: torch.Tensor, eps: float,
             gemv: bool | str, fuse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add of the all-reduced attention output, then the rank's slice of the MLP: returns the new residual
    stream and this rank's partial ``down_proj`` output (to be all-reduced). The add, the norm and gate/up with its
    activation are one GEMV launch where glmkit's Triton kernel runs (``add_norm_linear``; ``fuse=False``: kernels
    of their own, to compare)."""
    if fuse:
        a, x = add_norm_linear(x, o, ln2, eps, wgu, None, gemv, swiglu=True)
    else:
        x = x + o
        a = mlp_activation(rms_norm(x, ln2, eps), wgu, gemv)
    return x, linear(a, wd, None, gemv)


def add_norm_linear(x: torch.Tensor, d: torch.Tensor, norm: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None, gemv: bool | str, swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + d``, then ``linear(rms_norm(s, norm, eps), weight, bias, gemv)`` (with ``swiglu``: GLM's MLP
    activation of the gate/up product); returns ``(product, s)``. One launch of ``glmkit.gemv.add_norm_gemv`` where
    glmkit's 16/32-bit Triton GEMV multiplies by ``weight`` (``fuses``): no add or norm kernel of its own.

    >>> w, x, d, g = torch.randn(6, 4), torch.randn(1, 1, 4), torch.randn(1, 1, 4), torch.ones(4)
    >>> y, s = add_norm_linear(x, d, g, 1e-5, w, None, False)
    >>> torch.equal(s, x + d), torch.allclose(y, F.linear(rms_norm(x + d, g, 1e-5), w))
    (True, True)
    """
    if swiglu and bias is not None:
        raise ValueError("add_norm_linear's SwiGLU takes no bias (GLM's gate/up projection has none).")
    if fuses(weight, gemv, swiglu=swiglu):
        return add_norm_gemv(x, d, weight, norm, bias, eps=eps, swiglu=swiglu)
    s = x + d
    h = rms_norm(s, norm, eps)
    return (mlp_activation(h, weight, gemv) if swiglu else linear(h, weight, bias, gemv)), s


def next_input(x: torch.Tensor, d: torch.Tensor, norm: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add of the all-reduced MLP output and the next layer's input norm (or the final norm)."""
    x = x + d
    return x, rms_norm(x, norm, eps)


class TPDecoder:
    """Static-cache decoder for one tensor-parallel rank of a GLM model.

    Args:
        model: a ``GlmForCausalLM`` in 16/32-bit, whole, on any device (every rank loads it; only the rank's slices
            are copied to ``device``; the caller may drop the model afterwards).
        max_len: prompt + new tokens the static cache holds; batch_size: sequences decoded together.
        group: the process group of the ranks (``None``: no collectives, one rank's share alone, for measuring).
        rank, world: this rank and the number of ranks (default: from ``group``, else 0 and 1).
        device: where the shard lives (default: the model's device).
        cuda_graph, compile, gemv, attention: as ``FastDecoder`` (defaults: on a GPU; Triton GEMVs at batch 1 on
            Ampere+; ``attention="auto"``: glmkit's Triton decode attention where those run, at every batch). A
            kernel that ``"auto"`` chose and that fails on any rank gives way on every rank (cuBLAS, ``"sdpa"``),
            with a warning that names it (``_capture``).
        graph_batch_sizes: the batch sizes captured (default 1, 2, 4, ... up to ``batch_size``); a step of k rows
            runs the smallest that holds them.
        allreduce: ``"nccl"``, ``"symm"`` (torch's symmetric-memory one-shot kernel), ``"push"`` (glmkit's: each
            rank writes its partial into the other's memory; two ranks) or ``"auto"`` (time those that run, keep the
            fastest); on CPUs and wherever symmetric memory cannot run, the group's own all-reduce
            (``glmkit.allreduce``; ``self.allreduce.describe()`` says which runs and why).
        split_embedding: each rank holds its slice of the vocabulary of the embedding too (one more all-reduce a
            token); ``False`` replicates the whole table on every rank instead.
        fuse_norms: on the Triton batch-1 step, the GEMV after each all-reduce adds the all-reduced partial sum to
            the residual stream and applies the RMSNorm as it reads them (``add_norm_linear``): a rank's layer is
            q/k/v (add + norm), attention, o_proj, all-reduce, gate/up (add + norm, SwiGLU), down, all-reduce, with
            no add or norm kernel. ``False``: those as kernels of their own, to compare.
        pdl: as ``FastDecoder``'s: the batch-1 Triton step (uncompiled unless ``compile=True``: it is glmkit's
            kernels and the all-reduces) captured with programmatic dependent launch where the GPU supports it.
    """

    def __init__(self, model: torch.nn.Module, max_len: int = 2048, batch_size: int = 1,
                 group: dist.ProcessGroup | None = None, rank: int | None = None, world: int | None = None,
                 device: torch.device | str | None = None, cuda_graph: bool | None = None,
                 compile: bool | None = None, gemv: bool | str = "auto",
                 graph_batch_sizes: list[int] | None = None, allreduce: str = "auto",
                 split_embedding: bool = True, attention: str = "auto", fuse_norms: bool = True,
                 pdl: bool | None = None) -> None:
        FastDecoder.check(model)
        self.group = group
        self.rank = rank if rank is not None else (dist.get_rank(group) if group is not None else 0)
        self.world = world if world is not None else (dist.get_world_size(group) if group is not None else 1)
        cfg = model.config
        self.device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
        self.devices = [self.device]  # (as FastDecoder's: decode_speed synchronizes them)
        self.dtype = model.get_input_embeddings().weight.dtype
        on_gpu = self.device.type == "cuda"
        self.use_graph = on_gpu if cuda_graph is None else cuda_graph
        self.compiled = on_gpu if compile is None else compile
        self.compile_auto = compile is None
        self.pdl, self.auto_pdl = choose_pdl(pdl, self.devices), pdl is None
        self.auto_gemv = gemv == "auto"
        self.gemv = auto_gemv(self.device, 1) if self.auto_gemv else gemv  # used by the batch-1 bucket
        self.fuse_norms = fuse_norms
        if attention not in ("auto", "triton", "sdpa"):
            raise ValueError(f"attention must be 'auto', 'triton' or 'sdpa', not {attention!r}.")
        self.auto_attention = attention == "auto"
        self.attention = auto_attention(self.device, self.dtype) if self.auto_attention else attention
        self.max_len, self.batch_size = max_len, batch_size
        self.heads, self.kv_heads = cfg.num_attention_heads // self.world, cfg.num_key_value_heads // self.world
        self.head_dim = head_dim(cfg)
        self.eps, self.vocab = cfg.rms_norm_eps, cfg.vocab_size
        shard = tp_shard(model, self.rank, self.world)

        def to_dev(t: torch.Tensor | None) -> torch.Tensor | None:
            # a copy, never a view: the caller may drop the whole model once its slices are taken
            return None if t is None else t.detach().to(self.device, copy=True).contiguous()

        self.layers = [tuple(to_dev(t) for t in layer) for layer in shard["layers"]]
        self.lm_head, self.lm_head_bias = to_dev(shard["lm_head"]), to_dev(shard["lm_head_bias"])
        self.split_embedding = split_embedding and self.world > 1
        if self.split_embedding:  # the rank's rows of the table, summed over the ranks by one all-reduce
            self.embed, self.embed_start = to_dev(shard["embed"]), shard["embed_start"]
        else:  # replicated: one lookup, no collective
            self.embed, self.embed_start = to_dev(model.get_input_embeddings().weight), 0
        self.first_norm = to_dev(model.model.layers[0].input_layernorm.weight)
        self.cos, self.sin = (t.to(self.device) for t in rotary_tables(model, max_len))  # [max_len, rotary]
        self.positions = torch.arange(max_len, device=self.device)
        if self.compiled:
            raise_recompile_limit()

        def maybe_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
            return torch.compile(fn, fullgraph=True, dynamic=False) if self.compiled else fn

        self._attention, self._mlp, self._next, self._embed, self._add_norm_attention = map(
            maybe_compile, (attention_half, mlp_half, next_input, embed_part, add_norm_attention_half))
        collective = group if self.world > 1 else None
        self.allreduce = AllReduce(collective, self.device, self.dtype, allreduce, hidden=cfg.hidden_size,
                                   graph=self.use_graph)
        self._allocate(batch_size, graph_batch_sizes)

    def _allocate(self, batch_size: int, graph_batch_sizes: list[int] | None) -> None:
        """The per-batch state: static KV cache, step buffers, captured batch sizes (graphs come at first use)."""
        self.batch_size = batch_size
        shape = (len(self.layers), batch_size, self.kv_heads, self.max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        # a step's input, one row of tokens and one of positions: a single copy from the host fills both
        self.control = torch.zeros(2, batch_size, dtype=torch.long, device=self.device)
        # glmkit's attention kernel's tickets (glmkit.attention.decode_attention): zeros it leaves as it finds them
        self.tickets = torch.zeros(batch_size * self.kv_heads, dtype=torch.int32, device=self.device)
        self.tokens, self.pos = self.control[0, :, None], self.control[1]  # [batch, 1], [batch]
        on_gpu = self.device.type == "cuda"  # host tensors are staged in pinned memory, copied without a sync
        self.staging = torch.zeros(2, batch_size, dtype=torch.long, pin_memory=on_gpu)
        self.staged = torch.cuda.Event() if on_gpu else None
        alone = self.group is None and self.world > 1  # one rank's shard measured alone: its slice of the vocabulary
        width = self.vocab // self.world if alone else self.vocab
        self.logits = torch.zeros(batch_size, width, dtype=torch.float32, device=self.device)
        self.buckets = bucket_sizes(batch_size, graph_batch_sizes)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.ready = False

    def resized(self, batch_size: int, graph_batch_sizes: list[int] | None = None,
                allreduce: AllReduce | None = None) -> TPDecoder:
        """A decoder for another batch size (and, given one, another ``AllReduce``) that shares this one's weights
        and compiled pieces (no model needed); each holds its own KV cache, so when memory is tight ``release()``
        this one first (every rank alike: the new one captures its graphs, collectives included, at first use)."""
        new = copy.copy(self)
        if allreduce is not None:
            new.allreduce = allreduce
        new._allocate(batch_size, graph_batch_sizes)
        return new

    def release(self) -> None:
        """Free this decoder's KV cache and graphs (its weights stay, for ``resized``); it cannot decode after."""
        self.k_cache = self.v_cache = None
        self.graphs, self.ready = {}, False

    def _gather_logits(self, part: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[b, vocab / world]`` of this rank -> ``[b, vocab]`` fp32 on every rank (into ``out`` if given), so all
        ranks pick alike. The logits travel in the model's dtype (bf16: half the bytes of fp32) and are widened as
        they are put in order, in one copy: the same values."""
        b = part.shape[0]
        gather = self.group is not None and self.world > 1
        if out is None:
            out = torch.empty(b, part.shape[1] * (self.world if gather else 1), dtype=torch.float32,
                              device=part.device)
        if not gather:
            return out.copy_(part)
        parts = torch.empty(self.world * b, part.shape[1], dtype=part.dtype, device=part.device)
        dist.all_gather_into_tensor(parts, part.contiguous(), group=self.group)  # [world * b, vocab / world]
        out.view(b, self.world, -1).copy_(parts.view(self.world, b, -1).transpose(0, 1))
        return out

    def _forward(self, tokens: torch.Tensor, pos: torch.Tensor, rows: slice, gemv: bool | str,
                 attention: Callable[..., Any], mlp: Callable[..., Any], nxt: Callable[..., Any],
                 embed: Callable[..., Any], alone: bool = False) -> torch.Tensor:
        """Tokens ``[b, s]`` at positions ``pos`` ``[b, s]`` of cache rows ``rows``: this rank's logits of the last
        position ``[b, vocab / world]``. ``alone``: without the all-reduces (every kernel of this rank runs, nothing
        waits for another rank: the warm-up whose outcome the ranks agree on, ``_capture``)."""
        b, s = tokens.shape
        reduce = _unreduced if alone else self.allreduce
        x = reduce(embed(tokens, self.embed, self.embed_start))  # [b, s, hidden]
        if self.attention == "triton" and s == 1:  # glmkit's kernel reads each row's position itself: the rotary
            cos, sin, mask = self.cos, self.sin, None  # tables [max_len, rotary], and no mask to build
        else:
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [b, 1, s, rotary]
            mask = torch.zeros(b, 1, s, self.max_len, dtype=self.dtype, device=self.device)
            mask = mask.masked_fill(self.positions[None, None, None, :] > pos[:, None, :, None], float("-inf"))
        if self.fuses_norms(gemv):
            return self._fused_layers(x, pos, cos, sin, mask, rows, gemv, mlp, reduce)
        h = rms_norm(x, self.first_norm, self.eps)
        for i, (wqkv, bqkv, wo, ln2, wgu, wd, next_norm) in enumerate(self.layers):
            o = attention(h, pos, cos, sin, mask, wqkv, bqkv, wo, self.k_cache[i, rows], self.v_cache[i, rows],
                          self.heads, self.kv_heads, self.head_dim, gemv, self.attention, self.tickets)
            x, d = mlp(x, reduce(o), ln2, wgu, wd, self.eps, gemv, False)
            x, h = nxt(x, reduce(d), next_norm, self.eps)
        head = "triton" if gemv == "triton" else False
        return linear(h[:, -1:], self.lm_head, self.lm_head_bias, head)[:, -1]

    def fuses_norms(self, gemv: bool | str) -> bool:
        """Whether a step with these projection kernels folds the residual adds and norms into its GEMVs (the
        Triton batch-1 step, unless ``fuse_norms=False``); ``notebooks/08_tensor_parallel.ipynb`` shows a rank's step.

        >>> from glmkit.loading import load_model
        >>> shard = TPDecoder(load_model(device_map="cpu", dtype=torch.float32), max_len=16, rank=0, world=2)
        >>> shard.fuses_norms("triton"), shard.fuses_norms(False)
        (True, False)
        """
        return self.fuse_norms and gemv == "triton"

    def _fused_layers(self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      mask: torch.Tensor | None, rows: slice, gemv: bool | str, mlp: Callable[..., Any],
                      reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``_forward``'s layers on the Triton batch-1 step: x is the all-reduced embedding; every add of an
        all-reduced partial sum (``reduce``) and every norm rides in the GEMV that follows it (``add_norm_linear``)."""
        d, in_norm = None, self.first_norm  # the first layer: the norm alone
        add_norm_attention = add_norm_attention_half if self.uncompiled(gemv) else self._add_norm_attention
        for i, (wqkv, bqkv, wo, ln2, wgu, wd, next_norm) in enumerate(self.layers):
            x, o = add_norm_attention(x, d, in_norm, self.eps, pos, cos, sin, mask, wqkv, bqkv, wo,
                                            self.k_cache[i, rows], self.v_cache[i, rows], self.heads, self.kv_heads,
                                            self.head_dim, gemv, self.attention, self.tickets)
            x, d = mlp(x, reduce(o), ln2, wgu, wd, self.eps, gemv, True)
            d, in_norm = reduce(d), next_norm
        logits, _ = add_norm_linear(x, d, in_norm, self.eps, self.lm_head, self.lm_head_bias, "triton")
        return logits[:, -1]

    def bucket(self, k: int) -> int:
        """The smallest captured batch size that holds ``k`` rows."""
        return smallest_bucket(self.buckets, k)

    def uncompiled(self, gemv: bool | str) -> bool:
        """Whether the step with these projection kernels runs uncompiled: the fused Triton step (glmkit's kernels
        and the all-reduces alone, with glmkit's decode attention) unless ``compile=True`` was asked for."""
        return self.compile_auto and self.fuses_norms(gemv) and self.attention == "triton"

    def _step_fns(self, gemv: bool | str) -> tuple[Callable[..., Any], ...]:
        """The attention, MLP, next-input and embedding pieces of a step: as they are on the uncompiled step."""
        if self.uncompiled(gemv):
            return attention_half, mlp_half, next_input, embed_part
        return self._attention, self._mlp, self._next, self._embed

    def uses_pdl(self, gemv: bool | str) -> bool:
        """Whether a step with these projection kernels launches glmkit's kernels with programmatic dependent launch
        (``pdl``; the uncompiled Triton step only)."""
        return self.pdl and self.uncompiled(gemv)

    def _gemv_for(self, b: int) -> bool | str:
        return self.gemv if b == 1 else False  # glmkit's Triton GEMVs read one token; cuBLAS for more

    @torch.no_grad()
    def _step(self, b: int) -> None:
        """One token for rows 0..b-1: reads self.tokens/self.pos, writes self.logits."""
        self._gather_logits(self._run(b), out=self.logits[:b])

    def _run(self, b: int, alone: bool = False) -> torch.Tensor:
        """``_forward`` of rows 0..b-1 with the pieces and launches of their step (``_step_fns``, ``uses_pdl``)."""
        gemv = self._gemv_for(b)
        with dependent_launches(self.uses_pdl(gemv)):
            return self._forward(self.tokens[:b], self.pos[:b, None], slice(0, b), gemv, *self._step_fns(gemv),
                                 alone=alone)

    @torch.no_grad()
    def _warm_up_alone(self) -> None:
        """Every bucket's step once on this rank's shard without the collectives: compiles and runs every kernel,
        and a kernel that fails here fails before any collective another rank would wait in."""
        for b in self.buckets:
            self._run(b, alone=True)

    def _fallbacks(self) -> list[Fallback]:
        """What this rank chose itself and can do without, should it fail here: glmkit's decode attention
        (``attention="auto"``), glmkit's GEMVs (``gemv="auto"``)."""
        found = pdl_fallback(self) + attention_fallback(self)
        if self.auto_gemv and self.gemv == "triton":
            def cublas(on: bool) -> None:
                self.gemv = False if on else "triton"

            found.append(Fallback("glmkit's Triton GEMV kernels", "cuBLAS (gemv=False)", cublas))
        return found

    def _failed_anywhere(self, failed: bool) -> bool:
        """Whether this rank or another failed its warm-up (one all-reduce of the flag): all ranks decide alike."""
        if self.group is None or self.world < 2:
            return failed
        return not agree(not failed, self.group, self.device)

    def _capture(self) -> None:
        """Compile and (on a GPU) capture one graph per bucket, collectives included. First every kernel runs on each
        rank without collectives (``_warm_up_alone``) and the ranks agree on whether it worked anywhere: a kernel the
        decoder chose itself that fails, on any rank, gives way to its fallback on every rank, with a warning that
        names it (``warm_up_or_fall_back``); a rank that fails alone never leaves the other waiting in a collective."""
        warm_up_or_fall_back(self._warm_up_alone, self._fallbacks(), "TPDecoder", self._failed_anywhere)
        self._capture_buckets()

    def _capture_buckets(self) -> None:
        """One CUDA graph per bucket, collectives included (nothing to capture without graphs: the kernels ran in
        ``_warm_up_alone``)."""
        for b in self.buckets if self.use_graph else ():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # compile, autotune and allocate outside the graph
                    self._step(b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(b)
            self.graphs[b] = graph
        self.ready = True

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, chunk: int | None = None, slot: int | None = None,
                start: int = 0) -> torch.Tensor:
        """Run prompts ``[b, n]`` (or one prompt into row ``slot``) through the rank's shard in ``chunk``-token
        pieces, filling the static cache from position ``start`` (the earlier positions already there); returns
        the last position's logits ``[b, vocab]`` (the same on every rank)."""
        b, n = check_prefill(input_ids, slot, start, self.batch_size, self.max_len)
        if not self.ready:
            self._capture()  # before the cache is filled: warm-up steps write K/V at position 0
        rows = slice(None) if slot is None else slice(slot, slot + 1)
        input_ids = input_ids.to(self.device)
        step = chunk or n
        for first in range(0, n, step):
            piece = input_ids[:, first:first + step]
            pos = torch.arange(start + first, start + first + piece.shape[1], device=self.device).expand(b, -1)
            part = self._forward(piece, pos, rows, False, attention_half, mlp_half, next_input, embed_part)
        return self._gather_logits(part)

    def decode_step(self, tokens: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """Logits ``[k, vocab]`` for ``tokens`` ``[k]`` of rows 0..k-1 at ``pos`` (one for all rows, or ``[k]``),
        with the smallest captured batch that holds them (its other rows decode a dummy token at position 0, which
        a later prefill of that row overwrites). The logits are valid until the next step.

        ``tokens`` and ``pos`` may be on the host (CPU tensors, what a server's scheduler has): on a GPU they then go
        over in one copy through pinned memory that does not wait for the GPU (a plain copy from the host would)."""
        k, b = check_step(self.buckets, tokens, pos)
        per_row = isinstance(pos, torch.Tensor)
        if self.staged is not None and tokens.device.type == "cpu" and (not per_row or pos.device.type == "cpu"):
            self._stage(tokens, pos, k, b)
        else:
            self.tokens[:k].copy_(tokens.view(-1, 1))
            self.tokens[k:b].zero_()
            self.pos[:k].copy_(pos.view(-1)) if per_row else self.pos[:k].fill_(pos)
            self.pos[k:b].zero_()
        if not self.ready:
            self._capture()
        self.graphs[b].replay() if b in self.graphs else self._step(b)
        return self.logits[:k]

    def _stage(self, tokens: torch.Tensor, pos: int | torch.Tensor, k: int, b: int) -> None:
        """Host tokens and positions into the pinned staging rows, then one asynchronous copy to ``control``."""
        self.staged.synchronize()  # the last step's copy has read the staging rows (it ran before that step)
        host = self.staging
        host[:, k:b] = 0
        host[0, :k] = tokens.view(-1)
        host[1, :k] = pos.view(-1) if isinstance(pos, torch.Tensor) else pos
        self.control.copy_(host, non_blocking=True)  # whole rows: both sides contiguous, one DMA
        self.staged.record(torch.cuda.current_stream(self.device))  # the stream that copies (not the caller's device's)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, eos: list[int] | None = None, ignore_eos: bool = False,
               prefill_chunk: int | None = None, seed: int | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token ``[b]`` per step; every rank yields the same tokens (same gathered logits, and the
        same ``seed`` for sampling)."""
        generator = None
        if temperature > 0:
            generator = torch.Generator(self.device).manual_seed(0 if seed is None else seed)
        stop = torch.tensor(eos or [], device=self.device, dtype=torch.long)
        yield from decode_tokens(self, input_ids, max_new_tokens, temperature, top_p, generator, stop, ignore_eos,
                                 prefill_chunk)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 128, ignore_eos: bool = False,
                 **kwargs: Any) -> torch.Tensor:
        """Prompt + new tokens ``[b, n + new]``; stops early when every sequence said an end token."""
        new = list(self.stream(input_ids, max_new_tokens, ignore_eos=ignore_eos, **kwargs))
        return torch.cat([input_ids.to(self.device), torch.stack(new, dim=1)], dim=1)

    def tokens_per_second(self, prompt_len: int = 32, new_tokens: int = 256) -> dict[str, float]:
        """The one-device decoder's measurement (``decode_speed``: prefill and warm-up excluded), so the two compare
        directly."""
        return decode_speed(self, prompt_len, new_tokens)


# A command from the leader to the followers: one int64 tensor over the gloo group, [op, fields..., payload].
# decode_step: [DECODE, k, per-row positions?, position, -, -, -, -, tokens (batch_size), positions (batch_size)];
# prefill: [PREFILL, rows, n, chunk or 0, slot or -1, start, ...], then the prompt's ids in a second broadcast.
STOP, DECODE, PREFILL = 0, 1, 2
HEADER = 8


def leader_rank(group: dist.ProcessGroup | None) -> int:
    """The global rank of ``group``'s first process (the leader), whose commands the others follow."""
    return dist.get_global_rank(group, 0) if group else 0


class TPLeader:
    """Rank 0's handle on its ``TPDecoder`` for a server: every ``prefill``/``decode_step`` is first sent to the other
    ranks (``follow``), which run the same call on their shards, so the collectives inside meet. The serving engine
    drives it like a one-device decoder. ``close()`` releases the followers.

    Commands travel over ``group`` (a gloo group: host memory, off the GPU's stream) as one int64 tensor per decode
    step, not a pickled ``broadcast_object_list`` (on a 2-core x86 CPU, batch 16: 88 µs a call against 744 µs,
    ``benchmarks/results/tp_commands.json``).
    """

    def __init__(self, decoder: TPDecoder, group: dist.ProcessGroup | None = None) -> None:
        self.decoder, self.group = decoder, group
        for name in ("batch_size", "max_len", "device", "dtype", "buckets", "bucket"):
            setattr(self, name, getattr(decoder, name))
        self.src = leader_rank(group)
        self.wire = torch.zeros(HEADER + 2 * decoder.batch_size, dtype=torch.long)

    def _send(self, *fields: int) -> None:
        self.wire[:len(fields)] = torch.tensor(fields, dtype=torch.long)
        dist.broadcast(self.wire, src=self.src, group=self.group)

    def prefill(self, input_ids: torch.Tensor, chunk: int | None = None, slot: int | None = None,
                start: int = 0) -> torch.Tensor:
        rows, n = check_prefill(input_ids, slot, start, self.batch_size, self.max_len)  # refused before it is sent
        self._send(PREFILL, rows, n, chunk or 0, -1 if slot is None else slot, start)
        dist.broadcast(input_ids.to("cpu", torch.long).contiguous(), src=self.src, group=self.group)
        return self.decoder.prefill(input_ids, chunk, slot, start)

    def decode_step(self, tokens: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """Send the step to the followers, then run it here. Give ``tokens``/``pos`` as host (CPU) tensors: the
        command is built from them as they are and the decoder copies them to its GPU without waiting for it; GPU
        tensors work too, but reading them back for the command waits for the GPU every step."""
        (k, _), b = check_step(self.buckets, tokens, pos), self.batch_size  # refused before it is sent
        per_row = isinstance(pos, torch.Tensor)
        self.wire[HEADER:HEADER + k] = tokens.view(-1)
        if per_row:
            self.wire[HEADER + b:HEADER + b + k] = pos.view(-1)
        self._send(DECODE, k, int(per_row), 0 if per_row else int(pos))
        return self.decoder.decode_step(tokens, pos)

    def close(self) -> None:
        self._send(STOP)


def follow(decoder: TPDecoder, group: dist.ProcessGroup | None = None) -> int:
    """Run what the leader (rank 0's ``TPLeader``) sends until it says stop; returns the number of calls run."""
    src, b = leader_rank(group), decoder.batch_size
    wire = torch.zeros(HEADER + 2 * b, dtype=torch.long)
    calls = 0
    while True:
        dist.broadcast(wire, src=src, group=group)
        op, *fields = wire[:HEADER].tolist()
        if op == STOP:
            return calls
        if op == PREFILL:
            rows, n, chunk, slot, start = fields[:5]
            ids = torch.empty(rows, n, dtype=torch.long)
            dist.broadcast(ids, src=src, group=group)
            method, args = decoder.prefill, (ids, chunk or None, None if slot < 0 else slot, start)
        else:
            k, per_row, pos = fields[:3]
            tokens = wire[HEADER:HEADER + k].clone()
            positions = wire[HEADER + b:HEADER + b + k].clone() if per_row else pos
            method, args = decoder.decode_step, (tokens, positions)
        try:
            method(*args)
        except ValueError:
            pass  # a call the decoder refuses before any collective: the leader's fails alike, and both go on
        calls += 1
