"""The ``glmkit`` command line: ``env``, ``make-tiny``, ``plan``, ``generate``, ``bench``, ``serve`` and ``tune``.

Run ``glmkit --help`` for the list, ``glmkit COMMAND --help`` for one command; each command prints its result and
exits 0, or prints the error's message (which names the flag and the fix) and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from glmkit.vocabulary import ALLOCATORS, QUANTIZATION_CHOICES

# Each command imports what it needs inside its function: `glmkit --help` and a mistyped flag answer
# without loading transformers, the model code or the server (and a test can stand in for the loader).

DESCRIPTION = "Plan, run, measure and serve GLM-4-9B-Chat on the GPUs you have (or the tiny GLM-4 on a CPU)."
EPILOG = """examples:
  glmkit plan --devices 12GiB 12GiB --context 32768
  glmkit generate --prompt "How do I split GLM-4 over two GPUs?"
  glmkit serve --device-map 20,20 --port 8000

glmkit COMMAND --help shows a command's flags."""
TINY_NOTE = ("no --model and no GLMKIT_MODEL given: answering with the shipped tiny GLM-4 ({params} parameters, "
             "trained on the kit's own notes), not GLM-4-9B-Chat; pass --model PATH or set GLMKIT_MODEL to a local "
             "GLM-4-9B-Chat checkpoint")


def positive_int(value: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def memory_budget(value: str) -> str:
    """argparse type: a budget with its unit ("12GiB", "24GB"); a bare number would silently be bytes."""
    from glmkit.planning import PlanningError, parse_size

    if value.strip().replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(
            f"{value!r} has no unit: write {value}GiB (GiB = 2**30 bytes, as nvidia-smi counts) or {value}GB")
    try:
        parse_size(value)
    except PlanningError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def checkpoint_folder(value: str) -> str:
    """argparse type: a local checkpoint folder with a config.json (nothing is downloaded)."""
    path = Path(value).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a folder on this machine: give a local checkpoint folder (with config.json); "
            "glmkit downloads nothing")
    if not (path / "config.json").exists():
        raise argparse.ArgumentTypeError(f"{value!r} has no config.json: give the checkpoint folder itself")
    return str(path)


def _model_path(args: argparse.Namespace) -> str:
    """``--model``, else ``$GLMKIT_MODEL``, else the shipped tiny GLM-4 (said on stderr: it is not the real model)."""
    if args.model:
        return args.model
    from glmkit.models import default_model_path  # (transformers: only when the default model is needed)

    if not os.environ.get("GLMKIT_MODEL"):
        args.tiny_default = True
    return str(default_model_path())


def _say_tiny(args: argparse.Namespace, model: object) -> None:
    from glmkit import parallel

    if getattr(args, "tiny_default", False) and parallel.rank() == 0:
        params = sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]
        print(f"glmkit {args.command}: " + TINY_NOTE.format(params=f"{params / 1e6:.1f} M"), file=sys.stderr)


def _env(args: argparse.Namespace) -> None:
    from glmkit.env import environment_report

    print(environment_report())


def _make_tiny(args: argparse.Namespace) -> None:
    from glmkit.models import build_tiny_checkpoint

    path = build_tiny_checkpoint(args.path, seed=args.seed, num_hidden_layers=args.layers)
    print(f"tiny GLM checkpoint written to {path}")


