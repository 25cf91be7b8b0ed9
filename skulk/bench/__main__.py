"""``python -m skulk.bench <tool> [flags]``: run one of Skulk's measuring tools.

The tool's module is imported only once it is chosen, because a tool must
pick the BLAS before anything imports ``mlx.core`` (``engine`` does so as it
is imported). Its own flags follow the tool's name unchanged.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["TOOLS", "main"]

TOOLS: dict[str, tuple[str, str]] = {
    "engine": ("skulk.bench.engine", "the runner vs mlx-lm and mlx_lm.server: prefill, decode, concurrency, memory"),
    "blas": ("skulk.bench.blas", "MLX on its reference BLAS vs Skulk's fast BLAS"),
    "speculative": ("skulk.bench.speculative", "speculative decoding: costs, acceptance, speed-ups"),
    "tune": ("skulk.bench.tune", "the best speculation depth for a model, written to its card"),
    "transfer": ("skulk.bench.transfer", "node-to-node model copies over loopback vs a plain copy and sha256"),
    "constrained": ("skulk.bench.constrained", "8 json_schema-constrained streams vs 8 plain, and grammar mask cost"),
}
"""Tool name -> (module with a ``main(argv)``, one line for the usage text)."""


def _usage() -> str:
    lines = ["usage: python -m skulk.bench <tool> [flags]   (python -m skulk.bench <tool> --help for its flags)", "", "tools:"]
    lines += [f"  {name:<12} {about}" for name, (_, about) in TOOLS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the tool named by ``argv[0]`` with the rest of ``argv``; returns its exit status.

    ``-h`` or ``--help``: the usage on stdout, status 0. No tool or an
    unknown one: the usage on stderr, status 2 (as argparse does).
    """
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if not args or args[0] not in TOOLS:
        problem = f"unknown tool {args[0]!r}" if args else "no tool named"
        print(f"{problem}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(TOOLS[args[0]][0])
    status = module.main(args[1:])
    return int(status or 0)


if __name__ == "__main__":
    raise SystemExit(main())
