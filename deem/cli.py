"""Command line: ``deem`` (or ``python -m deem``).

``deem`` (plain, also ``python -m deem``) / ``deem world``: the main command, DEEM learning the built-in world
(``deem.world``: components, assembly, the three stages, evaluation, drawing, a report folder). ``deem demo``: build
the tiny default model, run one training-mode forward on generated images and print the loss components and the
parameter table. ``deem params [--config 7b|tiny] [--stage N]``: the
per-component parameter table (the 7B model is built on the meta device, no memory or download needed).
``deem assemble`` / ``deem convert`` / ``deem train``: see ``deem <command> --help``.

Every command line of the package is defined here, and this module imports nothing heavy: arguments are checked
before torch / transformers are loaded, so ``--help`` and usage errors answer at once. An error is one line on
stderr, ``deem <command>: error: <what is wrong>``; the exit status is 2 for a usage error (a bad, missing or
contradictory argument) and 1 for a failure (a missing or unreadable file, a checkpoint that does not fit, ...).
``deem --debug <command> ...`` also prints the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
from pathlib import Path

__all__ = ["UsageError", "build_parser", "format_table", "main", "parse_command"]


class UsageError(ValueError):
    """A bad, missing or contradictory command-line argument: ``deem`` exits with status 2."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


# ------------------------------------------------------------------------------------------------ argument types


def _int(text: str) -> int:
    # plain ASCII digits only: int() would also take "6_4", " 64 " and other scripts' digits
    if not isinstance(text, str) or not re.fullmatch(r"[+-]?[0-9]+", text):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def bounded_int(maximum: int):
    def parse(text: str) -> int:
        value = positive_int(text)
        if value > maximum:
            raise argparse.ArgumentTypeError(f"expected a positive integer up to {maximum}, got {text!r}")
        return value

    parse.__name__ = f"int_up_to_{maximum}"
    return parse


def steps_int(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 10**7:
        raise argparse.ArgumentTypeError(f"expected a number of steps in [0, 10**7], got {text!r}")
    return value


def seed_int(text: str) -> int:
    value = _int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63), got {text!r}")
    return value


def multiple_of(step: int, why: str, maximum: int = 4096):
    def parse(text: str) -> int:
        value = _int(text)
        if value <= 0 or value % step:
            raise argparse.ArgumentTypeError(f"expected a positive multiple of {step} ({why}), got {text!r}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"expected at most {maximum}, got {text!r}")
        return value

    parse.__name__ = f"multiple_of_{step}"
    return parse


def encoder_side(text: str) -> int:
    """An encoder image side: the ConvNeXt reduces it 32-fold, so at least 32 px (48 gives maps 12, 6, 3, 1)."""
    value = _int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(
            f"expected an encoder image side of at least 32 px (the ConvNeXt stride), got {text!r}"
        )
    if value > 4096:
        raise argparse.ArgumentTypeError(f"expected at most 4096, got {text!r}")
    return value


def path_arg(text: str) -> str:
    if not text or not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r} (it holds a NUL character)")
    return text


def assignment(text: str) -> str:
    """``--set KEY=VALUE``: dotted key of non-empty parts, then ``=``, then a YAML value."""
    key, sep, _ = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. training.max_steps=5), got {text!r}")
    parts = key.strip().split(".")
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", part) for part in parts):
        raise argparse.ArgumentTypeError(
            f"expected a dotted KEY of names (e.g. training.max_steps) before '=', got {key.strip()!r}"
        )
    return text


def json_object(text: str) -> dict:
    """A JSON object given inline (``{...}``) or as the path of a JSON file."""
    source = "the value"
    raw = text.strip()
    if not raw.startswith(("{", "[")):
        path = Path(path_arg(text))
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"expected a JSON object or a JSON file, got {text!r} (no such file)")
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise argparse.ArgumentTypeError(f"cannot read {text}: {err}") from None
        source = text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{source} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got a JSON {type(value).__name__} in {source}")
    return value


