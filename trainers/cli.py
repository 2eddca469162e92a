"""``python -m deem.trainers --stage N --config cfg.yaml`` (also ``deem train ...``): train one DEEM stage.

The YAML file has four sections (``trainers/configs/stage{1,2,3}_7b.yaml`` are the paper's recipes,
``tiny.yaml`` a seconds-long CPU run)::

    stage: 1                     # optional; --stage must agree with it when both are given
    model:
      path: checkpoints/deem-7b  # a DEEM directory (save_pretrained / `deem assemble` / `deem convert`) ...
      config: tiny               # ... or a fresh tiny random model (seed, visible_init: gates 0.5 etc. as the tests)
      config_overrides: {vision_config: {image_size: 448}}   # nested DeemConfig changes before loading
      strict: true               # strict from_pretrained (false: new modules initialised, extra keys dropped)
      dtype: float32             # weights dtype (mixed precision comes from training.bf16 / fp16)
    processor: {path: ..., size: 448, decoder_size: 512}      # DeemProcessor; defaults to the model path
    data:
      sources:                   # name -> reader spec; several sources are mixed by `weight` (MixedDataset)
        mmc4: {type: mmc4, path: ..., images: ..., weight: 2, pack: true, kwargs: {...}}
        blip: {type: pairs, path: ..., weight: 1, pack: true}
        # types: mmc4, pairs, llava, referring (deem.trainers.data readers), synthetic (generated, no files)
      packing: {max_length: 2048, max_images: 15}
      mix: {seed: 42, per_batch: 4, stopping: longest}
      collator: {max_length: 2048, train_transforms: true, center_crop: true}
    peft: {targets: [llm], r: 16, lora_alpha: 32, lora_dropout: 0.05}   # optional LoRA (deem_lora_config)
    training: {...}              # DeemTrainingArguments fields (output_dir, max_steps, bf16, ...)

Command line: ``--set training.max_steps=5`` (YAML-typed values, dotted keys, repeatable) changes any entry;
``--output_dir`` / ``--resume_from_checkpoint [PATH]`` are shortcuts; ``--dry_run`` builds everything and prints
the parameter table and the optimizer groups without training. Works under ``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import yaml
from transformers.utils import logging

logger = logging.get_logger(__name__)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
SECTIONS = ("stage", "model", "processor", "data", "peft", "training")


# ------------------------------------------------------------------------------------------------------- config file


def resolve_config_path(path: str) -> str:
    """A path, or the name of a shipped config (``tiny``, ``stage1_7b`` ...)."""
    if os.path.isfile(path):
        return path
    for candidate in (os.path.join(CONFIG_DIR, path), os.path.join(CONFIG_DIR, f"{path}.yaml")):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"config {path!r} not found (nor in {CONFIG_DIR})")


def set_dotted(cfg: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the nested dict ``cfg``."""
    if "=" not in assignment:
        raise ValueError(f"--set expects KEY=VALUE, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw)
    parts = key.strip().split(".")
    node = cfg
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = value


def load_config(path: str, sets=(), stage: int | None = None) -> dict:
    """Read the YAML, apply ``--set`` assignments, settle the stage (1, 2 or 3)."""
    with open(resolve_config_path(path), encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    cfg = copy.deepcopy(cfg)
    for assignment in sets:
        set_dotted(cfg, assignment)
    unknown = set(cfg) - set(SECTIONS)
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)}; expected {list(SECTIONS)}")
    file_stage = cfg.get("stage")
    if stage is not None and file_stage is not None and int(file_stage) != int(stage):
        raise ValueError(f"--stage {stage} contradicts stage: {file_stage} in {path}")
    stage = stage if stage is not None else file_stage
    if stage is None:
        raise ValueError(f"give --stage (the config {path} names none)")
    if int(stage) not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    cfg["stage"] = int(stage)
    for section in ("model", "processor", "data", "training"):
        cfg.setdefault(section, {})
    return cfg


# ------------------------------------------------------------------------------------------------------------ model


def _apply_overrides(target, overrides: dict, where: str = "config") -> None:
    for key, value in overrides.items():
        if isinstance(target, dict):
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                _apply_overrides(target[key], value, f"{where}.{key}")
            else:
                target[key] = value
            continue
        if not hasattr(target, key):
            raise ValueError(f"{where} has no field {key!r}")
        current = getattr(target, key)
        if isinstance(value, dict) and current is not None and not isinstance(current, (int, float, str, list, tuple)):
            _apply_overrides(current, value, f"{where}.{key}")
        else:
            setattr(target, key, value)


