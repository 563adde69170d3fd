"""The ``glmkit`` command line: ``env``, ``make-tiny PATH``, ``plan --devices 12GiB 12GiB``, ``generate [--tp 2]``.

Run ``glmkit --help`` for the list; each subcommand prints a table and exits 0, or prints the
error's message (which names the fix) and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from glmkit.vocabulary import ALLOCATORS, QUANTIZATION_CHOICES


def _env(args: argparse.Namespace) -> None:
    from glmkit.env import environment_report

    print(environment_report())


def _make_tiny(args: argparse.Namespace) -> None:
    from glmkit.models import build_tiny_checkpoint

    path = build_tiny_checkpoint(args.path, seed=args.seed, num_hidden_layers=args.layers)
    print(f"tiny GLM checkpoint written to {path}")


def _plan(args: argparse.Namespace) -> None:
    from glmkit.models import glm4_9b_chat_config
    from glmkit.planning import max_context, plan_memory

    config = args.model or glm4_9b_chat_config()
    kw = dict(dtype=args.dtype, quantization=args.quantization, batch_size=args.batch,
              prefill_chunk=args.prefill_chunk, allocator=args.allocator, fast_decode=args.fast_decode)
    plan = plan_memory(config, args.devices, context_len=args.context, **kw)
    print(plan)
    print()
    print(plan.advice())
    print(f"\nlongest context that fits: {max_context(config, args.devices, **kw)} tokens")
    if args.for_server == "vllm":
        from glmkit.vllm_command import VLLM_MODEL, vllm_serve_line

        line = vllm_serve_line(plan, model=args.model or VLLM_MODEL, gpu_memory=args.gpu_memory)
        print(f"\nthe same workload on vLLM (same names and API for clients):\n{line}")


def _relaunched_for_tp(args: argparse.Namespace, model_path: str) -> bool:
    """With ``--tp N`` outside torchrun: check N against the model's KV heads, rerun this command in N processes
    under torch.distributed.run, and return True (the processes did the work)."""
    from glmkit import parallel

    if args.tp <= 1 or parallel.in_torchrun():
        return False
    from transformers import AutoConfig

    problem = parallel.tp_problem(AutoConfig.from_pretrained(model_path), args.tp)
    if problem:
        raise ValueError(problem)
    code = parallel.relaunch(args.tp, args.argv)
    if code:
        raise RuntimeError(f"the {args.tp} tensor-parallel processes exited with code {code}")
    return True


FAST_DECODE_HELP = ("the fast path: static cache and CUDA graphs (FastDecoder: one per GPU of a --device-map split; "
                    "with --tp N, TPDecoder: every layer split over N processes); 16/32-bit weights, more GPU memory")

DEVICE_MAP_HELP = "auto, balanced, sequential, cpu, cuda:0, or layers per GPU like 20,20"


def device_map_option(value: str | None, model_path: str) -> object:
    """``--device-map``: a name accelerate/transformers know, or ``"20,20"`` (layers on GPUs 0, 1, ...)."""
    if not value or "," not in value:
        return value
    from glmkit.device_map import split_layers

    try:
        counts = [int(x) for x in value.split(",")]
    except ValueError:
        raise ValueError(f"--device-map {value!r}: layers per GPU are whole numbers, like 20,20.") from None
    return split_layers(model_path, counts)


def _command_model(args: argparse.Namespace) -> tuple[object, str]:
    """The model for ``generate``/``bench``: split across torchrun processes, placed by ``--device-map``,
    or on one device. ``None`` when ``--tp`` reran the command in other processes."""
    from glmkit import parallel
    from glmkit.loading import load_model
    from glmkit.models import default_model_path

    model_path = args.model or str(default_model_path())
    if getattr(args, "device_map", None) and args.tp > 1:
        raise ValueError("use --tp or --device-map, not both: tensor parallelism places the model itself.")
    if _relaunched_for_tp(args, model_path):
        return None, model_path
    if parallel.in_torchrun() and getattr(args, "fast_decode", False):  # TPDecoder takes its rank's slices from it
        return load_model(model_path, dtype=args.dtype, device_map="cpu"), model_path
    if parallel.in_torchrun():
        return parallel.load_tp_model(model_path, args.dtype), model_path
    device_map = device_map_option(getattr(args, "device_map", None), model_path)
    return load_model(model_path, dtype=args.dtype, device_map=device_map), model_path


def _generate(args: argparse.Namespace) -> None:
    """Greedy continuation of a chat message (or raw token ids), on one process or tensor-parallel."""
    import json

    import torch

    from glmkit import parallel
    from glmkit.generation import eos_token_ids
    from glmkit.loading import load_tokenizer

    model, model_path = _command_model(args)
    if model is None:
        return
    tokenizer = load_tokenizer(model_path)
    device = model.get_input_embeddings().weight.device
    if args.prompt_ids:
        ids = torch.tensor([args.prompt_ids], device=device)
    else:
        from glmkit.generation import encode_chat

        ids = encode_chat(tokenizer, [{"role": "user", "content": args.prompt}], device=device)["input_ids"]
    max_len = ids.shape[1] + args.max_new_tokens
    sampling = {"temperature": args.temperature}
    if args.fast_decode and parallel.in_torchrun():  # every rank holds its slices; all pick the same tokens
        out = parallel.tp_decoder(model, max_len).generate(ids, args.max_new_tokens, eos=eos_token_ids(model),
                                                            seed=args.seed, **sampling)
    elif args.fast_decode:  # static cache and CUDA graphs, one per device of a split; stops at an end token
        from glmkit.fast_decode import FastDecoder

        generator = torch.Generator(device).manual_seed(args.seed) if args.temperature > 0 else None
        out = FastDecoder(model, max_len=max_len).generate(ids, args.max_new_tokens, generator=generator, **sampling)
    else:
        torch.manual_seed(args.seed)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=args.temperature > 0, **sampling if args.temperature > 0 else {})
    new = out[0, ids.shape[1]:].tolist()
    agree = parallel.ranks_agree(new)
    if parallel.rank() == 0:  # only rank 0 talks to the user
        text = tokenizer.decode(new, skip_special_tokens=True).lstrip("\n")
        result = {"tokens": new, "text": text, "processes": parallel.world_size(), "ranks_agree": agree}
        print(json.dumps(result) if args.json else text)


def _bench(args: argparse.Namespace) -> None:
    """Decode speed and peak memory of plain generate() (or the fast path): one device, a layer split, or
    tensor-parallel."""
    import json

    import torch

    from glmkit import parallel
    from glmkit.bench import measure_decode

    model, _ = _command_model(args)
    if model is None:
        return
    path = "fast" if args.fast_decode else "generate"
    if args.fast_decode and parallel.in_torchrun():  # the TP fast decoder (warms itself up, as FastDecoder)
        decoder = parallel.tp_decoder(model, args.prompt_len + args.new_tokens, args.batch)
        row = {"path": "fast (tensor parallel)", "batch_size": args.batch, "prompt_len": args.prompt_len,
               **decoder.tokens_per_second(args.prompt_len, args.new_tokens)}
    else:
        if not args.fast_decode:  # (the fast path warms itself up: compile and graph capture are not timed)
            measure_decode(model, "generate", args.batch, args.prompt_len, 4)  # warm-up
        row = measure_decode(model, path, args.batch, args.prompt_len, args.new_tokens)
    row["mode"] = (f"tensor parallel x{parallel.world_size()}" if parallel.in_torchrun() else
                   f"device map {args.device_map}" if args.device_map else "one device")
    cuda = torch.cuda.is_available()
    peaks = {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())} if cuda else {}
    if parallel.in_torchrun() and torch.distributed.is_initialized():
        gathered: list = [None] * parallel.world_size()
        torch.distributed.all_gather_object(gathered, {"rank": parallel.rank(), "peak_allocated": peaks})
        row["per_rank"] = gathered
    else:
        row["peak_allocated"] = peaks
    if parallel.rank() == 0:
        print(json.dumps(row) if args.json else row)


def _serve(args: argparse.Namespace) -> None:
    import os

    from glmkit.env import use_expandable_segments
    from glmkit.loading import load_model, load_tokenizer
    from glmkit.models import default_model_path
    from glmkit.server import default_batch_size, serve, served_model_names
    from glmkit.server_guard import check_exposure

    api_key = args.api_key or os.environ.get("GLMKIT_API_KEY")
    check_exposure(args.host, api_key, args.allow_unauthenticated)  # refuse before minutes of loading
    use_expandable_segments()
    model_path = args.model or str(default_model_path())
    names = served_model_names(model_path, args.served_model_name)
    device_map = device_map_option(args.device_map, model_path)
    model = load_model(model_path, dtype=args.dtype, device_map=device_map, quantization=args.quantization)
    max_context = args.max_context or min(4096, int(getattr(model.config, "max_position_embeddings", 4096)))
    batch = args.max_batch_size or default_batch_size(model.config, max_context, quantization=args.quantization)
    print(f"glmkit serve: {', '.join(names)} on http://{args.host}:{args.port}/v1, batch {batch}, context "
          f"{max_context}" + (", API key required" if api_key else "") + (", fast decode" if args.fast_decode else ""),
          flush=True)
    serve(model, load_tokenizer(model_path), args.host, args.port, api_key, names, batch, max_context,
          args.fast_decode, args.allowed_hosts, args.allowed_origins or (), args.allow_unauthenticated)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="library versions and GPUs with their free memory")
    p.set_defaults(func=_env)

    p = sub.add_parser("make-tiny", help="write a tiny random GLM checkpoint (tests, CI, laptops)")
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=6)
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser("plan", help="memory plan per GPU for GLM-4-9B-Chat (or --model PATH), no GPU needed")
    p.add_argument("--model", help="checkpoint folder (only its config.json is read); default GLM-4-9B-Chat")
    p.add_argument("--devices", nargs="+", default=["24GiB"], help="budget per GPU, e.g. 12GiB 12GiB")
    p.add_argument("--context", type=int, default=8192, help="prompt + new tokens per sequence")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES)
    p.add_argument("--prefill-chunk", type=int, help="prefill in chunks of this many tokens")
    p.add_argument("--allocator", choices=ALLOCATORS,
                   help="PyTorch's caching allocator to plan for (default: $PYTORCH_CUDA_ALLOC_CONF if set, else "
                        "expandable, which glmkit sets in every process it starts)")
    p.add_argument("--fast-decode", action="store_true",
                   help="budget the fast decode path's extra memory (fused q/k/v copies, fp32 logits)")
    p.add_argument("--for", dest="for_server", choices=["vllm"], help="also print the `vllm serve` command line")
    p.add_argument("--gpu-memory", help="each card's whole memory, when --devices budgets only part of it (--for vllm)")
    p.set_defaults(func=_plan)

    p = sub.add_parser("generate", help="greedy reply to --prompt; --tp N splits the model over N processes")
    p.add_argument("--model", help="checkpoint folder (default: $GLMKIT_MODEL or the tiny trained GLM)")
    p.add_argument("--prompt", default="How many layers does GLM-4-9B-Chat have?")
    p.add_argument("--prompt-ids", nargs="+", type=int, help="raw token ids instead of a chat message")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampled")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (every --tp process uses the same)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel processes (GLM-4-9B: 1 or 2)")
    p.add_argument("--device-map", help=DEVICE_MAP_HELP + " (instead of --tp)")
    p.add_argument("--fast-decode", action="store_true", help=FAST_DECODE_HELP)
    p.add_argument("--json", action="store_true", help="print tokens and text as JSON")
    p.set_defaults(func=_generate)

    p = sub.add_parser("bench", help="decode tok/s and peak memory of generate() or --fast-decode; --tp N or a layer split")
    p.add_argument("--model", help="checkpoint folder (default: $GLMKIT_MODEL or the tiny trained GLM)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel processes (GLM-4-9B: 1 or 2)")
    p.add_argument("--device-map", help=DEVICE_MAP_HELP + " (instead of --tp)")
    p.add_argument("--fast-decode", action="store_true", help=FAST_DECODE_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible API server (loopback by default)")
    p.add_argument("--model", help="checkpoint folder (default: $GLMKIT_MODEL or the tiny trained GLM)")
    p.add_argument("--served-model-name", "--model-name", nargs="+", metavar="NAME",
                   help="names clients may ask for (default: glm-4, glm-4-9b-chat and the model folder's name)")
    p.add_argument("--device-map", help=DEVICE_MAP_HELP)
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set GLMKIT_API_KEY)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="listen beyond loopback without an API key (refused otherwise)")
    p.add_argument("--allowed-hosts", nargs="+", metavar="HOST",
                   help="Host header names served (default: localhost names on loopback, any elsewhere)")
    p.add_argument("--allowed-origins", nargs="+", metavar="ORIGIN",
                   help="web page origins allowed to call the server, like http://localhost:3000 (default: none)")
    p.add_argument("--max-batch-size", type=int, help="default: the largest batch the planner fits on the GPUs")
    p.add_argument("--max-context", type=int, help="prompt + new tokens per request (default 4096)")
    p.add_argument("--fast-decode", action="store_true",
                   help="decode batches with the fast path: static cache, CUDA graphs (one GPU or a --device-map split, "
                        "16/32-bit; more GPU memory)")
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # --tp N reruns the same command line in N processes
    from glmkit.parallel import leave_process_group

    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"glmkit {args.command}: {exc}", file=sys.stderr)
        return 2
    finally:
        leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
