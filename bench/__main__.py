"""``python -m deem.bench`` / ``deem bench``: run the side-by-side benchmarks, print the table, write JSON and
markdown."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCHMARKS = ("pipeline", "train", "decode", "interleaved", "memory", "data", "gpu")
SIZES = ("tiny", "fixture", "100m")


def _names(allowed):
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in allowed]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return names

    return parse


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--benchmarks",
        type=_names(BENCHMARKS),
        default=["pipeline", "train", "decode", "interleaved", "memory"],
        help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all but data and gpu)",
    )
    parser.add_argument(
        "--sizes",
        type=_names(SIZES),
        default=["tiny", "fixture"],
        help="comma-separated model sizes: tiny, fixture (parity fixture A's config), 100m (slow on a small CPU)",
    )
    parser.add_argument("--rounds", type=_positive, default=5, help="paired timing rounds (default 5)")
    parser.add_argument("--threads", type=_positive, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for bench.json / bench.md")
    parser.add_argument("--smoke", action="store_true", help="each benchmark once at its smallest settings")


def run(args) -> int:
    from .suite import run_suite, to_markdown, write_reports

    core = [b for b in args.benchmarks if b not in ("data", "gpu")]
    rounds = 1 if args.smoke else args.rounds
    result = run_suite(core, args.sizes, rounds=rounds, threads=args.threads, smoke=args.smoke)
    if "data" in args.benchmarks:
        try:
            from . import data
        except ImportError as error:
            raise RuntimeError(f"the data benchmark is not available: {error}") from error
        result["data"] = data.run() if not args.smoke else data.run(n_docs=8, n_pairs=8, workers=(0,))
    if "gpu" in args.benchmarks:
        from .gpu import run as run_gpu

        small = dict(size="tiny", device="cpu", batch=1, steps=1, new_tokens=2, repeats=1)
        result["gpu"] = run_gpu(**small) if args.smoke else run_gpu()
    json_path, md_path = write_reports(result, args.out)
    print(to_markdown(result), end="")
    if "gpu" in result:
        from .gpu import to_markdown as gpu_markdown

        print(gpu_markdown(result["gpu"]), end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deem.bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