# ----------------------------------------------------------------------------------------------------- parsers

_GIVEN = "_deem_given"


class _StoreOnce(argparse.Action):
    """``store``, but an option given twice is an error (argparse would silently keep the last value)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = vars(namespace).setdefault(_GIVEN, set())
        if self.dest in given:
            parser.error(f"argument {'/'.join(self.option_strings)}: given more than once")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one ``UsageError`` line (no usage dump) and whose options refuse to
    be given twice; abbreviations of long options are not accepted."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if args and args[0].startswith("-") and kwargs.get("action") in (None, "store"):
            kwargs["action"] = _StoreOnce
        return super().add_argument(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')", prog=self.prog)


def _debug_flag(parser) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="on an error, print the full traceback"
    )


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="tiny model, generated images: loss components and parameter table",
        description="Build the tiny model, take a few training steps on generated images, print the losses.",
    )
    p.add_argument("--steps", type=positive_int, default=3, help="optimizer steps (default 3)")
    p.add_argument("--seed", type=seed_int, default=0)
    _debug_flag(p)


def _add_params(sub) -> None:
    p = sub.add_parser(
        "params",
        help="per-component parameter table for the stage presets",
        description="Per-component parameter table (total / trainable) of the stage presets.",
    )
    p.add_argument("--config", choices=["7b", "tiny"], default="7b", help="model size (7b is built on 'meta')")
    p.add_argument("--stage", type=int, choices=[1, 2, 3], help="one stage preset (default: all three)")
    _debug_flag(p)


def _add_assemble(sub) -> None:
    p = sub.add_parser(
        "assemble",
        help="fresh DEEM from LLaMA + SD-2.1 + open_clip checkpoints",
        description="Assemble a fresh DEEM for stage-1 training from a LLaMA/Vicuna dir, an SD-2.1 diffusers dir "
        "and an open_clip ConvNeXt checkpoint. Nothing is downloaded; nothing is written unless everything fits.",
    )
    p.add_argument("--llm", required=True, type=path_arg, help="LLaMA / Vicuna directory in HF format")
    p.add_argument("--sd", required=True, type=path_arg, help="Stable Diffusion 2.1 directory in diffusers format")
    p.add_argument(
        "--clip", required=True, type=path_arg, help="open_clip ConvNeXt checkpoint (.bin / .pt / .safetensors)"
    )
    p.add_argument("--out", required=True, type=path_arg, help="output directory (new or empty unless --overwrite)")
    p.add_argument("--image-size", type=encoder_side, default=256, help="encoder resolution (256)")
    p.add_argument("--num-image-tokens", type=bounded_int(4096), default=77, help="LLM tokens per image (77)")
    p.add_argument(
        "--image-embed-dim", type=multiple_of(16, "the cross-attention heads", 65536), default=1024, help="(1024)"
    )
    p.add_argument(
        "--decoder-image-size",
        type=multiple_of(8, "the VAE factor"),
        default=None,
        help="diffusion resolution (default: UNet sample_size x VAE factor)",
    )
    p.add_argument(
        "--config-overrides", type=json_object, default=None, help="JSON object (or JSON file) of DeemConfig kwargs"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=seed_int, default=None, help="seed of the new modules' random init")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN / inf weights in the components")
    _debug_flag(p)


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="original DEEM checkpoint -> HF directory",
        description="Convert an original DEEM / MM-Interleaved checkpoint into a save_pretrained directory. "
        "Nothing is written to --out unless the whole conversion (and --verify) succeeds.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        type=path_arg,
        help="original .bin / .pt / .safetensors (or a directory of shards)",
    )
    p.add_argument("--config", required=True, type=path_arg, help="the original YAML (its `model:` section is used)")
    p.add_argument("--llm", required=True, type=path_arg, help="LLaMA / Vicuna directory (config.json, tokenizer)")
    p.add_argument("--sd", type=path_arg, help="Stable Diffusion directory (unet/, vae/, scheduler/ configs)")
    p.add_argument("--out", required=True, type=path_arg, help="output directory (new or empty)")
    p.add_argument(
        "--image-size",
        type=encoder_side,
        default=None,
        help="encoder resolution; read from the YAML's data transforms (`resolution`) when they name it, "
        "required otherwise (256 stage 1, 448 stages 2-3)",
    )
    p.add_argument(
        "--verify", type=path_arg, help="a fixture directory with inputs.safetensors + intermediates.safetensors"
    )
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN / inf weights in the checkpoint")
    _debug_flag(p)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train one DEEM stage: deem train --stage N --config cfg.yaml",
        description="Train one DEEM stage with the HF Trainer (see deem/trainers/configs/ and the docstring of "
        "deem.trainers.cli for the YAML sections).",
    )
    p.add_argument(
        "--config",
        required=True,
        type=path_arg,
        help="YAML file, or a shipped config name: tiny, stage1_7b, stage2_7b, stage3_7b",
    )
    p.add_argument("--stage", type=int, choices=[1, 2, 3], help="training stage (required unless the config names it)")
    p.add_argument("--output_dir", type=path_arg, help="shortcut for --set training.output_dir=...")
    p.add_argument(
        "--resume_from_checkpoint",
        nargs="?",
        const=True,
        default=None,
        type=path_arg,
        help="resume from PATH, or (no value) from the last complete checkpoint in output_dir",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        type=assignment,
        metavar="KEY=VALUE",
        help="change a config entry (YAML value), e.g. training.max_steps=5; repeatable",
    )
    p.add_argument("--dry_run", action="store_true", help="build everything, print the plan, do not train")
    _debug_flag(p)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="run one of the paper's benchmarks: deem evaluate --task NAME --data PATH --images DIR --model DIR",
        description="Evaluate a saved DEEM on a benchmark with the paper's protocol (deem.evaluation). Predictions are "
        "appended to OUT/predictions.jsonl as they are made (a rerun resumes); OUT/results.json and results.md "
        "hold the scores. Works under accelerate launch (one shard per process).",
    )
    p.add_argument("--task", required=True, help="benchmark name, e.g. pope-random, vqav2, coco-caption, t2i-fid")
    p.add_argument("--data", required=True, type=path_arg, help="the benchmark's annotation file / folder")
    p.add_argument("--images", required=True, type=path_arg, help="folder of the benchmark's images")
    p.add_argument("--model", required=True, type=path_arg, help="saved model directory (model + processor)")
    p.add_argument("--out", type=path_arg, help="output folder (predictions, results); default: none kept")
    p.add_argument("--limit", type=positive_int, help="only the first N samples")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per batch (8)")
    p.add_argument("--answer-mode", choices=["generate", "score", "both"], default="generate")
    p.add_argument("--max-new-tokens", type=positive_int, help="default: the task's (the original eval settings)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: as saved")
    p.add_argument(
        "--option",
        dest="options",
        action="append",
        default=[],
        type=assignment,
        metavar="KEY=VALUE",
        help="task option (YAML value), e.g. parser=lmms-eval, num_beams=1, meteor=false; repeatable",
    )
    _debug_flag(p)


def _add_world(sub) -> None:
    p = sub.add_parser(
        "world",
        help="the main command: DEEM learns the built-in world (components, 3 stages, evaluation, drawing, report)",
        description="Assemble DEEM from the world's pretrained components, train stages 1-3 on the world's data in the "
        "real formats, evaluate, draw, and write OUT/report/ (report.md, samples.png, loss_curves.png). Each phase "
        "is cached in OUT: a rerun or an interrupted run resumes. The default run takes about 14 minutes on 2 CPU "
        "cores (12 of them stage 1).",
    )
    p.add_argument("--out", type=path_arg, default="deem_world", help="output folder (default ./deem_world)")
    p.add_argument("--quick", action="store_true", help="the CI-sized run (1-2 minutes on 2 CPU cores)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--ablation", action="store_true", help="also stage 1 with / without L_CSR over several seeds")
    p.add_argument(
        "--grounding-steps",
        type=steps_int,
        default=0,
        help="steps of stage 2's yes/no warm-up (main-object questions, plain and described) before stage 2; "
        "0 (default): none",
    )
    p.add_argument("--pretrain", action="store_true", help="pretrain the three components here (stage 0)")
    p.add_argument("--fresh", action="store_true", help="ignore the cached phases in OUT and run everything again")
    _debug_flag(p)


def _add_bench(sub) -> None:
    from deem.bench.__main__ import add_arguments  # argparse only: nothing heavy

    p = sub.add_parser(
        "bench",
        help="side-by-side benchmarks against the stock library paths (JSON + markdown table)",
        description="Run the side-by-side benchmarks (deem.bench): our pipeline / decoding / training step against "
        "diffusers' StableDiffusionPipeline, LlamaForCausalLM.generate and the step without CSR, on the same weights.",
    )
    add_arguments(p)
    _debug_flag(p)


def build_parser() -> argparse.ArgumentParser:
    """The ``deem`` parser with every sub-command (no heavy import)."""
    parser = _Parser(
        prog="deem",
        description="DEEM, the interleaved image-text model: a demo, parameter tables, assembly from component "
        "checkpoints, conversion of original checkpoints, training.",
        epilog="An error prints one line (exit status 2: bad arguments, 1: a failure); --debug adds the traceback.",
    )
    parser.add_argument("--debug", action="store_true", help="on an error, print the full traceback")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_demo, _add_params, _add_assemble, _add_convert, _add_train, _add_evaluate, _add_world, _add_bench):
        add(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deem-transformers")
    except PackageNotFoundError:
        return "(not installed)"


_TOP_LEVEL_OPTIONS = ("-h", "--help", "--version", "--debug")


def _default_command(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`deem --out DIR --quick` (the main command's own options, no command named) means `deem world --out DIR
    --quick`; any other first word (a command, an unknown option or word) is left for argparse to name."""
    world = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["world"]
    for i, token in enumerate(argv):
        if token in _TOP_LEVEL_OPTIONS:
            continue
        if token.split("=", 1)[0] in world._option_string_actions:
            return [*argv[:i], "world", *argv[i:]]
        return argv
    return argv


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    argv = _default_command(parser, argv)
    args, extra = parser.parse_known_args(argv)
    if args.command is None and not extra:  # plain `deem` (or `deem --debug`) is the main command: the world
        args, extra = parser.parse_known_args([*argv, "world"])
    if extra:  # named by the command they were given to (argparse would blame the top-level parser)
        prog = f"deem {args.command}" if args.command else "deem"
        raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see '{prog} --help')", prog=prog)
    vars(args).pop(_GIVEN, None)
    return args


