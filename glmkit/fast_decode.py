"""A fast one-device decode path for GLM-4: static KV cache, fused QKV, compiled layer, one CUDA graph per token.

Plain ``generate()`` spends most of a decode step in Python and kernel launches: at batch 1 the GPU idles.
``FastDecoder`` preallocates the KV cache, fuses each layer's q/k/v projections into one matrix, optionally
compiles the layer function once (``torch.compile``, reused by all 40 layers), and on a GPU captures the whole
one-token step (40 layers, norm, ``lm_head``) as a single CUDA graph that is replayed for every token.
Greedy decoding gives the same tokens as ``generate()`` (tested on the CPU, where it runs eagerly).
Introduced in ``notebooks/05_tuning.ipynb``; written for GLM (``GlmForCausalLM``) in 16/32-bit.

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
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from glmkit.gemv import gemv as triton_gemv
from glmkit.gemv import gemv_swiglu, triton_available

RECOMPILE_LIMIT = 1024  # compiled shapes of the layer function one process may hold (torch's default: 8)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # as GlmRMSNorm: in fp32, then back to the input dtype before the weight
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    # GLM interleaves: pairs (0, 1), (2, 3), ... rotate together
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [b, heads, 1, head_dim]; cos/sin: [b, 1, 1, rotary_dim]; only the first rotary_dim dims rotate
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat([rot * cos + _rotate_half(rot) * sin, rest], dim=-1)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gemv: bool | str) -> torch.Tensor:
    """``F.linear`` (cuBLAS); with ``gemv="triton"`` glmkit's Triton kernel for one token (``glmkit.gemv``); with
    ``gemv=True`` (one token, compiled) a multiply-and-sum that inductor turns into one reduction kernel."""
    if gemv == "triton":
        return triton_gemv(x, weight, bias)
    if not gemv:
        return F.linear(x, weight, bias)
    y = (weight.float() * x.float()[..., None, :]).sum(-1)
    return (y if bias is None else y + bias.float()).to(x.dtype)


def _mlp_activation(h: torch.Tensor, wgu: torch.Tensor, gemv: bool | str) -> torch.Tensor:
    """``up * silu(gate)`` of the fused gate/up projection; the Triton kernel applies it before it writes."""
    if gemv == "triton":
        return gemv_swiglu(h, wgu)
    gate, up = _linear(h, wgu, None, gemv).chunk(2, dim=-1)
    return up * F.silu(gate)


def auto_gemv(device: torch.device, batch_size: int) -> str | bool:
    """What ``gemv="auto"`` picks: ``"triton"`` at batch 1 on a GPU of compute capability 8.0 or newer (Ampere and
    later, where bf16 is native) with Triton installed; otherwise ``False`` (cuBLAS).

    >>> auto_gemv(torch.device("cpu"), 1)
    False
    """
    if device.type != "cuda" or batch_size != 1 or not triton_available():
        return False
    return "triton" if torch.cuda.get_device_capability(device) >= (8, 0) else False


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


def decoder_layer(x: torch.Tensor, h: torch.Tensor, pos: torch.Tensor, batch_index: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, mask: torch.Tensor, wqkv: torch.Tensor, bqkv: torch.Tensor | None,
                  wo: torch.Tensor, ln2: torch.Tensor, wgu: torch.Tensor, wd: torch.Tensor, next_norm: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, eps: float, heads: int, kv_heads: int, head_dim: int,
                  gemv: bool | str = False, sdpa: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One GLM decoder layer for one new token per sequence, writing its K/V at ``pos`` in the static cache.

    x: the residual stream [b, 1, hidden]; h: ``x`` already normalised by this layer's input norm; returns the new
    residual stream and it normalised by ``next_norm`` (the next layer's input norm, or the final norm), so the
    residual add and the next norm run as one kernel. pos, batch_index: [b];
    k_cache/v_cache: [b, kv_heads, max_len, head_dim]; mask: additive [b, 1, 1, max_len] (0 up to pos, else -inf).
    """
    b = x.shape[0]
    qkv = _linear(h, wqkv, bqkv, gemv)  # [b, 1, (heads + 2 kv_heads) * head_dim]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = _rope(q.view(b, 1, heads, head_dim).transpose(1, 2), cos, sin)
    k = _rope(k.view(b, 1, kv_heads, head_dim).transpose(1, 2), cos, sin)
    v = v.view(b, 1, kv_heads, head_dim).transpose(1, 2)
    k_cache[batch_index, :, pos] = k[:, :, 0]
    v_cache[batch_index, :, pos] = v[:, :, 0]
    if sdpa:
        attn = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)  # [b, heads, 1, hd]
    else:
        attn = _attention_reduction(q, k_cache, v_cache, mask)
    x = x + _linear(attn.transpose(1, 2).reshape(b, 1, heads * head_dim), wo, None, gemv)
    h = _rms_norm(x, ln2, eps)
    x = x + _linear(_mlp_activation(h, wgu, gemv), wd, None, gemv)
    return x, _rms_norm(x, next_norm, eps)