def visible_init(model) -> None:
    """The tests' tiny-model tweak: non-zero gates, soi vector and side-network weights, so every path is used."""
    import torch

    with torch.no_grad():
        for layer in model.language_model.layers:
            if layer.cross_attn is not None:
                layer.cross_attn.gate.fill_(0.5)
        model.soi_embedding.normal_(std=0.1)
        for p in model.unet_side.parameters() if model.unet_side is not None else []:
            if p.abs().sum() == 0:
                p.normal_(std=0.05)


def build_model(model_cfg: dict, seed: int = 0):
    import torch

    from deem import DeemConfig, DeemForInterleavedGeneration

    dtype = model_cfg.get("dtype")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    overrides = model_cfg.get("config_overrides") or {}
    if model_cfg.get("config") == "tiny":
        config = DeemConfig.tiny()
        _apply_overrides(config, overrides)
        torch.manual_seed(int(model_cfg.get("seed", seed)))
        model = DeemForInterleavedGeneration(config)
        if model_cfg.get("visible_init", True):
            visible_init(model)
        return model.to(dtype) if dtype is not None else model
    path = model_cfg.get("path")
    if not path:
        raise ValueError("model: give `path` (a DEEM directory) or `config: tiny`")
    config = DeemConfig.from_pretrained(path)
    _apply_overrides(config, overrides)
    kwargs = {"config": config, "strict": bool(model_cfg.get("strict", True))}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return DeemForInterleavedGeneration.from_pretrained(path, **kwargs)


def build_processor(cfg: dict):
    proc_cfg = dict(cfg.get("processor") or {})
    path = proc_cfg.pop("path", None) or cfg["model"].get("path")
    if path is None:
        return None
    from deem import DeemProcessor

    processor = DeemProcessor.from_pretrained(path)
    for key in ("size", "decoder_size", "do_center_crop", "do_flip"):
        if key in proc_cfg:
            setattr(processor.image_processor, key, proc_cfg.pop(key))
    if proc_cfg:
        raise ValueError(f"processor: unknown keys {sorted(proc_cfg)}")
    return processor


def apply_peft(model, peft_cfg: dict | None):
    if not peft_cfg:
        return model
    from peft import get_peft_model

    from .trainer import deem_lora_config

    kwargs = dict(peft_cfg)
    targets = kwargs.pop("targets", ["llm"])
    model = get_peft_model(model, deem_lora_config(targets, **kwargs))
    return model


# ------------------------------------------------------------------------------------------------------------- data

READERS = ("mmc4", "pairs", "llava", "referring")


def build_data(data_cfg: dict, processor, model_config, stage: int, seed: int):
    """(train_dataset, data_collator) from the ``data`` section."""
    from .trainer import SyntheticCollator, SyntheticInterleavedDataset

    sources = data_cfg.get("sources") or {}
    if not sources:
        raise ValueError("data.sources is empty")
    types = {name: spec.get("type") for name, spec in sources.items()}
    if any(t == "synthetic" for t in types.values()):
        if len(sources) > 1:
            raise ValueError("a synthetic source cannot be mixed with others")
        spec = dict(next(iter(sources.values())))
        spec.pop("type")
        sft = spec.pop("sft", "auto")
        spec.pop("weight", None)
        dataset = SyntheticInterleavedDataset(
            model_config, seed=int(spec.pop("seed", seed)), sft=(stage > 1) if sft == "auto" else bool(sft), **spec
        )
        return dataset, SyntheticCollator(model_config.pad_token_id)
    bad = {n: t for n, t in types.items() if t not in READERS}
    if bad:
        raise ValueError(f"data.sources: unknown types {bad}; use one of {list(READERS) + ['synthetic']}")
    if processor is None:
        raise ValueError("real data needs a processor (processor.path, or model.path with a saved processor)")
    from . import data as D

    readers = {"mmc4": D.read_mmc4, "pairs": D.read_pairs, "llava": D.read_llava, "referring": D.read_referring}
    packing = dict(data_cfg.get("packing") or {})
    pack_length = int(packing.pop("max_length", 2048))
    built, weights = {}, {}
    for name, spec in sources.items():
        spec = dict(spec)
        kind = spec.pop("type")
        kwargs = dict(spec.pop("kwargs", None) or {})
        kwargs.setdefault("seed", seed)
        if kind == "pairs":
            source = readers[kind](spec.pop("path"), spec.pop("images", None), **kwargs)
        else:
            source = readers[kind](spec.pop("path"), spec.pop("images"), **kwargs)
        if spec.pop("pack", False):
            source = D.PackedDataset(source, processor, pack_length, **packing)
        if "weight" in spec:
            weights[name] = float(spec.pop("weight"))
        if spec:
            raise ValueError(f"data.sources.{name}: unknown keys {sorted(spec)}")
        built[name] = source
    if len(built) == 1:
        dataset = next(iter(built.values()))
    else:
        mix = dict(data_cfg.get("mix") or {})
        mix.setdefault("seed", seed)
        dataset = D.MixedDataset(built, weights, **mix)
    collator_cfg = dict(data_cfg.get("collator") or {})
    collator_cfg.setdefault("seed", seed)
    collator = D.DeemDataCollator(processor, **collator_cfg)
    return dataset, collator