def _tune(args: argparse.Namespace) -> None:
    from glmkit.gemv_tuning import table_configs, tune, write_table
    from glmkit.step_tuning import tune_step

    kernels = args.kernels.split(",")
    rows = tune(kernels, tp=args.tp)
    path = write_table(table_configs(rows), args.output)  # (kept, whatever the step's tuning meets)
    if args.tp == 1 and {"bf16", "fp16"} & set(kernels):  # the 16-bit CUDA kernels' shapes, in the decode step
        try:
            step = tune_step()
        except RuntimeError as exc:  # (out of memory on a busy card, a CUDA error: the shapes above are written)
            print(f"16-bit CUDA kernels: not tuned ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); their "
                  "defaults serve. Run `glmkit tune --kernels bf16` again on an idle GPU.")
            step = []
        rows += step
        path = write_table(table_configs(step), args.output)
    print(f"launch shapes of {len(rows)} kernel launches written to {path}; glmkit's kernels use them on this card")


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
    longest = max_context(config, args.devices, **kw)
    print(f"\nlongest context that fits: {longest} tokens" if longest else "\n" + _nothing_fits(config, args.devices, kw))
    if args.for_server == "vllm":
        from glmkit.vllm_command import VLLM_MODEL, vllm_serve_line

        line = vllm_serve_line(plan, model=args.model or VLLM_MODEL, gpu_memory=args.gpu_memory)
        print(f"\nthe same workload on vLLM (same names and API for clients):\n{line}")


def _nothing_fits(config: object, devices: list[str], kw: dict) -> str:
    """Why not even a 1-token context fits: which device and by how much."""
    from glmkit.planning import plan_memory
    from glmkit.tables import gib

    one = plan_memory(config, devices, context_len=1, **kw)
    why = [f"{d.name} needs {gib(d.total)} but has {gib(d.budget)}" for d in one.devices if not d.fits] + one.problems
    return ("no context fits, not even 1 token: " + "; ".join(why) +
            ". The weights and fixed costs alone are too large: see the fixes above.")


def _relaunched_for_tp(args: argparse.Namespace, follow_parent: bool = False) -> bool:
    """With ``--tp N`` outside torchrun: check the flags and N against the model's KV heads, rerun this command in N
    processes under torch.distributed.run, and return True (the processes did the work).

    Called before a command imports transformers or the model code: this launcher only starts the processes and
    waits for them, so they start at once (about 3 s sooner on 2 CPU cores) and it holds no library it does not use."""
    from glmkit import parallel

    if args.tp <= 1 or parallel.in_torchrun():
        return False
    _check_tp(args)
    problem = parallel.tp_problem(parallel.checkpoint_heads(_model_path(args)), args.tp)
    if problem:
        raise ValueError(problem)
    code = parallel.relaunch(args.tp, args.argv, follow_parent)
    if code:
        raise RuntimeError(f"the {args.tp} tensor-parallel processes exited with code {code}")
    return True


FAST_DECODE_HELP = ("the fast path: static cache and CUDA graphs (FastDecoder: one per GPU of a --device-map split; "
                    "with --tp N, TPDecoder: every layer split over N processes); 16/32-bit weights (FastDecoder: "
                    "nf4/fp4 too), more GPU memory")
DEVICE_MAP_HELP = "auto, balanced, sequential, cpu, cuda:0, or layers per GPU like 20,20"


