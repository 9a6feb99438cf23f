"""The ``qdit`` command line: one small module per subcommand, each thin over the library.

Bad input (a ``QditError``) is printed as one line, without a traceback, and exits with 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from qdit_jax.errors import QditError

# subcommand -> module under qdit_jax.cli with add_arguments(parser) and run(args) -> int
SUBCOMMANDS: dict[str, str] = {
    "convert": "Convert a PyTorch DiT checkpoint (official .pt or diffusers) to a qdit checkpoint.",
    "sample": "Sample images from a (quantized) DiT checkpoint or the bundled model.",
    "quantize": "Quantize a DiT with Q-DiT (group quantization, dynamic activations, GPTQ) or a baseline.",
    "search": "Search per-layer group sizes (Q-DiT's evolutionary granularity allocation).",
    "eval": "Evaluate samples: FID, sFID, IS, precision, recall.",
    "merge": "Merge the per-host sample files of a multi-host run into one file.",
    "bench": "Measure forward and sampling throughput of FP and quantized models.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdit", description="Post-training quantization of Diffusion Transformers (Q-DiT) in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f"qdit_jax.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"qdit_jax.cli.{name}":
                continue  # subcommand not built in this version
            raise
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except QditError as e:
        print(f"qdit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qdit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
