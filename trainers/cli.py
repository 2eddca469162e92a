"""``deem train --stage N --config cfg.yaml`` (also ``python -m deem.trainers ...``): train one DEEM stage.

The YAML file has these sections (``trainers/configs/stage{1,2,3}_7b.yaml`` are the paper's recipes,
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

The whole configuration is checked before the model is built. The run prints the folder it writes to and saves
the model together with its processor (tokenizer + image processor; the tiny model gets a character-level
tokenizer), so ``AutoProcessor.from_pretrained(output_dir, trust_remote_code=True)`` loads the result. A run that
fails removes the output folder it created unless a checkpoint was saved in it.
"""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import string
import sys
import time
from pathlib import Path

import yaml

from deem.cli import UsageError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
SECTIONS = ("stage", "model", "processor", "data", "peft", "training")
MODEL_KEYS = ("path", "config", "config_overrides", "strict", "dtype", "seed", "visible_init")
PROCESSOR_KEYS = ("path", "size", "decoder_size", "do_center_crop", "do_flip")
DATA_KEYS = ("sources", "packing", "mix", "collator")
READER_KEYS = ("type", "path", "images", "kwargs", "pack", "weight")
SYNTHETIC_KEYS = ("type", "num_samples", "seed", "max_images", "text_length", "sft", "weight")
DTYPES = ("float32", "bfloat16", "float16")
READERS = ("mmc4", "pairs", "llava", "referring")


def _logger():
    from transformers.utils import logging

    return logging.get_logger(__name__)


class ConfigError(ValueError):
    """A training YAML (or a ``--set``) that cannot describe a run; the message names the entry."""


# ------------------------------------------------------------------------------------------------------- config file