def parse_command(command: str, argv=None) -> argparse.Namespace:
    """Parse the arguments of ``deem <command>`` (raises `UsageError`)."""
    return _parse([command, *(sys.argv[1:] if argv is None else list(argv))])


# ---------------------------------------------------------------------------------------------------- commands


def format_table(rows, title: str) -> str:
    width = max(len(r["component"]) for r in rows)
    lines = [title, f"{'component':<{width}}  {'total':>15}  {'trainable':>15}"]
    for r in rows:
        lines.append(f"{r['component']:<{width}}  {r['total']:>15,}  {r['trainable']:>15,}")
    return "\n".join(lines)


def build(config_name: str, device: str | None = None):
    import torch

    from . import DeemConfig, DeemForInterleavedGeneration

    config = DeemConfig() if config_name == "7b" else DeemConfig.tiny()
    if device == "meta":
        with torch.device("meta"):
            return DeemForInterleavedGeneration(config)
    return DeemForInterleavedGeneration(config)


def cmd_params(args) -> None:
    start = time.perf_counter()
    model = build(args.config, device="meta" if args.config == "7b" else None)
    built = time.perf_counter() - start
    stages = [args.stage] if args.stage else [1, 2, 3]
    for stage in stages:
        print(
            format_table(
                model.parameter_table(stage), f"\n{args.config} model, stage {stage} preset (built in {built:.1f} s)"
            )
        )


