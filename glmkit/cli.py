"""The ``glmkit`` command line: ``glmkit env``, ``glmkit make-tiny PATH``, ``glmkit plan --devices 12GiB 12GiB``.

Run ``glmkit --help`` for the list; each subcommand prints a table and exits 0, or prints the
error's message (which names the fix) and exits 2.
"""

from __future__ import annotations

import argparse
import sys


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
              prefill_chunk=args.prefill_chunk)
    plan = plan_memory(config, args.devices, context_len=args.context, **kw)
    print(plan)
    print()
    print(plan.advice())
    print(f"\nlongest context that fits: {max_context(config, args.devices, **kw)} tokens")


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
    p.add_argument("--quantization", choices=["int8", "nf4", "fp4", "nf4-dq", "fp4-dq"])
    p.add_argument("--prefill-chunk", type=int, help="prefill in chunks of this many tokens")
    p.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"glmkit {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