def resolve_config_path(path: str) -> str:
    """A path, or the name of a shipped config (``tiny``, ``stage1_7b`` ...)."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        raise IsADirectoryError(f"--config {path}: is a directory, expected a YAML file")
    for candidate in (os.path.join(CONFIG_DIR, path), os.path.join(CONFIG_DIR, f"{path}.yaml")):
        if os.path.isfile(candidate):
            return candidate
    shipped = sorted(name[: -len(".yaml")] for name in os.listdir(CONFIG_DIR) if name.endswith(".yaml"))
    raise FileNotFoundError(f"--config {path}: no such file, nor a shipped config ({', '.join(shipped)})")


def set_dotted(cfg: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the nested dict ``cfg``."""
    if "=" not in assignment:
        raise UsageError(f"--set expects KEY=VALUE, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise UsageError(f"--set {key}: the value {raw!r} is not valid YAML ({_yaml_problem(err)})") from None
    parts = key.strip().split(".")
    if not all(parts):
        raise UsageError(f"--set {key!r}: empty name in the dotted key")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise UsageError(f"--set {key}: {'.'.join(parts[: i + 1])} is a {type(node).__name__}, not a section")
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (PyYAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def load_config(path: str, sets=(), stage: int | None = None) -> dict:
    """Read the YAML, apply ``--set`` assignments, settle the stage (1, 2 or 3) and check every section
    (`check_config`). Raises ``FileNotFoundError``, `ConfigError` (bad file content) or ``UsageError`` (bad or
    contradictory arguments)."""
    resolved = resolve_config_path(path)
    try:
        with open(resolved, encoding="utf-8") as f:
            cfg = yaml.load(f, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file ({err.reason})") from None
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got a {type(cfg).__name__}")
    cfg = copy.deepcopy(cfg)
    seen = set()
    for assignment in sets:
        key = assignment.split("=", 1)[0].strip()
        if key in seen:
            raise UsageError(f"--set {key} given more than once")
        seen.add(key)
        set_dotted(cfg, assignment)
    unknown = [str(k) for k in cfg if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"{path}: unknown sections {sorted(unknown)}; expected {list(SECTIONS)}")
    file_stage = cfg.get("stage")
    if file_stage is not None and (isinstance(file_stage, bool) or file_stage not in (1, 2, 3)):
        raise ConfigError(f"{path}: stage must be 1, 2 or 3, got {file_stage!r}")
    if stage is not None and (isinstance(stage, bool) or stage not in (1, 2, 3)):
        raise UsageError(f"--stage must be 1, 2 or 3, got {stage!r}")
    if stage is not None and file_stage is not None and int(file_stage) != int(stage):
        raise UsageError(f"--stage {stage} contradicts stage: {file_stage} in {path}")
    stage = stage if stage is not None else file_stage
    if stage is None:
        raise UsageError(f"give --stage (the config {path} names none)")
    cfg["stage"] = int(stage)
    for section in ("model", "processor", "data", "training"):
        if cfg.get(section) is None:
            cfg[section] = {}
    check_config(cfg, path)
    return cfg


def _require(ok: bool, where: str, expected: str, got) -> None:
    if not ok:
        raise ConfigError(f"{where} must be {expected}, got {got!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _keys(section: dict, allowed, where: str) -> None:
    unknown = sorted(str(k) for k in section if k not in allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; expected some of {list(allowed)}")


def check_config(cfg: dict, path: str = "config") -> None:
    """Check the shape of every section (types, known keys, value ranges) before anything is built."""
    for section in ("model", "processor", "data", "training"):
        _require(isinstance(cfg[section], dict), f"{path}: {section}", "a mapping", cfg[section])
    peft = cfg.get("peft")
    _require(peft in (None, False) or isinstance(peft, dict), f"{path}: peft", "a mapping (or absent)", peft)

    model = cfg["model"]
    _keys(model, MODEL_KEYS, f"{path}: model")
    name, model_path = model.get("config"), model.get("path")
    _require(name in (None, "tiny"), f"{path}: model.config", "'tiny' (or absent, with model.path)", name)
    _require(
        model_path is None or (isinstance(model_path, str) and model_path.strip()),
        f"{path}: model.path",
        "a directory path",
        model_path,
    )
    if (name is None) == (model_path is None):
        raise ConfigError(
            f"{path}: model: give either `path` (a DEEM directory) or `config: tiny`"
            + (", not both" if name is not None else "")
        )
    overrides = model.get("config_overrides")
    _require(
        overrides is None or isinstance(overrides, dict), f"{path}: model.config_overrides", "a mapping", overrides
    )
    _require(
        model.get("dtype") in (None, *DTYPES), f"{path}: model.dtype", f"one of {list(DTYPES)}", model.get("dtype")
    )
    for key in ("strict", "visible_init"):
        if key in model:
            _require(isinstance(model[key], bool), f"{path}: model.{key}", "true or false", model[key])
    if "seed" in model:
        _require(_is_int(model["seed"]) and model["seed"] >= 0, f"{path}: model.seed", "an integer >= 0", model["seed"])

    processor = cfg["processor"]
    _keys(processor, PROCESSOR_KEYS, f"{path}: processor")
    for key in ("size", "decoder_size"):
        if key in processor:
            value = processor[key]
            _require(_is_int(value) and value > 0, f"{path}: processor.{key}", "a positive integer", value)
    for key in ("do_center_crop", "do_flip"):
        if key in processor:
            _require(isinstance(processor[key], bool), f"{path}: processor.{key}", "true or false", processor[key])
    proc_path = processor.get("path")
    _require(
        proc_path is None or (isinstance(proc_path, str) and proc_path.strip()),
        f"{path}: processor.path",
        "a path",
        proc_path,
    )

    data = cfg["data"]
    _keys(data, DATA_KEYS, f"{path}: data")
    for key in ("packing", "mix", "collator"):
        if data.get(key) is not None:
            _require(isinstance(data[key], dict), f"{path}: data.{key}", "a mapping", data[key])
    sources = data.get("sources")
    if not sources:
        raise ConfigError(
            f"{path}: data.sources is empty (name -> reader spec, e.g. {{synthetic: {{type: synthetic}}}})"
        )
    _require(isinstance(sources, dict), f"{path}: data.sources", "a mapping of name -> reader spec", sources)
    kinds = (*READERS, "synthetic")
    for source_name, spec in sources.items():
        where = f"{path}: data.sources.{source_name}"
        _require(isinstance(spec, dict), where, "a mapping with a `type`", spec)
        _require(spec.get("type") in kinds, f"{where}.type", f"one of {list(kinds)}", spec.get("type"))
        if "weight" in spec:
            weight = spec["weight"]
            ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0
            _require(ok, f"{where}.weight", "a positive number", weight)
        if spec["type"] == "synthetic":
            if len(sources) > 1:
                raise ConfigError(f"{where}: a synthetic source cannot be mixed with others")
            _check_synthetic(spec, where)
            continue
        _keys(spec, READER_KEYS, where)
        needed = ("path",) if spec["type"] == "pairs" else ("path", "images")
        for key in needed:
            value = spec.get(key)
            ok = (isinstance(value, str) and value.strip()) or (isinstance(value, list) and value)
            _require(ok, f"{where}.{key}", "a path (or a list of paths)", value)
        if spec.get("kwargs") is not None:
            _require(isinstance(spec["kwargs"], dict), f"{where}.kwargs", "a mapping", spec["kwargs"])
        if "pack" in spec:
            _require(isinstance(spec["pack"], bool), f"{where}.pack", "true or false", spec["pack"])

    training = cfg["training"]
    bad = sorted(str(k) for k in training if not isinstance(k, str))
    if bad:
        raise ConfigError(f"{path}: training: keys must be names, got {bad}")


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_paths(cfg: dict) -> None:
    """The local folders the config names: ``model.path`` / ``processor.path`` must be save_pretrained directories
    (a path that does not exist locally but reads as a Hub repo id ``namespace/name`` is left to
    ``from_pretrained``)."""
    for where, folder, marker in (
        ("model.path", cfg["model"].get("path"), "config.json"),
        ("processor.path", cfg["processor"].get("path"), None),
    ):
        if folder is None:
            continue
        if os.path.exists(folder):
            if not os.path.isdir(folder):
                raise ConfigError(f"{where} {folder}: not a directory")
            if marker is not None and not os.path.isfile(os.path.join(folder, marker)):
                raise ConfigError(f"{where} {folder}: holds no {marker} (expected a DEEM save_pretrained directory)")
        elif not _REPO_ID.fullmatch(folder):
            raise ConfigError(f"{where} {folder}: no such directory")


def _check_synthetic(spec: dict, where: str) -> None:
    _keys(spec, SYNTHETIC_KEYS, where)
    for key, low in (("num_samples", 1), ("max_images", 1), ("seed", 0)):
        if key in spec:
            value = spec[key]
            _require(_is_int(value) and value >= low, f"{where}.{key}", f"an integer >= {low}", value)
    if "text_length" in spec:
        value = spec["text_length"]
        ok = (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(_is_int(v) and v >= 1 for v in value)
            and value[0] <= value[1]
        )
        _require(ok, f"{where}.text_length", "[min, max] with 1 <= min <= max", value)
    if "sft" in spec:
        _require(spec["sft"] in ("auto", True, False), f"{where}.sft", "auto, true or false", spec["sft"])


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
            raise ConfigError(f"{where} has no field {key!r}")
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
        _apply_overrides(config, overrides, "model.config_overrides")
        _validate(config)
        torch.manual_seed(int(model_cfg.get("seed", seed)))
        model = DeemForInterleavedGeneration(config)
        if model_cfg.get("visible_init", True):
            visible_init(model)
        return model.to(dtype) if dtype is not None else model
    path = model_cfg.get("path")
    if not path:
        raise ConfigError("model: give `path` (a DEEM directory) or `config: tiny`")
    try:
        config = DeemConfig.from_pretrained(path)
    except Exception as err:
        raise ConfigError(f"model.path {path}: not a readable DEEM config ({_first_line(err)})") from err
    _apply_overrides(config, overrides, "model.config_overrides")
    _validate(config)
    kwargs = {"config": config, "strict": bool(model_cfg.get("strict", True))}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return DeemForInterleavedGeneration.from_pretrained(path, **kwargs)


def _validate(config) -> None:
    try:
        config.validate_sizes()
    except ValueError as err:
        raise ConfigError(f"model.config_overrides: {err}") from err


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def tiny_processor(model_config):
    """A `DeemProcessor` for the tiny random model (``DeemConfig.tiny()``: 122 base ids + the six DEEM tokens).

    The tokenizer is LLaMA-like (``<unk>`` 0, ``<s>`` 1 added in front, ``</s>`` 2, ``▁`` word prefix) over single
    characters: ``▁``, the 94 printable ASCII characters, unused fillers and ``<pad>`` at the config's
    ``pad_token_id``; the six DEEM tokens follow at their config ids. Other characters are ``<unk>``. It is a plain
    ``tokenizers`` tokenizer (saved as tokenizer.json), so a reloaded copy tokenizes exactly the same."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from deem import DeemImageProcessor, DeemProcessor, prepare_tokenizer

    base = model_config.original_vocab_size
    pad = model_config.pad_token_id
    pieces = ["<unk>", "<s>", "</s>", "▁"] + [c for c in string.printable if not c.isspace()]
    if pad != base - 1 or len(pieces) >= base or (model_config.bos_token_id, model_config.eos_token_id) != (1, 2):
        raise ConfigError(
            f"the tiny processor needs bos 1, eos 2, pad_token_id = original_vocab_size - 1 and original_vocab_size > "
            f"{len(pieces)}; this config has bos {model_config.bos_token_id}, eos {model_config.eos_token_id}, pad "
            f"{pad}, original_vocab_size {base} (give processor.path)"
        )
    pieces += [f"<unused{i}>" for i in range(base - 1 - len(pieces))] + ["<pad>"]
    backend = Tokenizer(
        models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>", fuse_unk=True)
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    prepare_tokenizer(tokenizer)
    decoder = model_config.diffusion_config.image_size if model_config.diffusion_config is not None else 512
    processor = DeemProcessor(
        DeemImageProcessor(size=model_config.vision_config.image_size, decoder_size=decoder),
        tokenizer,
        num_image_tokens=model_config.num_image_tokens,
    )
    _check_processor_fits(processor, model_config, "the tiny processor")
    return processor


def _check_processor_fits(processor, model_config, where: str) -> None:
    names = ("soi", "image", "ref_start", "ref_end", "box_start", "box_end")
    ours = [getattr(processor, f"{n}_token_id", None) for n in names]
    theirs = [getattr(model_config, f"{n}_token_id", None) for n in names]
    if ours != theirs:
        raise ConfigError(f"{where}: special token ids {ours} differ from the model config's {theirs}")
    if processor.num_image_tokens != model_config.num_image_tokens:
        raise ConfigError(
            f"{where}: {processor.num_image_tokens} image tokens per image, the model uses "
            f"{model_config.num_image_tokens}"
        )


def build_processor(cfg: dict, model_config=None):
    """The run's `DeemProcessor`: ``processor.path``, else the model directory's, else (tiny model) `tiny_processor`;
    ``processor.size`` etc. change its image processor. ``None`` only for a tiny run without ``model_config``."""
    proc_cfg = dict(cfg.get("processor") or {})
    model_cfg = cfg.get("model") or {}
    path = proc_cfg.pop("path", None) or model_cfg.get("path")
    if path is not None:
        from deem import DeemProcessor

        try:
            processor = DeemProcessor.from_pretrained(path)
        except Exception as err:
            raise ConfigError(
                f"{path}: cannot load a DeemProcessor (tokenizer + processor_config.json) from it "
                f"({_first_line(err)}); give processor.path"
            ) from err
        if model_config is not None:
            _check_processor_fits(processor, model_config, f"the processor in {path}")
    elif model_config is not None:
        processor = tiny_processor(model_config)
    else:
        return None
    for key in ("size", "decoder_size", "do_center_crop", "do_flip"):
        if key in proc_cfg:
            setattr(processor.image_processor, key, proc_cfg.pop(key))
    if proc_cfg:
        raise ConfigError(f"processor: unknown keys {sorted(proc_cfg)}")
    return processor


def apply_peft(model, peft_cfg: dict | None):
    if not peft_cfg:
        return model
    from peft import get_peft_model

    from .trainer import deem_lora_config

    kwargs = dict(peft_cfg)
    targets = kwargs.pop("targets", ["llm"])
    try:
        lora = deem_lora_config(targets, **kwargs)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"peft: {_first_line(err)}") from err
    return get_peft_model(model, lora)


# ------------------------------------------------------------------------------------------------------------- data


def build_data(data_cfg: dict, processor, model_config, stage: int, seed: int):
    """(train_dataset, data_collator) from the ``data`` section."""
    from .trainer import SyntheticCollator, SyntheticInterleavedDataset

    sources = data_cfg.get("sources") or {}
    if not sources:
        raise ConfigError("data.sources is empty")
    types = {name: spec.get("type") for name, spec in sources.items()}
    if any(t == "synthetic" for t in types.values()):
        if len(sources) > 1:
            raise ConfigError("a synthetic source cannot be mixed with others")
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
        raise ConfigError(f"data.sources: unknown types {bad}; use one of {list(READERS) + ['synthetic']}")
    if processor is None:
        raise ConfigError("real data needs a processor (processor.path, or model.path with a saved processor)")
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
            raise ConfigError(f"data.sources.{name}: unknown keys {sorted(spec)}")
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


def training_arguments(cfg: dict, output_dir: str | None = None):
    """`DeemTrainingArguments` of the ``training`` section (``output_dir`` overrides it); unknown fields and values
    the arguments refuse raise `ConfigError` naming them."""
    import dataclasses

    from .trainer import DeemTrainingArguments

    stage = cfg["stage"]
    training = dict(cfg["training"])
    if output_dir is not None:
        training["output_dir"] = output_dir
    training.setdefault("output_dir", f"deem_stage{stage}_output")
    training["stage"] = stage
    fields = {f.name: f for f in dataclasses.fields(DeemTrainingArguments) if f.init}
    unknown = sorted(set(training) - set(fields))
    if unknown:
        raise ConfigError(f"training: unknown DeemTrainingArguments field(s) {unknown}")
    for key, value in list(training.items()):
        expected = _simple_type(fields[key].type)
        if expected is not None and float in expected and isinstance(value, str):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                value = training[key] = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"training.{key} must be a finite number, got {value!r}")
        if expected is not None and not _fits(value, expected):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
            raise ConfigError(f"training.{key} must be {names}, got {value!r}")
    try:
        return DeemTrainingArguments(**training)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"training: {_first_line(err)}") from err


def _simple_type(annotation):
    """The plain types an argument field accepts (``(int,)``, ``(float, NoneType)`` ...), or ``None`` when its
    annotation is anything richer (enums, unions of other types, strings of annotations ...), left to the class."""
    import types
    import typing

    if isinstance(annotation, str):
        names = {"int": int, "float": float, "bool": bool, "str": str}
        parts = [p.strip() for p in annotation.replace("Optional[", "").rstrip("]").split("|")]
        if all(p in names or p == "None" for p in parts):
            return tuple(type(None) if p == "None" else names[p] for p in parts)
        return None
    if annotation in (int, float, bool, str):
        return (annotation,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if all(a in (int, float, bool, str, type(None)) for a in args):
            return args
    return None


def _fits(value, expected) -> bool:
    for kind in expected:
        if kind is type(None) and value is None:
            return True
        if kind is bool and isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind is str and isinstance(value, str):
            return True
    return False


def build_trainer(cfg: dict, output_dir: str | None = None):
    """Model, data, arguments and the [`DeemTrainer`] for a loaded config (see [`load_config`])."""
    from .trainer import DeemTrainer

    stage = cfg["stage"]
    args = training_arguments(cfg, output_dir)
    model = build_model(cfg["model"], seed=args.seed)
    processor = build_processor(cfg, model.config)
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


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("checkpoint-*") if p.is_dir()) if folder.is_dir() else []


def _output_dir(cfg: dict, output_dir: str | None) -> Path:
    out = output_dir or cfg["training"].get("output_dir") or f"deem_stage{cfg['stage']}_output"
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise ConfigError(f"training.output_dir must be a path, got {out!r}")
    return Path(out)


def _check_resume(resume, out: Path):
    if resume is None or resume is False:
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() in ("true", "last")):
        if not _checkpoints(out):
            raise FileNotFoundError(f"--resume_from_checkpoint: no checkpoint-* folder in {out} to resume from")
        return True
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: not a checkpoint directory")
    return str(resume)


def run(args) -> None:
    """``deem train`` with parsed arguments (see `deem.cli`)."""
    cfg = load_config(args.config, args.sets, args.stage)
    check_paths(cfg)
    out = _output_dir(cfg, args.output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out}: exists and is not a directory")
    for where in ("model", "processor"):
        source = cfg[where].get("path")
        if source is not None and os.path.isdir(source) and out.resolve() == Path(source).resolve():
            raise ConfigError(f"output_dir {out} is the {where}.path folder: the run would overwrite its own input")
    resume = _check_resume(args.resume_from_checkpoint, out)
    if os.environ.get("DEEM_VERBOSE"):
        from transformers.utils import logging

        logging.set_verbosity_info()
    created = not out.exists()
    started = time.time() - 1.0  # file times may be coarser than the clock
    main_process = _is_main_process()
    try:
        trainer = build_trainer(cfg, str(out))
        if args.dry_run:
            if trainer.is_world_process_zero():
                print_plan(trainer)
            return
        if trainer.is_world_process_zero():
            print(f"deem train: stage {cfg['stage']}, writing to {out.resolve()}", flush=True)
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        trainer.save_state()
        if trainer.is_world_process_zero() and trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(trainer.args.output_dir)
        if trainer.is_world_process_zero():
            from deem.conversion.assemble import normalize_permissions

            # what this run wrote (safetensors writes 0600): all of a folder it made, else the files it wrote
            normalize_permissions(out, since=None if created else started)
    except BaseException as err:
        if created and main_process and out.is_dir():
            kept = _checkpoints(out)
            if kept:
                if isinstance(err, Exception):
                    err.add_note(f"(the checkpoints in {out} are kept: resume with --resume_from_checkpoint)")
            else:
                shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if args.dry_run and created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a dry run writes nothing
    if trainer.is_world_process_zero():
        saved = "model and processor" if trainer.processing_class is not None else "model"
        print(f"deem train: saved the {saved} to {out.resolve()}", flush=True)


def main(argv=None):
    """``main(list)`` parses and runs, raising on bad input (``UsageError``, `ConfigError`, ``FileNotFoundError``);
    ``main()`` (``python -m deem.trainers``) is the command line: errors are one line and an exit status."""
    from deem import cli

    if argv is None:
        return cli.main(["train", *sys.argv[1:]])
    return run(cli.parse_command("train", argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