def cmd_demo(args) -> None:
    import torch

    from . import DeemConfig, DeemForInterleavedGeneration

    torch.manual_seed(args.seed)
    config = DeemConfig.tiny()
    model = DeemForInterleavedGeneration(config).set_training_stage(1).train()
    q, soi, img = config.num_image_tokens, config.soi_token_id, config.image_token_id
    g = torch.Generator().manual_seed(args.seed)
    text = lambda n: torch.randint(3, config.original_vocab_size - 2, (n,), generator=g).tolist()  # noqa: E731
    row = (
        [config.bos_token_id]
        + text(3)
        + [soi]
        + [img] * q
        + text(4)
        + [soi]
        + [img] * q
        + text(2)
        + [config.eos_token_id]
    )
    vis, dec = config.vision_config.image_size, config.diffusion_config.image_size
    batch = {
        "input_ids": torch.tensor([row]),
        "attention_mask": torch.ones(1, len(row), dtype=torch.long),
        "pixel_values": torch.rand(2, 3, vis, vis, generator=g),
        "pixel_values_decoder": torch.rand(2, 3, dec, dec, generator=g),
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(args.steps):
        out = model(**batch, generator=torch.Generator().manual_seed(step))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(
            f"step {step}: loss {out.loss.item():.4f} = ntp {out.loss_ntp.item():.4f}"
            f" + {config.loss_nip_weight:g}*nip {out.loss_nip.item():.4f} + {config.loss_csr_weight:g}*csr "
            f"{out.loss_csr.item():.4f}"
        )
    print(format_table(model.parameter_table(), "\ntiny model, stage 1 (current requires_grad)"))


def _lazy(module: str):
    """The runner of a command whose code lives in ``module`` (its ``run(args)``), imported only when the command
    runs, so that ``deem --help`` never imports torch."""

    def run(args):
        return importlib.import_module(module).run(args)

    return run


COMMANDS = {
    "bench": _lazy("deem.bench.__main__"),
    "demo": cmd_demo,
    "params": cmd_params,
    "assemble": _lazy("deem.conversion.assemble"),
    "convert": _lazy("deem.conversion.convert_original"),
    "train": _lazy("deem.trainers.cli"),
    "evaluate": _lazy("deem.evaluation.cli"),
    "world": _lazy("deem.world.cli"),
}

# ------------------------------------------------------------------------------------------------------ errors

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(err: BaseException) -> str:
    """The message of ``err`` (and its notes) on one line; the type is named unless it is a plain value / file
    error, whose message says what is wrong by itself."""
    parts = [str(err)] + [str(note) for note in getattr(err, "__notes__", ())]
    text = " ".join(" ".join(_ANSI.sub("", part).split()) for part in parts if part and str(part).strip())
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = f"missing key {err.args[0]!r}"
    if not isinstance(err, (ValueError, OSError)) or not text:
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text


def _report(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    """``deem`` entry point: returns 0; on an error prints one line and raises ``SystemExit(2)`` (usage) or
    ``SystemExit(1)`` (failure)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    debug = False
    prog = "deem"
    try:
        args = _parse(argv)
        debug = bool(getattr(args, "debug", False))
        prog = f"deem {args.command}"
        COMMANDS[args.command](args)
        return 0
    except UsageError as err:
        if debug:
            import traceback

            traceback.print_exc()
        _report(err.prog or prog, one_line(err))
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        _report(prog, "interrupted")
        raise SystemExit(130) from None
    except Exception as err:  # noqa: BLE001 - every failure becomes one line (the traceback with --debug)
        if debug:
            import traceback

            traceback.print_exc()
        message = one_line(err)
        if not debug and not isinstance(err, (ValueError, OSError)):
            message += " (run with --debug for the traceback)"
        _report(prog, message)
        raise SystemExit(1) from None


if __name__ == "__main__":
    sys.exit(main())
