"""``deem evaluate``: the command-line runner of `deem.evaluation.evaluate` (arguments are parsed in deem/cli.py)."""

from __future__ import annotations

import json
import os

__all__ = ["run"]


def _options(pairs: list[str]) -> dict:
    import yaml

    from ..cli import UsageError

    options = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        key = key.strip()
        if key in options:
            raise UsageError(f"--option {key} given more than once", prog="deem evaluate")
        try:
            options[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise UsageError(f"--option {key}: not a YAML value ({err})", prog="deem evaluate") from None
    return options


def run(args) -> dict:
    from ..cli import UsageError
    from .tasks import TASKS, get_task

    if args.task not in TASKS:
        raise UsageError(f"unknown --task {args.task!r}; expected one of {', '.join(TASKS)}", prog="deem evaluate")
    spec = get_task(args.task)
    if args.answer_mode != "generate" and not spec.closed:
        raise UsageError(
            f"--answer-mode {args.answer_mode}: task {spec.name} is open-ended (only 'generate')", prog="deem evaluate"
        )
    options = _options(args.options)
    from .runner import evaluate, format_results_table

    results = evaluate(
        args.task,
        args.data,
        args.images,
        args.model,
        args.out,
        batch_size=args.batch_size,
        limit=args.limit,
        answer_mode=args.answer_mode,
        device=args.device,
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        **options,
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch, rank 0 reports
        return results
    print(format_results_table(results))
    if args.out:
        print(f"results: {args.out}/results.json")
    else:
        print(json.dumps(results["metrics"]))
    return results