def _add_model_option(p: argparse.ArgumentParser) -> None:
    """``--model``, as ``generate``, ``bench`` and ``serve`` take it (``plan`` reads only the config: its own help)."""
    p.add_argument("--model", type=checkpoint_folder,
                   help="checkpoint folder (default: $GLMKIT_MODEL, else the tiny trained GLM-4)")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options ``generate`` and ``bench`` share: how the model is loaded, split and decoded."""
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel processes (GLM-4-9B: 1 or 2)")
    p.add_argument("--device-map", help=DEVICE_MAP_HELP + " (instead of --tp)")
    p.add_argument("--fast-decode", action="store_true", help=FAST_DECODE_HELP)
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES, help="load in 8 or 4 bits (bitsandbytes); "
                   "--fast-decode runs nf4/fp4 with glmkit's 4-bit kernels")


def device_map_option(value: str | None, model_path: str) -> object:
    """``--device-map``: a name accelerate/transformers know, or ``"20,20"`` (layers on GPUs 0, 1, ...)."""
    if not value or "," not in value:
        return value
    from transformers import AutoConfig

    from glmkit.device_map import LayerCountError, split_layers

    try:
        counts = [int(x) for x in value.split(",")]
    except ValueError:
        raise ValueError(f"--device-map {value!r}: layers per GPU are whole numbers, like 20,20.") from None
    try:
        return split_layers(AutoConfig.from_pretrained(model_path), counts)
    except LayerCountError as exc:  # split_layers' check, in the flag's words
        example = ",".join(str(c) for c in exc.suggestion)
        raise ValueError(f"--device-map {value}: the layers per GPU add up to {sum(exc.counts)}, but the model has "
                         f"{exc.n_layers} decoder layers; e.g. --device-map {example}.") from None


def _check_tp(args: argparse.Namespace) -> None:
    """``--tp N`` places the model itself, in 16/32 bits: refuse the flags that place or quantize it otherwise."""
    if getattr(args, "device_map", None):
        raise ValueError("use --tp or --device-map, not both: tensor parallelism places the model itself.")
    if getattr(args, "quantization", None):
        raise ValueError("--quantization loads the model in one process: use --device-map (e.g. 20,20) instead of --tp.")


def _command_model(args: argparse.Namespace) -> tuple[object, str]:
    """The model for ``generate``/``bench`` in this process: its rank's share under torchrun, placed by
    ``--device-map``, or on one device (``--tp N`` outside torchrun: ``_relaunched_for_tp`` first)."""
    from glmkit import parallel
    from glmkit.loading import load_model

    model_path = _model_path(args)
    if args.tp > 1:
        _check_tp(args)
    quantization = getattr(args, "quantization", None)
    if parallel.in_torchrun() and getattr(args, "fast_decode", False):  # TPDecoder takes its rank's slices from it
        model = load_model(model_path, dtype=args.dtype, device_map="cpu")
    elif parallel.in_torchrun():
        model = parallel.load_tp_model(model_path, args.dtype)
    else:
        device_map = device_map_option(getattr(args, "device_map", None), model_path)
        model = load_model(model_path, dtype=args.dtype, device_map=device_map, quantization=quantization)
    _say_tiny(args, model)
    return model, model_path


def _generate(args: argparse.Namespace) -> None:
    """Greedy continuation of a chat message (or raw token ids), on one process or tensor-parallel."""
    if _relaunched_for_tp(args):  # (before the imports below: the launcher needs none of them)
        return
    import json

    import torch

    from glmkit import parallel
    from glmkit.engine import Engine
    from glmkit.generation import chat_ids, clean_reply, eos_token_ids
    from glmkit.loading import load_tokenizer

    model, model_path = _command_model(args)
    tokenizer = load_tokenizer(model_path)
    if args.prompt_ids:
        ids = list(args.prompt_ids)
    else:
        ids = chat_ids(tokenizer, [{"role": "user", "content": args.prompt}])
    max_len = len(ids) + args.max_new_tokens
    if args.fast_decode and parallel.in_torchrun():  # every rank holds its slices; all pick the same tokens
        device, eos = model.get_input_embeddings().weight.device, list(eos_token_ids(model))
        out = parallel.tp_decoder(model, max_len).generate(torch.tensor([ids], device=device), args.max_new_tokens,
                                                            eos=eos, seed=args.seed, temperature=args.temperature)
        new = out[0, len(ids):].tolist()
        new = new[:next((i for i, t in enumerate(new) if t in eos), len(new))]  # the reply, without its end token
        text = clean_reply(tokenizer.decode(new, skip_special_tokens=True))
    else:  # the same engine as the server and the chat widget (under torchrun every rank runs its own, in step)
        engine = Engine(model, tokenizer, max_batch_size=1, max_context=max_len, fast_decode=args.fast_decode)
        try:
            req = engine.submit(ids, max_tokens=args.max_new_tokens, temperature=args.temperature,
                                seed=args.seed).wait()
        finally:
            engine.close()
        if req.error:
            raise SystemExit(f"generation failed: {req.error}")
        new, text = req.tokens, req.text
    agree = parallel.ranks_agree(new)
    if parallel.rank() == 0:  # only rank 0 talks to the user
        result = {"tokens": new, "text": text, "processes": parallel.world_size(), "ranks_agree": agree}
        print(json.dumps(result) if args.json else text)


def _bench(args: argparse.Namespace) -> None:
    """Decode speed and peak memory of plain generate() (or the fast path): one device, a layer split, or
    tensor-parallel."""
    if _relaunched_for_tp(args):  # (before the imports below: the launcher needs none of them)
        return
    import json

    import torch

    from glmkit import parallel
    from glmkit.bench import measure_decode

    model, _ = _command_model(args)
    path = "fast" if args.fast_decode else "generate"
    if args.fast_decode and parallel.in_torchrun():  # the TP fast decoder (warms itself up, as FastDecoder)
        decoder = parallel.tp_decoder(model, args.prompt_len + args.new_tokens, args.batch)
        row = {"path": "fast (tensor parallel)", "batch_size": args.batch, "prompt_len": args.prompt_len,
               "allreduce": decoder.allreduce.describe(), **decoder.tokens_per_second(args.prompt_len, args.new_tokens)}
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

    from glmkit import parallel
    from glmkit.server_guard import check_exposure

    api_key = args.api_key or os.environ.get("GLMKIT_API_KEY")
    check_exposure(args.host, api_key, args.allow_unauthenticated)  # refuse before minutes of loading
    # (the launcher goes when its parent goes; it imports nothing below: each process does)
    if _relaunched_for_tp(args, follow_parent=True):
        return
    from glmkit.env import use_expandable_segments
    from glmkit.loading import load_model, load_tokenizer
    from glmkit.server import default_batch_size, serve, serve_tp, served_model_names

    use_expandable_segments()
    model_path = _model_path(args)
    names = served_model_names(model_path, args.served_model_name)
    if args.tp > 1:
        _check_tp(args)
        args.fast_decode = True  # tensor parallelism is the TP fast decoder's
        parallel.die_with_parent()  # a worker goes with torchrun, even if torchrun is killed outright
        model = load_model(model_path, dtype=args.dtype, device_map="cpu")  # each rank takes its slices from it
    else:
        device_map = device_map_option(args.device_map, model_path)
        model = load_model(model_path, dtype=args.dtype, device_map=device_map, quantization=args.quantization)
    _say_tiny(args, model)
    max_context = args.max_context or min(4096, int(getattr(model.config, "max_position_embeddings", 4096)))
    batch = args.max_batch_size or default_batch_size(model.config, max_context, quantization=args.quantization,
                                                      fast_decode=args.fast_decode,
                                                      gpus_used=args.tp if args.tp > 1 else None)
    if parallel.rank() == 0:
        print(f"glmkit serve: {', '.join(names)} on http://{args.host}:{args.port}/v1, batch {batch}, context "
              f"{max_context}" + (", API key required" if api_key else "") + (", fast decode" if args.fast_decode else "")
              + (f", tensor parallel x{args.tp}" if args.tp > 1 else ""), flush=True)
    kwargs = dict(host=args.host, port=args.port, api_key=api_key, model_name=names, max_context=max_context,
                  fast_decode=args.fast_decode, allowed_hosts=args.allowed_hosts,
                  allowed_origins=args.allowed_origins or (), allow_unauthenticated=args.allow_unauthenticated)
    if args.tp > 1:
        kwargs.pop("fast_decode")
        serve_tp(model, load_tokenizer(model_path), max_batch_size=batch, **kwargs)
    else:
        serve(model, load_tokenizer(model_path), max_batch_size=batch, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmkit", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("env", help="library versions and GPUs with their free memory")
    p.set_defaults(func=_env)

    p = sub.add_parser("make-tiny", help="write a tiny random GLM checkpoint (tests, CI, laptops)")
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=positive_int, default=6)
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser("tune", help="measure the fastest GEMV kernel launch shapes on this GPU (a minute or two "
                                    "per kernel) and keep them in glmkit's cache")
    p.add_argument("--kernels", default="bf16,nf4",
                   help="comma-separated: bf16, fp16, nf4, fp4 (fp16 takes bf16's shapes unless given; 4-bit "
                        "kernels also time each nibble lookup and keep the faster with the shape, and the 4-bit "
                        "CUDA kernels' shapes where they run; bf16/fp16 on Hopper also the 16-bit CUDA kernels' "
                        "shapes, timed in the decode step)")
    p.add_argument("--output", help="table file (default: gemv_tuned.json in $GLMKIT_CACHE or ~/.cache/glmkit)")
    p.add_argument("--tp", type=int, choices=(1, 2), default=1,
                   help="2: tune one tensor-parallel rank's shard shapes (for --tp 2 --fast-decode; qkv, gate_up "
                        "and lm_head timed with the add of the all-reduced sum and the norm folded in, as a rank "
                        "launches them), kept beside the one-card shapes")
    p.set_defaults(func=_tune)

    p = sub.add_parser("plan", help="memory plan per GPU for GLM-4-9B-Chat (or --model PATH), no GPU needed")
    p.add_argument("--model", type=checkpoint_folder,
                   help="checkpoint folder (only its config.json is read); default GLM-4-9B-Chat")
    p.add_argument("--devices", nargs="+", type=memory_budget, default=["24GiB"],
                   help="budget per GPU with its unit, e.g. 12GiB 12GiB")
    p.add_argument("--context", type=positive_int, default=8192, help="prompt + new tokens per sequence")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES)
    p.add_argument("--prefill-chunk", type=positive_int, help="prefill in chunks of this many tokens")
    p.add_argument("--allocator", choices=ALLOCATORS,
                   help="PyTorch's caching allocator to plan for (default: $PYTORCH_CUDA_ALLOC_CONF if set, else "
                        "expandable, which glmkit sets in every process it starts)")
    p.add_argument("--fast-decode", action="store_true",
                   help="budget the fast decode path's extra memory (fused q/k/v copies, fp32 logits, a 4-bit batch's "
                        "partial sums)")
    p.add_argument("--for", dest="for_server", choices=["vllm"], help="also print the `vllm serve` command line")
    p.add_argument("--gpu-memory", type=memory_budget,
                   help="each card's whole memory, when --devices budgets only part of it (--for vllm)")
    p.set_defaults(func=_plan)

    p = sub.add_parser("generate", help="greedy reply to --prompt; --tp N splits the model over N processes")
    _add_model_option(p)
    p.add_argument("--prompt", default="How many layers does GLM-4-9B-Chat have?")
    p.add_argument("--prompt-ids", nargs="+", type=int, help="raw token ids instead of a chat message")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampled")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (every --tp process uses the same)")
    _add_run_options(p)
    p.add_argument("--json", action="store_true", help="print tokens and text as JSON")
    p.set_defaults(func=_generate)

    p = sub.add_parser("bench", help="decode tok/s and peak memory of generate() or --fast-decode; --tp N or a layer split")
    _add_model_option(p)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--prompt-len", type=positive_int, default=32)
    p.add_argument("--new-tokens", type=positive_int, default=64)
    _add_run_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible API server (loopback by default)")
    _add_model_option(p)
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
    p.add_argument("--max-batch-size", type=positive_int, help="default: the largest batch the planner fits on the GPUs")
    p.add_argument("--max-context", type=positive_int, help="prompt + new tokens per request (default 4096)")
    p.add_argument("--fast-decode", action="store_true",
                   help="decode batches with the fast path: static cache, CUDA graphs (one GPU or a --device-map split, "
                        "16/32-bit or nf4/fp4; more GPU memory)")
    p.add_argument("--tp", type=positive_int, default=1,
                   help="tensor-parallel processes, one GPU each (GLM-4-9B: 1 or 2); implies --fast-decode, 16/32-bit "
                        "weights; rank 0 answers HTTP")
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # --tp N reruns the same command line in N processes
    from glmkit.parallel import leave_process_group

    try:
        args.func(args)
        code = 0
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"glmkit {args.command}: {exc}", file=sys.stderr)
        code = 2
    except BaseException:
        leave_process_group()
        raise
    leave_process_group(code)  # (under torchrun with NCCL: the process ends here, with this code)
    return code


if __name__ == "__main__":
    sys.exit(main())