# ------------------------------------------------------------------------------------------------------------- main


def build_trainer(cfg: dict, output_dir: str | None = None):
    """Model, data, arguments and the [`DeemTrainer`] for a loaded config (see [`load_config`])."""
    from .trainer import DeemTrainer, DeemTrainingArguments

    stage = cfg["stage"]
    training = dict(cfg["training"])
    if output_dir is not None:
        training["output_dir"] = output_dir
    training.setdefault("output_dir", f"deem_stage{stage}_output")
    training["stage"] = stage
    args = DeemTrainingArguments(**training)
    model = build_model(cfg["model"], seed=args.seed)
    processor = build_processor(cfg)
    if cfg.get("peft"):
        if args.freeze_by_stage:
            model.set_training_stage(stage)  # then LoRA freezes all base weights and adds the adapters
        model = apply_peft(model, cfg["peft"])
    dataset, collator = build_data(cfg["data"], processor, model.config, stage, args.seed)
    trainer = DeemTrainer(model, args, train_dataset=dataset, data_collator=collator, processing_class=processor)
    return trainer


def print_plan(trainer) -> None:
    from deem.cli import format_table

    from .trainer import build_param_groups, deem_base_model, describe_param_groups

    args = trainer.args
    base = deem_base_model(trainer.model)
    print(
        f"stage {args.stage}: loss = " + " + ".join(f"{w:g}·{k.upper()}" for k, w in args.loss_weights.items() if w > 0)
    )
    print(format_table(base.parameter_table(), "trainable parameters (current requires_grad)"))
    print("optimizer groups:")
    for row in describe_param_groups(build_param_groups(trainer.model, args)):
        print(
            f"  {row['name']:<28} lr {row['lr']:<10.3g} weight decay {row['weight_decay']:<6g} "
            f"{row['parameters']:>15,} parameters"
        )
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    print(
        f"AdamW betas ({args.adam_beta1}, {args.adam_beta2}), eps {args.adam_epsilon}; schedule {schedule}, warmup "
        f"{args.warmup_steps}, max_steps {args.max_steps}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deem.trainers", description="Train one DEEM stage (see trainers/configs/)."
    )
    parser.add_argument(
        "--config", required=True, help="YAML file, or a shipped config name: tiny, stage1_7b, stage2_7b, stage3_7b"
    )
    parser.add_argument(
        "--stage", type=int, choices=[1, 2, 3], help="training stage (required unless the config names it)"
    )
    parser.add_argument("--output_dir", help="shortcut for --set training.output_dir=...")
    parser.add_argument(
        "--resume_from_checkpoint",
        nargs="?",
        const=True,
        default=None,
        help="resume from PATH, or (no value) from the last complete checkpoint in output_dir",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a config entry, e.g. training.max_steps=5",
    )
    parser.add_argument("--dry_run", action="store_true", help="build everything, print the plan, do not train")
    args = parser.parse_args(argv)
    logging.set_verbosity_info() if os.environ.get("DEEM_VERBOSE") else None

    cfg = load_config(args.config, args.sets, args.stage)
    trainer = build_trainer(cfg, args.output_dir)
    if args.dry_run:
        if trainer.is_world_process_zero():
            print_plan(trainer)
        return
    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero() and trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(trainer.args.output_dir)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
