"""Where the nf4 fast path's logits gather their error, layer by layer, against bf16 arithmetic on the same weights.

GLM-4-9B (random weights), bitsandbytes nf4. Three decoders run the same prompts and teacher-forced tokens step by step
without CUDA graphs (each with its default kernels): an fp32 decoder on the nf4 weights dequantized in fp32 (cuBLAS, TF32
off: the reference), the nf4 fast path, and the bf16 fast path on those weights rounded to bf16 (the yardstick). Each
decoder layer's output (the residual stream) is recorded at every step:

* ``free``: each decoder runs on its own, and each layer's relative error against the reference is the error it has
  gathered so far (the prompt's cache included);
* ``fed``: each layer is given the reference's input (rounded to 16 bits) and the decoder's cache is the reference's
  after the prompt, so a layer's error is what that layer adds alone.

    PYTHONPATH=.:benchmarks python benchmarks/nf4_layer_errors.py --checkpoint /tmp/glm9b   # about 2 minutes, an H200
Writes benchmarks/results/nf4_layer_errors.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import gc
import statistics
from collections.abc import Callable
from typing import Any

import torch
from nf4_decode import put_nf4_weights
from nf4_fused import gpu_uuids

import glmkit.fast_decode as fast_decode
from glmkit.bench import save_result
from glmkit.env import use_expandable_segments
from glmkit.gemv import device_name
from glmkit.gemv4bit import Packed4bit, normed_stream
from glmkit.loading import load_model
from glmkit.models import ensure_random_checkpoint
from glmkit.quantization import load_precision

PROMPT, FORCED, PROMPTS = 32, 8, 4


class Recorder:
    """Wraps ``fast_decode.decoder_layer`` for one decode step at a time: keeps each layer's output (``outputs``, fp32)
    and, with ``feed`` (each layer's input), gives each layer the input given instead of the layer before's output."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.norms = [layer.input_layernorm.weight for layer in model.model.layers]  # (for a step that does not fuse)
        self.eps = model.config.rms_norm_eps
        self.outputs: list[torch.Tensor] = []
        self.feed: list[torch.Tensor] | None = None
        self.original: Callable[..., Any] = fast_decode.decoder_layer

    def __call__(self, x: torch.Tensor, h: Any, *args: Any) -> tuple[torch.Tensor, Any]:
        if self.feed is not None:
            j, in_norm = len(self.outputs), args[20]  # (decoder_layer's arguments after x and h: in_norm 20th, wo 7th)
            x = self.feed[j].to(x.dtype).view_as(x)
            if in_norm is None:  # the norm runs apart: h is x normalised
                h = fast_decode.rms_norm(x, self.norms[j], self.eps)
            else:  # the GEMVs normalise x (4 bits: from its NormedStream)
                h = normed_stream(x, in_norm) if isinstance(args[7], Packed4bit) else x
        out = self.original(x, h, *args)
        self.outputs.append(out[0].float().flatten().clone())
        return out


def run(model: torch.nn.Module, ref: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """Each layer's output at each forced step of each prompt (``outputs[prompt][step][layer]``), each prompt's
    cache after its prefill and each step's logits; with ``ref`` (a run of the reference), each layer is fed the
    reference's input and the prompt's cache is the reference's."""
    recorder = Recorder(model)
    fast_decode.decoder_layer = recorder
    result: dict[str, Any] = {"outputs": [], "caches": [], "logits": []}
    try:
        decoder = fast_decode.FastDecoder(model, max_len=PROMPT + FORCED + 8, cuda_graph=False, **options)
        emb = model.get_input_embeddings().weight
        for seed in range(PROMPTS):
            ids = torch.randint(0, 1000, (1, PROMPT + FORCED), generator=torch.Generator().manual_seed(seed))
            ids = ids.to(decoder.device)
            decoder.prefill(ids[:, :PROMPT])
            if ref is not None:
                for j, (k, v) in enumerate(ref["caches"][seed]):
                    decoder.k_layers[j][0, :, :PROMPT].copy_(k)
                    decoder.v_layers[j][0, :, :PROMPT].copy_(v)
            result["caches"].append([(k[0, :, :PROMPT].float().clone(), v[0, :, :PROMPT].float().clone())
                                     for k, v in zip(decoder.k_layers, decoder.v_layers)])
            steps = []
            for t in range(FORCED):
                token = ids[0, PROMPT + t:PROMPT + t + 1]
                if ref is not None:  # the embedding row, then each layer's reference output
                    recorder.feed = [emb[token].float()] + ref["outputs"][seed][t][:-1]
                recorder.outputs = []
                result["logits"].append(decoder.decode_step(token, PROMPT + t)[0].float().clone())
                steps.append(recorder.outputs)
            result["outputs"].append(steps)
        del decoder
    finally:
        fast_decode.decoder_layer = recorder.original
    return result


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def profile(run_: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Per layer, the median over every step of the relative error of its output against the reference's; the
    prompt's cache (keys and values of all layers) and the logits likewise."""
    layers = len(ref["outputs"][0][0])
    per_layer = [statistics.median(rel(run_["outputs"][p][t][j], ref["outputs"][p][t][j])
                                   for p in range(PROMPTS) for t in range(FORCED)) for j in range(layers)]
    cache = statistics.median(rel(torch.stack([k for k, _ in run_["caches"][p]]), torch.stack([k for k, _ in ref["caches"][p]]))
                              for p in range(PROMPTS))
    logits = statistics.median(rel(a, b) for a, b in zip(run_["logits"], ref["logits"]))
    return {"layer_rel_err": per_layer, "prompt_keys_rel_err": cache, "logits_rel_err": logits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    args = ap.parse_args()
    use_expandable_segments()
    if not torch.cuda.is_available():
        raise SystemExit("nf4_layer_errors.py measures a GPU; this machine has none.")
    ensure_random_checkpoint(args.checkpoint)
    torch.backends.cuda.matmul.allow_tf32 = False
    nf4 = load_precision(args.checkpoint, "nf4", device_map="cuda:0")
    fp32 = put_nf4_weights(load_model(args.checkpoint, dtype=torch.float32, device_map="cuda:0"), nf4)
    ref = run(fp32, gemv=False, compile=False)
    del fp32
    gc.collect()
    torch.cuda.empty_cache()
    bf16 = put_nf4_weights(load_precision(args.checkpoint, "bf16", device_map="cuda:0"), nf4)
    rows: dict[str, Any] = {}
    for mode in ("free", "fed"):
        feed = ref if mode == "fed" else None
        rows[f"nf4 fast, {mode}"] = profile(run(nf4, feed), ref)
        rows[f"bf16 fast on the nf4 weights, {mode}"] = profile(run(bf16, feed), ref)
        rows[f"bf16 cuBLAS on the nf4 weights, {mode}"] = profile(run(bf16, feed, gemv=False, compile=False), ref)
        print({k: (v["logits_rel_err"], v["prompt_keys_rel_err"]) for k, v in rows.items()}, flush=True)
    save_result("nf4_layer_errors", {
        "method": __doc__.split("\n\n")[1].replace("\n", " "), "device": device_name(), "gpu_uuids": gpu_uuids(),
        "prompts": PROMPTS, "prompt_tokens": PROMPT, "forced_steps": FORCED, "rows": rows})


if __name__ == "__main__":
    main()
