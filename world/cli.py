"""``deem world`` (and plain ``python -m deem``): run `pipeline.Pipeline` with the parsed arguments and print the
results table."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device {name}: expected cpu, cuda, cuda:N or auto")
    return name


def run(args) -> None:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "phase_times.json").is_file() and not (out / "data").is_dir():
        raise FileExistsError(f"--out {out}: a non-empty folder that is not a world run; choose a new folder")
    device = _device(args.device)
    from .pipeline import Pipeline, WorldRun

    kwargs = {"seed": args.seed, "device": device, "grounding_steps": args.grounding_steps}
    if args.pretrain:
        kwargs["pretrain"] = True
    if device != "cpu" and not args.quick:  # a GPU runs a longer schedule in the same time
        kwargs.update(stage1_steps=2400, stage2_steps=800, stage3_steps=160, draw_steps=30)
    world_run = WorldRun.make(quick=args.quick, **kwargs)
    if args.fresh and out.is_dir():
        shutil.rmtree(out)
    print(f"deem world: {'quick' if args.quick else 'default'} run on {device}, writing to {out.resolve()}", flush=True)
    results = Pipeline(out, world_run).run_all(ablation=args.ablation)
    print((out / "report" / "report.md").read_text().split("Phase times")[0].strip())
    seconds = results["phase_seconds"]
    print(f"deem world: done ({sum(seconds.values()):.0f} s of phases); report in {(out / 'report').resolve()}")


def main(argv=None):
    from deem import cli

    return cli.main(["world", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