class FastDecoder:
    """Static-cache decoder for a loaded GLM model on one device.

    Args:
        model: a ``GlmForCausalLM`` in bf16/fp16/fp32 on one device (not quantized, not split).
        max_len: prompt + new tokens the static cache holds.
        batch_size: sequences decoded together (prompts of equal length).
        cuda_graph: capture the step as one CUDA graph (default: on a GPU).
        compile: ``torch.compile`` the layer function (default: on a GPU); fuses norms, RoPE and SiLU.
        gemv: how each projection is computed. ``"auto"`` (default, ``auto_gemv``): ``"triton"`` at batch 1 on a GPU
            of compute capability 8.0+ with Triton, else cuBLAS; if the kernels fail to build there, a warning and
            cuBLAS. ``"triton"``: glmkit's kernels for one token (``glmkit.gemv``: one pass over each weight,
            no split-K, SwiGLU applied before the write; batch 1 only); on an H100 they decode GLM-4-9B 12% faster
            than cuBLAS (150.3 vs 133.7 tok/s, benchmarks/results/decode.json). ``False``: cuBLAS (``F.linear``). ``True``: a
            multiply-and-sum that the compiler turns into one reduction kernel (-11% to +3.5% against cuBLAS).
        compile_options: extra ``torch.compile`` arguments, e.g. ``{"mode": "max-autotune-no-cudagraphs"}`` (the
            decoder captures its own graph). On H100s max-autotune was -0.7% to +3.4% against the default, run to run
            (benchmarks/results/decode_variants.json, decode.json), and autotuning added 11-18 s to building a decoder, so the
            default is the plain compile.
        attention: ``"sdpa"`` (PyTorch's fused kernel, the default) or ``"reduction"`` (multiply-and-sum the compiler
            fuses; meant for the compiled path: run eagerly it builds a [b, heads, cache, head_dim] temporary). On an
            H100 the reductions were slower: -1.8% with a 288-token cache, -15% with 2048 (decode_variants.json).
    """

    def __init__(self, model: torch.nn.Module, max_len: int = 2048, batch_size: int = 1,
                 cuda_graph: bool | None = None, compile: bool | None = None, gemv: bool | str = "auto",
                 compile_options: dict[str, Any] | None = None, attention: str = "sdpa") -> None:
        self.check(model)
        if attention not in ("sdpa", "reduction"):
            raise ValueError(f"attention must be 'sdpa' or 'reduction', not {attention!r}.")
        if gemv not in ("auto", False, True, "triton"):
            raise ValueError(f"gemv must be 'auto', 'triton', False (cuBLAS) or True (compiled reductions), not {gemv!r}.")
        device = model.get_input_embeddings().weight.device
        self.auto_gemv = gemv == "auto"
        if gemv == "auto":
            gemv = auto_gemv(device, batch_size)
        if gemv == "triton" and batch_size != 1:
            raise ValueError(f"gemv='triton' decodes one sequence (batch_size=1), got batch_size={batch_size}; "
                             "at larger batches cuBLAS (gemv=False) is the fast path.")
        if gemv == "triton" and not triton_available():
            raise RuntimeError("gemv='triton' needs Triton and a GPU (or TRITON_INTERPRET=1 on a CPU); "
                               "use gemv=False for cuBLAS.")
        self.sdpa = attention == "sdpa"
        cfg = model.config
        self.model = model
        self.device = device
        self.dtype = model.get_input_embeddings().weight.dtype
        on_gpu = self.device.type == "cuda"
        self.use_graph = on_gpu if cuda_graph is None else cuda_graph
        self.compiled = on_gpu if compile is None else compile
        self.gemv = gemv
        self.max_len, self.batch_size = max_len, batch_size
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        layers = model.model.layers
        # per layer: fused QKV weight and bias, o_proj, post-attention norm, gate_up, down, and the norm that
        # follows the layer (the next layer's input norm; the final norm after the last layer)
        next_norms = [layer.input_layernorm.weight for layer in layers[1:]] + [model.model.norm.weight]
        self.weights = []
        for layer, next_norm in zip(layers, next_norms):
            a = layer.self_attn
            bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            self.weights.append((torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), bias,
                                 a.o_proj.weight, layer.post_attention_layernorm.weight,
                                 layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight, next_norm))
        shape = (len(layers), batch_size, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            positions = torch.arange(max_len, device=self.device)[None]
            cos, sin = model.model.rotary_emb(self.k_cache[0, :1, 0], positions)  # [1, max_len, 2 * rotary/2]
        half = cos.shape[-1] // 2
        # GLM uses each frequency for an adjacent pair of dims: repeat_interleave, as its apply_rotary_pos_emb
        self.cos = cos[0, :, :half].repeat_interleave(2, dim=-1).contiguous()
        self.sin = sin[0, :, :half].repeat_interleave(2, dim=-1).contiguous()
        self.positions = torch.arange(max_len, device=self.device)
        self.batch_index = torch.arange(batch_size, device=self.device)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(batch_size, cfg.vocab_size, dtype=torch.float32, device=self.device)
        if self.compiled:
            # Every decoder compiles the same layer function for its own shapes (batch, cache length), and dynamo
            # counts them all against one limit (8 by default; fullgraph turns the 9th into an error): a notebook
            # session that tries many settings would hit it. Each shape compiles once and is reused.
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, RECOMPILE_LIMIT)
        self.layer_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = (
            torch.compile(decoder_layer, fullgraph=True, dynamic=False, **(compile_options or {}))
            if self.compiled else decoder_layer)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.ready = False  # the first prefill warms the step up (compiles, captures) once

    @staticmethod
    def check(model: torch.nn.Module) -> None:
        """Raise a clear error unless ``model`` is a GLM on one device in 16/32-bit (what this decoder runs)."""
        layer = getattr(getattr(model, "model", None), "layers", [None])[0]
        needed = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
        if layer is None or not all(hasattr(layer, n) for n in needed) or not hasattr(layer.mlp, "gate_up_proj"):
            raise TypeError(f"FastDecoder is written for GLM models (GlmForCausalLM), not {type(model).__name__}.")
        if getattr(model, "hf_device_map", None) and len(set(map(str, model.hf_device_map.values()))) > 1:
            raise ValueError("FastDecoder runs on one device; this model is split by a device map.")
        if getattr(model.config, "quantization_config", None) is not None:
            raise ValueError("FastDecoder needs 16- or 32-bit weights; this model is quantized (use generate()).")

    @torch.no_grad()
    def _step(self) -> None:
        """One token for every sequence: reads self.tokens/self.pos, writes self.logits and the cache."""
        m = self.model
        x = F.embedding(self.tokens, m.get_input_embeddings().weight)  # [b, 1, hidden]
        cos = self.cos[self.pos][:, None, None, :]
        sin = self.sin[self.pos][:, None, None, :]
        # additive mask, built once per step for all layers: 0 up to each sequence's position, -inf after
        mask = torch.zeros(self.batch_size, 1, 1, self.max_len, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill(self.positions[None, None, None, :] > self.pos[:, None, None, None], float("-inf"))
        h = _rms_norm(x, m.model.layers[0].input_layernorm.weight, self.eps)
        for i, (wqkv, bqkv, wo, ln2, wgu, wd, next_norm) in enumerate(self.weights):
            x, h = self.layer_fn(x, h, self.pos, self.batch_index, cos, sin, mask, wqkv, bqkv, wo, ln2, wgu, wd,
                                 next_norm, self.k_cache[i], self.v_cache[i], self.eps, self.heads, self.kv_heads,
                                 self.head_dim, self.gemv, self.sdpa)
        # h: the last layer's output after the final norm; lm_head runs outside the compiled layer, so the
        # reduction form (a [vocab, hidden] fp32 temporary if run eagerly) is not used for it
        head = "triton" if self.gemv == "triton" else False
        self.logits.copy_(_linear(h, m.lm_head.weight, m.lm_head.bias, head)[:, -1].float())

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up: compiles, autotunes, allocates workspaces outside the graph
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def _first_step(self) -> None:
        """Run the step once (compiling it) and capture the graph; if the Triton kernels that ``gemv="auto"`` chose
        fail on this machine, warn and use cuBLAS instead (an explicit ``gemv="triton"`` raises)."""
        try:
            self._capture() if self.use_graph else self._step()
        except Exception as exc:
            if not (self.auto_gemv and self.gemv == "triton"):
                raise
            warnings.warn(f"glmkit's Triton GEMV kernels failed here ({type(exc).__name__}: {str(exc)[:200]}); "
                          "FastDecoder uses cuBLAS instead (gemv=False).", RuntimeWarning, stacklevel=3)
            self.gemv, self.graph = False, None
            self._capture() if self.use_graph else self._step()
        self.ready = True

    def prefill(self, input_ids: torch.Tensor, chunk: int | None = None, slot: int | None = None,
                start: int = 0) -> torch.Tensor:
        """Run the prompt through the model (in ``chunk``-token pieces if given), fill the static cache,
        and return the logits of the last prompt position ``[b, vocab]``.

        ``slot``: fill only that row of the cache with one prompt ``[1, n]``, so that prompts of different lengths
        share a batch; then give ``decode_step`` a position per row. ``start``: the row already holds that many
        tokens (a long prompt prefilled one piece per call).
        """
        from glmkit.generation import cache_argument, chunked_prefill, preallocated_cache

        b, n = input_ids.shape
        if slot is None and b != self.batch_size:
            raise ValueError(f"This decoder was built for batch size {self.batch_size}, got {b} prompts.")
        if slot is not None and (b != 1 or not 0 <= slot < self.batch_size):
            raise ValueError(f"A slot takes one prompt and is one of 0..{self.batch_size - 1}; got {b} prompts "
                             f"for slot {slot}.")
        rows = slice(None) if slot is None else slice(slot, slot + 1)
        if start + n >= self.max_len:
            raise ValueError(f"The prompt has {start + n} tokens; the static cache holds {self.max_len} (raise max_len).")
        if not self.ready:
            self._first_step()  # before the cache is filled: the warm-up steps write garbage K/V at position 0
        # the prompt's K/V go straight into the static cache: no second copy of the cache, ever
        cache = preallocated_cache(self.model.config, self.max_len, self.k_cache[:, rows], self.v_cache[:, rows])
        for layer in cache.layers if start else ():  # continue after the first `start` positions
            layer.lazy_initialization(layer._given[0])
            layer.keys, layer.values = layer._k[..., :start, :], layer._v[..., :start, :]
        if n > 1:
            chunked_prefill(self.model, input_ids, chunk or n, cache=cache)
        with torch.inference_mode():
            out = self.model(input_ids[:, -1:], use_cache=True, logits_to_keep=1, **{cache_argument(self.model): cache})
        return out.logits[:, -1].float()

    def decode_step(self, tokens: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """Logits ``[b, vocab]`` for ``tokens`` ``[b]`` at position ``pos`` (one for all rows, or ``[b]``); their
        K/V go into the cache."""
        k = tokens.numel()  # rows 0..k-1 (the others: token 0 at position 0)
        self.tokens[:k].copy_(tokens.view(-1, 1))
        self.tokens[k:].zero_()
        self.pos[k:].zero_()
        if isinstance(pos, torch.Tensor):
            self.pos[:k].copy_(pos)
        else:
            self.pos[:k].fill_(pos)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.logits[:k]

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, eos_token_ids: list[int] | None = None, ignore_eos: bool = False,
               prefill_chunk: int | None = None, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token ``[b]`` for each step (greedy at temperature 0, else sampled with top-p)."""
        from glmkit.generation import eos_token_ids as model_eos
        from glmkit.generation import pick_token

        input_ids = input_ids.to(self.device)
        n = input_ids.shape[1]
        if n + max_new_tokens > self.max_len:
            raise ValueError(f"{n} prompt + {max_new_tokens} new tokens exceed max_len={self.max_len}.")
        eos = torch.tensor(eos_token_ids or model_eos(self.model), device=self.device)
        logits = self.prefill(input_ids, prefill_chunk)
        done = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        for i in range(max_new_tokens):
            token = pick_token(logits, temperature, top_p, generator)
            yield token
            if not ignore_eos:
                done |= torch.isin(token, eos)
                if bool(done.all()):
                    return
            if i + 1 < max_new_tokens:
                logits = self.decode_step(token, n + i)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 128, **kwargs: Any) -> torch.Tensor:
        """Prompt + new tokens ``[b, n + new]`` (stops early when every sequence said an end token)."""
        new = list(self.stream(input_ids, max_new_tokens, **kwargs))
        return torch.cat([input_ids.to(self.device), torch.stack(new, dim=1)], dim=1)

    def tokens_per_second(self, prompt_len: int = 32, new_tokens: int = 256) -> dict[str, float]:
        """Decode speed on random prompt ids after a warm-up (compile and graph capture excluded): time to first
        token (prefill) and decode tok/s summed over the batch."""
        ids = torch.randint(0, 1000, (self.batch_size, prompt_len), device=self.device)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        for _ in self.stream(ids, 3, ignore_eos=True):  # warm-up: compiles the layer, captures the graph
            pass
        sync()
        t0 = time.perf_counter()
        it = self.stream(ids, new_tokens, ignore_eos=True)
        next(it)
        sync()
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        count = sum(1 for _ in it)
        sync()
        decode = time.perf_counter() - t1
        return {"ttft_s": ttft, "decode_tok_s": self.batch_size * count / decode if decode else 0.0}
