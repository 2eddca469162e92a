"""Assemble a fresh DEEM, ready for stage-1 training, from component checkpoints on disk.

Inputs (all local, nothing is downloaded):

* ``llm_path``: a LLaMA / Vicuna directory in Hugging Face format: ``config.json``, weights
  (``model.safetensors``, ``model-*-of-*.safetensors`` + index, or ``pytorch_model*.bin``) and the tokenizer.
* ``sd_path``: a Stable Diffusion 2.1 directory in diffusers format: ``unet/``, ``vae/``, ``scheduler/`` and, used
  once to compute the null condition, ``text_encoder/`` + ``tokenizer/``.
* ``clip_path``: an open_clip ConvNeXt checkpoint file (``open_clip_pytorch_model.bin``, ``.pt`` or
  ``.safetensors``); only ``visual.trunk.*`` is used.

Sizes are read from these files (LLaMA config, ConvNeXt depths/widths from the state-dict keys, the SD configs).
Loading is strict: every tensor of every file is either loaded or belongs to a listed ignored part, and every
weight the components must fill is present with the right shape; anything else raises :class:`AssemblyError`
(a ``ValueError``) naming the file and the keys. The new parts keep the model's own initialisation, which is the
original's (reference §2.1, §2.6, §2.7, §2.11): cross-attention gates 0, deformable-attention offsets, perceivers,
adapters, zero side-network convs, zero ``<|startofimage|>`` vector; the six new vocabulary rows of the input
embedding are normal(0, initializer_range) (the resize default of transformers 4.31), the text head rows of the
new tokens are 0 with bias -100 and the new-token head has weight 0 and bias 95, so every new token starts at
logit -5. ``null_condition`` is SD's text-encoder output for the empty prompt (as the original computes it).

Every input is checked before the model is built: the folders and files, their configs, the sizes, the output
folder (new or empty unless ``overwrite``; never a folder that holds an input); weights with NaN / inf are refused
(``allow_nonfinite=True`` / ``--allow-nonfinite`` accepts them). The result is saved into a new folder beside
``output_dir`` that is renamed into place at the end; on any error it is removed and nothing is left behind.

Python: :func:`assemble_deem`. Command line::

    deem assemble --llm DIR --sd DIR --clip FILE --out DIR [--image-size 256] ...
"""

import contextlib
import json
import os
import pickle
import re
import shutil
import sys
import uuid
import zipfile
from pathlib import Path

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "AssemblyError",
    "assemble_deem",
    "check_output_dir",
    "infer_convnext_layout",
    "main",
    "normalize_permissions",
    "staged_output_dir",
]


class AssemblyError(ValueError):
    """A component checkpoint that cannot be assembled; the message names the file(s) and the keys."""


# ---------------------------------------------------------------------------------------------------------------------
# what is deliberately not loaded
# ---------------------------------------------------------------------------------------------------------------------

# open_clip checkpoint: the text tower of the CLIP model and the vision projection head (§2.2.1: the original loads
# the file with strict=False, so only ``visual.trunk.*`` is used).
CLIP_IGNORED_PREFIXES = (
    "visual.head.",
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
    "logit_scale",
    "logit_bias",
    "attn_mask",
    "text.",  # CustomTextCLIP layouts keep the whole text tower under ``text.``
)
# LLaMA checkpoints written by transformers < 4.35 carry the rotary tables as (recomputed) buffers.
LLAMA_IGNORED_PATTERNS = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"),)

_LLM_WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_SD_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
)
_MAX_LISTED = 25


def _listing(keys, limit: int = _MAX_LISTED) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ---------------------------------------------------------------------------------------------------------------------
# reading weight files (headers first, tensors later)
# ---------------------------------------------------------------------------------------------------------------------


def _torch_load(path: Path) -> dict:
    """``torch.load(weights_only=True)``; pickles that need arbitrary code are refused with a clear error."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
        lines = [line for line in lines if line]
        why = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else type(err).__name__)
        raise AssemblyError(
            f"{path}: refused to load: the pickle needs objects other than tensors and plain containers, so it could "
            f"run arbitrary code (torch.load(weights_only=True) refused it: {why}). Convert it to safetensors from a "
            "source you trust."
        ) from err
    except Exception as err:  # truncated / corrupt zip, not a torch file, ...
        raise AssemblyError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {err})") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # open_clip training checkpoints (epoch_*.pt)
    if not isinstance(obj, dict):
        raise AssemblyError(f"{path}: expected a state dict (a dict of tensors), got {type(obj).__name__}")
    if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}  # saved from DistributedDataParallel
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise AssemblyError(f"{path}: entries that are not tensors: {_listing(bad)}")
    return obj


class _WeightFile:
    """One weight file: ``shapes`` (key -> shape) without reading the data of a safetensors file; ``tensors()``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._loaded = None
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(self.path), framework="pt") as f:
                    self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            except Exception as err:
                raise AssemblyError(
                    f"{self.path}: not a readable safetensors file ({type(err).__name__}: {err})"
                ) from err
        else:
            self._loaded = _torch_load(self.path)
            self.shapes = {k: tuple(v.shape) for k, v in self._loaded.items()}

    def tensors(self):
        """Yield (key, tensor) for every tensor of the file."""
        if self._loaded is not None:
            yield from self._loaded.items()
            return
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except AssemblyError:
            raise
        except Exception as err:
            raise AssemblyError(f"{self.path}: cannot read tensor data ({type(err).__name__}: {err})") from err

    def release(self):
        self._loaded = None


def _weight_files(directory: Path, names: tuple[str, ...], what: str) -> list[_WeightFile]:
    """The weight files of a HF / diffusers directory: a single file or the shards listed by an index (the first of
    ``names`` that exists, safetensors before pickles)."""
    for name in names:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [_WeightFile(path)]
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except Exception as err:
            raise AssemblyError(f"{path}: not a readable shard index ({type(err).__name__}: {err})") from err
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (directory / s).is_file()]
        if absent:
            raise AssemblyError(f"{path}: shard(s) listed in the index are missing: {_listing(absent)}")
        files = [_WeightFile(directory / s) for s in shards]
        found = {k: f.path.name for f in files for k in f.shapes}
        wrong = [k for k, s in weight_map.items() if found.get(k) != s] + [k for k in found if k not in weight_map]
        if wrong:
            raise AssemblyError(f"{path}: the index does not match the shards' contents for key(s): {_listing(wrong)}")
        return files
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise AssemblyError(
        f"{directory}: no {what} weights found (looked for {', '.join(names)}; the folder holds: "
        f"{', '.join(present) or 'nothing'})"
    )


def _check_input_paths(llm_path, sd_path, clip_path) -> tuple[Path, Path, Path]:
    llm_path, sd_path, clip_path = Path(llm_path), Path(sd_path), Path(clip_path)
    for path, what in ((llm_path, "LLaMA directory"), (sd_path, "Stable Diffusion directory")):
        if not path.is_dir():
            raise AssemblyError(f"{path}: not a directory ({what})")
    if not clip_path.is_file():
        raise AssemblyError(f"{clip_path}: not a file (open_clip checkpoint)")
    _check_clip_suffix(clip_path)
    return llm_path, sd_path, clip_path


def _check_clip_suffix(path: Path) -> None:
    if path.suffix not in (".bin", ".pt", ".pth", ".safetensors"):
        raise AssemblyError(
            f"{path}: unsupported open_clip checkpoint format {path.suffix!r} (use .bin, .pt or .safetensors)"
        )


def _load_clip_file(path: Path) -> _WeightFile:
    _check_clip_suffix(path)
    return _WeightFile(path)


# ---------------------------------------------------------------------------------------------------------------------
# sizes read from the components
# ---------------------------------------------------------------------------------------------------------------------

_TRUNK = "visual.trunk."
_BLOCK_RE = re.compile(r"^visual\.trunk\.stages\.(\d+)\.blocks\.(\d+)\.")


def infer_convnext_layout(shapes: dict[str, tuple], source: str = "the open_clip checkpoint") -> dict:
    """ConvNeXt ``depths``, ``dims`` and whether blocks have layer-scale ``gamma``
    from ``visual.trunk.*`` key shapes."""
    blocks: dict[int, set[int]] = {}
    for key in shapes:
        m = _BLOCK_RE.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks:
        raise AssemblyError(
            f"{source}: no ConvNeXt trunk found (no 'visual.trunk.stages.*.blocks.*' keys); is this an open_clip "
            "ConvNeXt checkpoint?"
        )
    stages = sorted(blocks)
    if stages != list(range(len(stages))) or len(stages) != 4:
        raise AssemblyError(f"{source}: expected a 4-stage ConvNeXt trunk, found stages {stages}")
    depths, dims = [], []
    for s in stages:
        idx = sorted(blocks[s])
        if idx != list(range(len(idx))):
            raise AssemblyError(f"{source}: stage {s} has non-consecutive block indices {idx}")
        depths.append(len(idx))
        key = f"{_TRUNK}stages.{s}.blocks.0.conv_dw.weight"
        if key not in shapes:
            raise AssemblyError(f"{source}: missing {key}, cannot read the width of stage {s}")
        dims.append(int(shapes[key][0]))
    has_gamma = any(k.endswith(".gamma") for k in shapes if k.startswith(_TRUNK))
    return {"depths": depths, "dims": dims, "layer_scale": has_gamma}


def _read_json(path: Path, what: str, required=()) -> dict:
    if not path.is_file():
        raise AssemblyError(f"{path}: missing ({what})")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except Exception as err:
        raise AssemblyError(f"{path}: not readable JSON ({type(err).__name__}: {err})") from err
    if not isinstance(value, dict):
        raise AssemblyError(f"{path}: expected a JSON object ({what}), got a JSON {type(value).__name__}")
    missing = [key for key in required if key not in value]
    if missing:
        raise AssemblyError(f"{path}: not a usable {what}: no {', '.join(missing)}")
    return value


def _clean(config: dict) -> dict:
    """A diffusers config dict without its bookkeeping keys (``_class_name``, ``_diffusers_version`` ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _text_config(llm_path: Path, vocab_size: int, pad_token_id: int):
    """(text_config kwargs for DeemConfig, the checkpoint's own LlamaConfig)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(llm_path)
    except Exception as err:
        raise AssemblyError(
            f"{llm_path / 'config.json'}: cannot read the LLM config ({type(err).__name__}: {err})"
        ) from err
    if config.model_type != "llama":
        raise AssemblyError(
            f"{llm_path / 'config.json'}: DEEM's language model is a LLaMA; this config has model_type "
            f"{config.model_type!r}"
        )
    text = config.to_dict()
    for key in (
        "architectures",
        "transformers_version",
        "_name_or_path",
        "dtype",
        "torch_dtype",
        "auto_map",
        "id2label",
        "label2id",
    ):
        text.pop(key, None)
    text.update(vocab_size=vocab_size, pad_token_id=pad_token_id, tie_word_embeddings=False)
    return text, config


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _unknown_override_keys(reference, overrides: dict, where: str = "") -> list[str]:
    """Keys of ``overrides`` that name no field of the config ``reference`` (``DeemConfig`` keeps unknown kwargs as
    plain attributes, so a misspelt key would silently change nothing)."""
    from transformers import PretrainedConfig

    unknown = []
    for key, value in overrides.items():
        name = f"{where}.{key}" if where else str(key)
        if isinstance(reference, dict):
            continue  # a free-form dict field (the UNet / VAE / scheduler configs)
        if not isinstance(key, str) or not hasattr(reference, key):
            unknown.append(name)
            continue
        current = getattr(reference, key)
        if isinstance(value, dict) and isinstance(current, PretrainedConfig):
            unknown += _unknown_override_keys(current, value, name)
    return unknown


# ---------------------------------------------------------------------------------------------------------------------
# strict key bookkeeping and copying
# ---------------------------------------------------------------------------------------------------------------------


class _Component:
    """Maps the tensors of some files onto model keys; ``check`` lists every problem, ``copy_into`` loads."""

    def __init__(
        self, name: str, files: list[_WeightFile], rename, expected: dict[str, tuple], row_prefix=(), source_name=None
    ):
        self.name, self.files, self.rename = name, files, rename
        self.source_name = source_name or (lambda key: key)  # model key -> checkpoint key, for messages
        self.expected = expected  # model key -> shape the source must have
        self.row_prefix = set(row_prefix)  # model keys filled in their first rows only (resized vocab)
        self.mapping: dict[str, str] = {}  # source key -> model key
        self.ignored: list[str] = []

    def where(self) -> str:
        paths = sorted({str(f.path) for f in self.files})
        return paths[0] if len(paths) == 1 else f"{Path(paths[0]).parent} ({len(paths)} files)"

    def check(self) -> None:
        unknown, mismatched, doubled = [], [], []
        filled: dict[str, str] = {}
        for f in self.files:
            for key, shape in f.shapes.items():
                target = self.rename(key)
                if target is None:
                    self.ignored.append(key)
                    continue
                if target is False or target not in self.expected:
                    unknown.append(key)
                    continue
                if target in filled:
                    doubled.append(f"{key} and {filled[target]} (both -> {target})")
                    continue
                want = self.expected[target]
                if tuple(shape) != tuple(want):
                    mismatched.append(f"{key}: checkpoint {tuple(shape)} vs expected {tuple(want)}")
                filled[target] = key
                self.mapping[key] = target
        missing = sorted(self.source_name(k) for k in set(self.expected) - set(filled))
        problems = []
        if unknown:
            problems.append(
                f"{len(unknown)} tensor(s) that are neither used nor a known ignored part: {_listing(unknown)}"
            )
        if missing:
            problems.append(f"{len(missing)} required tensor(s) missing: {_listing(missing)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
        if doubled:
            problems.append(f"duplicate tensors: {_listing(doubled)}")
        if problems:
            raise AssemblyError(f"{self.where()}: the {self.name} checkpoint does not fit: " + "; ".join(problems))

    @torch.no_grad()
    def copy_into(self, state: dict[str, torch.Tensor], allow_nonfinite: bool = False) -> int:
        count = 0
        for f in self.files:
            for key, tensor in f.tensors():
                target = self.mapping.get(key)
                if target is None:
                    continue
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    if not allow_nonfinite:
                        raise AssemblyError(
                            f"{f.path}: {key} holds NaN or inf (a diverged or corrupt {self.name} checkpoint; "
                            "allow_nonfinite=True / --allow-nonfinite loads it anyway)"
                        )
                    logger.warning(f"{f.path}: {key} holds NaN or inf")
                dest = state[target]
                if dest.is_floating_point() and not tensor.is_floating_point():
                    raise AssemblyError(
                        f"{f.path}: {key} holds {tensor.dtype} values where the {self.name} weight is floating point"
                    )
                if target in self.row_prefix:
                    dest = dest[: tensor.shape[0]]
                dest.copy_(tensor.to(dest.dtype))
                count += 1
            f.release()
        return count


def _deprecated_attention_renames(module: torch.nn.Module) -> dict[str, str]:
    """Old diffusers attention names (``query``/``key``/``value``/``proj_attn``, SD-era VAE files) -> current ones."""
    out = {}
    for path, sub in module.named_modules():
        if getattr(sub, "_from_deprecated_attn_block", False):
            for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")):
                for param in ("weight", "bias"):
                    out[f"{path}.{old}.{param}"] = f"{path}.{new}.{param}"
    return out


# ---------------------------------------------------------------------------------------------------------------------
# null condition
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_progress_bar():
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


@torch.no_grad()
def _null_condition(sd_path: Path) -> torch.Tensor | None:
    """SD text-encoder ``last_hidden_state`` [1, L, D] for "" padded to the tokenizer's ``model_max_length`` (no
    attention mask, as StableDiffusionPipeline for SD 2.1); ``None`` with a warning when the encoder is absent."""
    te_dir, tok_dir = sd_path / "text_encoder", sd_path / "tokenizer"
    absent = [str(p) for p in (te_dir, tok_dir) if not p.is_dir()]
    if absent:
        logger.warning(
            f"{', '.join(absent)} not found: null_condition keeps its random init (normal(0, 0.02)) instead of the SD "
            "text-encoder embedding of the empty prompt"
        )
        return None
    from transformers import AutoTokenizer, CLIPTextModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except Exception as err:
        raise AssemblyError(f"{tok_dir}: cannot load the SD tokenizer ({type(err).__name__}: {err})") from err
    try:
        with _no_progress_bar():  # a one-off helper load: its bar would only add noise to the assembly's output
            encoder, info = CLIPTextModel.from_pretrained(te_dir, output_loading_info=True, dtype=torch.float32)
    except Exception as err:
        raise AssemblyError(f"{te_dir}: cannot load the SD text encoder ({type(err).__name__}: {err})") from err
    bad = list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    if bad:
        raise AssemblyError(f"{te_dir}: the text-encoder weights do not fit its config: {_listing(bad)}")
    length = tokenizer.model_max_length
    max_pos = encoder.config.max_position_embeddings
    if not isinstance(length, int) or length > max_pos:
        raise AssemblyError(
            f"{tok_dir}: model_max_length {length!r} is not a usable prompt length for a text encoder "
            f"with {max_pos} positions"
        )
    ids = tokenizer([""], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder.eval()(ids).last_hidden_state.float()


# ---------------------------------------------------------------------------------------------------------------------
# assembly
# ---------------------------------------------------------------------------------------------------------------------


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return value


def _assemble(
    llm_path,
    sd_path,
    clip_path,
    *,
    image_size: int = 256,
    num_image_tokens: int = 77,
    image_embed_dim: int = 1024,
    decoder_image_size: int | None = None,
    config_overrides: dict | None = None,
    dtype=torch.float32,
    seed: int | None = None,
    allow_nonfinite: bool = False,
):
    from transformers import AutoTokenizer

    from deem.modeling.configuration_deem import DeemConfig
    from deem.modeling.image_processing_deem import DeemImageProcessor
    from deem.modeling.mmfs import check_unet_supported
    from deem.modeling.modeling_deem import DeemForInterleavedGeneration, current_to_legacy_keys
    from deem.modeling.processing_deem import DEEM_SPECIAL_TOKENS, DeemProcessor, prepare_tokenizer

    llm_path, sd_path, clip_path = _check_input_paths(llm_path, sd_path, clip_path)
    dtype = _as_dtype(dtype)
    if not (isinstance(image_size, int) and not isinstance(image_size, bool) and 32 <= image_size):
        raise ValueError(
            f"image_size must be an encoder side of at least 32 px (the ConvNeXt stride), got {image_size!r}"
        )
    _check_size("image_embed_dim", image_embed_dim, 16, "the cross-attention heads")
    _check_size("num_image_tokens", num_image_tokens, 1, "tokens per image")
    if decoder_image_size is not None:
        _check_size("decoder_image_size", decoder_image_size, 8, "the VAE factor")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
    if config_overrides is not None and not isinstance(config_overrides, dict):
        raise ValueError(f"config_overrides must be a dict of DeemConfig kwargs, got {type(config_overrides).__name__}")
    if config_overrides:
        unknown = _unknown_override_keys(DeemConfig(), config_overrides)
        if unknown:
            raise AssemblyError(f"config_overrides: unknown DeemConfig field(s) {unknown}")

    # ---- LLM: tokenizer, config, weight headers
    llm_config = _read_json(llm_path / "config.json", "LLM config", required=("vocab_size", "hidden_size"))
    original_vocab = int(llm_config.get("vocab_size", 0))
    try:
        tokenizer = AutoTokenizer.from_pretrained(llm_path)
    except Exception as err:
        raise AssemblyError(f"{llm_path}: cannot load the LLaMA tokenizer ({type(err).__name__}: {err})") from err
    prepare_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab()
    new_ids = [vocab[t] for t in DEEM_SPECIAL_TOKENS]
    want_ids = [original_vocab + i for i in range(len(DEEM_SPECIAL_TOKENS))]
    if new_ids != want_ids or len(tokenizer) != original_vocab + len(DEEM_SPECIAL_TOKENS):
        raise AssemblyError(
            f"{llm_path}: the tokenizer ({len(tokenizer)} tokens after adding "
            f"{list(DEEM_SPECIAL_TOKENS)} at ids {new_ids}) "
            f"does not line up with the LLM's vocab_size {original_vocab}: DEEM needs the six new tokens at "
            f"{want_ids[0]}..{want_ids[-1]}, right after the base vocabulary"
        )
    vocab_size = len(tokenizer)
    text_config, hf_text_config = _text_config(llm_path, vocab_size, tokenizer.pad_token_id)
    llm_files = _weight_files(llm_path, _LLM_WEIGHT_NAMES, "LLaMA")

    # ---- Stable Diffusion: configs, weight headers, null condition
    unet_cfg = _clean(
        _read_json(
            sd_path / "unet" / "config.json",
            "UNet config",
            required=("sample_size", "cross_attention_dim", "block_out_channels", "down_block_types"),
        )
    )
    vae_cfg = _clean(_read_json(sd_path / "vae" / "config.json", "VAE config", required=("block_out_channels",)))
    sched_cfg = _clean(_read_json(sd_path / "scheduler" / "scheduler_config.json", "scheduler config"))
    prediction = sched_cfg.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise AssemblyError(
            f"{sd_path / 'scheduler' / 'scheduler_config.json'}: prediction_type {prediction!r}; "
            "DEEM's diffusion losses "
            "regress the added noise (epsilon), as SD-2.1-base does (SD-2.1 768-v is a v-prediction model)"
        )
    unet_files = _weight_files(sd_path / "unet", _SD_WEIGHT_NAMES, "UNet")
    vae_files = _weight_files(sd_path / "vae", _SD_WEIGHT_NAMES, "VAE")
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    if decoder_image_size is None:
        # what StableDiffusionPipeline uses as its default resolution (512 for SD-2.1-base)
        decoder_image_size = int(unet_cfg["sample_size"]) * vae_factor
    latent_step = vae_factor * 2 ** (len(unet_cfg["down_block_types"]) - 1)
    if decoder_image_size % latent_step:
        raise AssemblyError(
            f"decoder_image_size {decoder_image_size} is not a multiple of {latent_step} (the VAE factor {vae_factor} "
            f"times the {len(unet_cfg['down_block_types']) - 1} UNet downsamplings of {sd_path / 'unet'})"
        )
    null = _null_condition(sd_path)

    # ---- open_clip ConvNeXt
    clip_file = _load_clip_file(clip_path)
    layout = infer_convnext_layout(clip_file.shapes, str(clip_path))

    # ---- config
    sides = [image_size // 2 ** (level + 2) for level in range(4)]
    vision = dict(
        depths=layout["depths"],
        dims=layout["dims"],
        embed_dim=image_embed_dim,
        image_size=image_size,
        grid_size=image_size // 16,
    )
    if not layout["layer_scale"]:
        vision["ls_init_value"] = None
    decoder_perceiver = dict(DeemConfig.sub_configs_defaults["decoder_perceiver_config"].init_kwargs)
    decoder_perceiver.update(
        num_queries=null.shape[1] if null is not None else 77,
        hidden_size=unet_cfg["cross_attention_dim"],
        encoder_hidden_size=text_config["hidden_size"],
    )
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else text_config.get("bos_token_id")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else text_config.get("eos_token_id")
    kwargs = dict(
        vision_config=vision,
        perceiver_config=dict(num_queries=num_image_tokens, encoder_hidden_size=image_embed_dim),
        text_config=text_config,
        cross_attention_config={},
        decoder_perceiver_config=decoder_perceiver,
        diffusion_config=dict(
            unet=unet_cfg,
            vae=vae_cfg,
            scheduler=sched_cfg,
            image_size=decoder_image_size,
            side_attn_dim=image_embed_dim,
            side_spatial_shapes=sides,
        ),
        image_embed_dim=image_embed_dim,
        num_image_tokens=num_image_tokens,
        original_vocab_size=original_vocab,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        soi_token_id=new_ids[0],
        image_token_id=new_ids[1],
        ref_start_token_id=new_ids[2],
        ref_end_token_id=new_ids[3],
        box_start_token_id=new_ids[4],
        box_end_token_id=new_ids[5],
    )
    kwargs = _merge(kwargs, config_overrides or {})
    try:
        config = DeemConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise AssemblyError(f"the component sizes do not make a valid DeemConfig: {err}") from err
    if config.num_image_tokens != config.perceiver_config.num_queries:
        raise AssemblyError(
            f"num_image_tokens {config.num_image_tokens} != perceiver_config.num_queries "
            f"{config.perceiver_config.num_queries}"
        )
    if config.diffusion_config is None:
        raise AssemblyError("config_overrides turned the diffusion part off; assembly is for stage 1, which needs it")
    if null is not None and config.decoder_perceiver_config.num_queries != null.shape[1]:
        raise AssemblyError(
            f"decoder_perceiver_config.num_queries is {config.decoder_perceiver_config.num_queries} but the SD text "
            f"encoder's prompt length (tokenizer model_max_length in {sd_path / 'tokenizer'}) is {null.shape[1]}: the "
            "null condition and the decoder perceiver's output must have the same number of tokens"
        )
    if null is not None and null.shape[2] != config.diffusion_config.unet["cross_attention_dim"]:
        raise AssemblyError(
            f"{sd_path / 'text_encoder'}: hidden size {null.shape[2]} != UNet cross_attention_dim "
            f"{config.diffusion_config.unet['cross_attention_dim']}"
        )

    # ---- key maps, checked against the model's shapes before any real weight is allocated
    try:
        with torch.device("meta"):
            skeleton = DeemForInterleavedGeneration(config)
        check_unet_supported(skeleton.unet)
    except ValueError as err:
        raise AssemblyError(f"{sd_path / 'unet' / 'config.json'}: {err}") from err
    # the key tables below are written in the layout before the model split (``image_encoder.``, ``unet.``, ...)
    shapes = {k: tuple(v.shape) for k, v in current_to_legacy_keys(skeleton.state_dict()).items()}
    unet_renames = _deprecated_attention_renames(skeleton.unet)
    vae_renames = _deprecated_attention_renames(skeleton.vae)
    del skeleton

    hidden = config.text_config.hidden_size
    llm_keys = {k for k in shapes if k.startswith("language_model.") and ".cross_attn." not in k}
    llm_expected = {k: shapes[k] for k in llm_keys}
    llm_expected["language_model.embed_tokens.weight"] = (original_vocab, hidden)
    source_keys = {k for f in llm_files for k in f.shapes}
    has_prefix = any(k.startswith("model.") for k in source_keys)
    tied = bool(getattr(hf_text_config, "tie_word_embeddings", False)) and "lm_head.weight" not in source_keys
    if not tied:
        llm_expected["lm_head.base.weight"] = (original_vocab, hidden)

    def rename_llm(key):
        if any(p.search(key) for p in LLAMA_IGNORED_PATTERNS):
            return None
        if key == "lm_head.weight":
            return "lm_head.base.weight"
        if has_prefix:
            return "language_model." + key[len("model.") :] if key.startswith("model.") else False
        return "language_model." + key  # a bare LlamaModel checkpoint

    def rename_sd(prefix, renames):
        return lambda key: prefix + renames.get(key, key)

    def rename_clip(key):
        if key.startswith(_TRUNK):
            return "image_encoder.backbone.trunk." + key[len(_TRUNK) :]
        if key.startswith(CLIP_IGNORED_PREFIXES):
            return None
        return False

    def llm_source_name(key):
        if key == "lm_head.base.weight":
            return "lm_head.weight"
        return ("model." if has_prefix else "") + key[len("language_model.") :]

    def strip(prefix, new_prefix=""):
        return lambda key: new_prefix + key[len(prefix) :]

    trunk_prefix = "image_encoder.backbone.trunk."
    components = [
        _Component(
            "LLaMA",
            llm_files,
            rename_llm,
            llm_expected,
            row_prefix=("language_model.embed_tokens.weight", "lm_head.base.weight"),
            source_name=llm_source_name,
        ),
        _Component(
            "UNet",
            unet_files,
            rename_sd("unet.", unet_renames),
            {k: v for k, v in shapes.items() if k.startswith("unet.")},
            source_name=strip("unet."),
        ),
        _Component(
            "VAE",
            vae_files,
            rename_sd("vae.", vae_renames),
            {k: v for k, v in shapes.items() if k.startswith("vae.")},
            source_name=strip("vae."),
        ),
        _Component(
            "open_clip ConvNeXt",
            [clip_file],
            rename_clip,
            {k: v for k, v in shapes.items() if k.startswith(trunk_prefix)},
            source_name=strip(trunk_prefix, _TRUNK),
        ),
    ]
    for component in components:
        component.check()

    # ---- the real model: its own init is the original's for the new parts (seeded), then the weights
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = DeemForInterleavedGeneration(config)
    state = current_to_legacy_keys(model.state_dict())  # views of the model's tensors, under the tables' names
    report = {"components": {}, "config": config}
    for component in components:
        loaded = component.copy_into(state, allow_nonfinite=allow_nonfinite)
        report["components"][component.name] = {
            "source": component.where(),
            "loaded": loaded,
            "ignored": sorted(component.ignored),
        }
    with torch.no_grad():
        if tied:
            model.lm_head.base.weight[:original_vocab].copy_(model.language_model.embed_tokens.weight[:original_vocab])
        model.lm_head.reset_new_token_rows()
        if null is not None:
            if not bool(torch.isfinite(null).all()) and not allow_nonfinite:
                raise AssemblyError(
                    f"{sd_path / 'text_encoder'}: the text encoder gives NaN / inf for the empty prompt"
                )
            model.null_condition.copy_(null.to(model.null_condition.dtype))
    report["tied_embeddings"] = tied
    report["null_condition"] = "SD text encoder on the empty prompt" if null is not None else "random (no text encoder)"

    gates = [layer.cross_attn.gate for layer in model.language_model.layers if layer.cross_attn is not None]
    if any(bool(g.ne(0).any()) for g in gates):
        raise RuntimeError("internal error: a cross-attention gate is not 0 after assembly")

    if dtype != torch.float32:
        model.to(dtype)
        for name in getattr(model, "_keep_in_fp32_modules_strict", None) or []:
            module = getattr(model, name, None)
            if module is not None:
                module.float()
    model.config.dtype = dtype
    model.set_training_stage(1).eval()

    image_processor = DeemImageProcessor(size=image_size, decoder_size=config.diffusion_config.image_size)
    processor = DeemProcessor(image_processor, tokenizer, num_image_tokens=config.num_image_tokens)
    return model, processor, report


def _check_size(name: str, value, step: int, why: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0 and value % step == 0):
        expected = "a positive integer" if step == 1 else f"a positive multiple of {step} ({why})"
        raise ValueError(f"{name} must be {expected}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------------
# the output folder
# ---------------------------------------------------------------------------------------------------------------------


def check_output_dir(
    output_dir, overwrite: bool = False, inputs=(), overwrite_hint: str | None = "--overwrite / overwrite=True"
) -> Path:
    """Refuse, before any work, an output folder that cannot receive the result: an existing file or symbolic link,
    a non-empty folder (unless ``overwrite``; ``overwrite_hint`` names the switch in the message), a folder that is or
    holds one of the ``inputs``, a place under a file or a folder that cannot be written. Returns the path."""
    out = Path(output_dir)
    if out.is_symlink():
        raise FileExistsError(f"{out}: is a symbolic link; give the real folder")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out}: exists and is not a directory")
        if not overwrite and any(out.iterdir()):
            hint = f", or pass {overwrite_hint} to replace it" if overwrite_hint else ""
            raise FileExistsError(f"{out}: exists and is not empty (choose a new folder{hint})")
    resolved = out.resolve()
    for item in inputs:
        source = Path(item).resolve()
        if source == resolved or resolved in source.parents:
            raise ValueError(f"{out}: the output folder would replace the input {item}; choose another folder")
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{out}: cannot be created, {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{out}: cannot be created, {ancestor} is not writable")
    return out


@contextlib.contextmanager
def staged_output_dir(output_dir, overwrite: bool = False):
    """Yield a new folder beside ``output_dir``; when the block succeeds it becomes ``output_dir`` (an existing empty
    folder is replaced; a non-empty one only with ``overwrite``). On any error the new folder, and any parent
    folders made for it, are removed. The folder gets the permissions of ``mkdir`` under the current umask."""
    out = Path(output_dir).absolute()
    made = []  # parent folders created here, deepest first
    parent = out.parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    for folder in reversed(made):
        folder.mkdir()
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    placed = False
    try:
        tmp.mkdir()
        yield tmp
        normalize_permissions(tmp, dir_mode=tmp.stat().st_mode & 0o777)
        _place(tmp, out, overwrite)
        placed = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not placed:
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:
                    break


def normalize_permissions(folder, dir_mode: int | None = None, since: float | None = None) -> None:
    """Give the folders and files under ``folder`` (itself included) the permissions ``mkdir`` / ``open`` give under
    the umask (``dir_mode``, default ``0o777 & ~umask``; files without the execute bits): safetensors writes its
    files 0600 and ``mkdtemp`` makes 0700 folders, but a saved model should be readable by whoever may read its
    folder. With ``since`` (a time stamp), only the files modified at or after it change and folders keep theirs
    (the folder is not all ours)."""
    if dir_mode is None:
        mask = os.umask(0)
        os.umask(mask)
        dir_mode = 0o777 & ~mask
    file_mode = dir_mode & 0o666
    root = Path(folder)
    for path in [root, *root.rglob("*")]:
        try:
            if path.is_symlink() or (since is not None and (path.is_dir() or path.stat().st_mtime < since)):
                continue
            os.chmod(path, dir_mode if path.is_dir() else file_mode)
        except OSError:  # not ours to change: leave it
            continue


def _place(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"{out}: exists and is not a directory")
    if out.is_dir():
        if not any(out.iterdir()):
            out.rmdir()
        elif not overwrite:
            raise FileExistsError(f"{out}: exists and is not empty")
        else:
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
            return
    os.replace(tmp, out)


def assemble_deem(
    llm_path,
    sd_path,
    clip_path,
    output_dir=None,
    *,
    image_size: int = 256,
    num_image_tokens: int = 77,
    image_embed_dim: int = 1024,
    decoder_image_size: int | None = None,
    config_overrides: dict | None = None,
    dtype=torch.float32,
    seed: int | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
):
    """Build a fresh DEEM (stage-1 ready) from a LLaMA/Vicuna dir, an SD-2.1 diffusers dir and an open_clip
    ConvNeXt file.

    Args:
        llm_path: HF LLaMA directory (config.json, weights, tokenizer). Its vocab V0 becomes ``original_vocab_size``;
            the six DEEM tokens get ids V0..V0+5.
        sd_path: diffusers Stable Diffusion directory (unet/, vae/, scheduler/, text_encoder/ + tokenizer/).
        clip_path: open_clip checkpoint file (.bin / .pt / .safetensors); ``visual.trunk.*`` is used.
        output_dir: if given, ``save_pretrained`` of the model and the processor there (written to a temporary
            folder beside it and renamed only when everything succeeded).
        image_size: encoder resolution (256 in stage 1); sets the cross-attention / side-network map sides.
        num_image_tokens: LLM tokens per image (encoder perceiver queries).
        image_embed_dim: width of the encoder adapters' output (a multiple of 16).
        decoder_image_size: diffusion view resolution; default the UNet sample_size times the VAE factor (512).
        config_overrides: extra ``DeemConfig`` kwargs; dict values are merged into the sub-configs
            (e.g. ``{"perceiver_config": {"hidden_size": 512}}``).
        dtype: parameter dtype of the returned model (the VAE stays float32).
        seed: seed for the random init of the new modules (``None``: the global RNG).
        overwrite: replace an existing, non-empty ``output_dir`` (never one that holds an input).
        allow_nonfinite: load component weights that hold NaN / inf (refused by default).

    Returns:
        ``(model, processor)``: a [`DeemForInterleavedGeneration`] in eval mode with the stage-1 trainable set and
        its [`DeemProcessor`].

    Raises:
        AssemblyError (a ValueError): a component that is missing, unreadable, unsafe to unpickle, or does not fit
        (message names the file and the keys). ValueError: a size out of range. FileExistsError: ``output_dir``
        exists and is not empty (without ``overwrite``) or is a file.
    """
    model, processor, _ = _assemble_to(
        llm_path,
        sd_path,
        clip_path,
        output_dir,
        overwrite=overwrite,
        image_size=image_size,
        num_image_tokens=num_image_tokens,
        image_embed_dim=image_embed_dim,
        decoder_image_size=decoder_image_size,
        config_overrides=config_overrides,
        dtype=dtype,
        seed=seed,
        allow_nonfinite=allow_nonfinite,
    )
    return model, processor


def _assemble_to(llm_path, sd_path, clip_path, output_dir, overwrite=False, **kwargs):
    if output_dir is not None:
        check_output_dir(output_dir, overwrite, inputs=(llm_path, sd_path, clip_path))
    model, processor, report = _assemble(llm_path, sd_path, clip_path, **kwargs)
    if output_dir is not None:
        with staged_output_dir(output_dir, overwrite) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
    return model, processor, report


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------


def run(args) -> None:
    """``deem assemble`` with parsed arguments (see `deem.cli`): checks, assembles, prints what it wrote."""
    out = check_output_dir(args.out, args.overwrite, inputs=(args.llm, args.sd, args.clip))
    _check_input_paths(args.llm, args.sd, args.clip)
    print(f"deem assemble: {args.llm} + {args.sd} + {args.clip} -> {out}", flush=True)
    model, _, report = _assemble_to(
        args.llm,
        args.sd,
        args.clip,
        out,
        overwrite=args.overwrite,
        image_size=args.image_size,
        num_image_tokens=args.num_image_tokens,
        image_embed_dim=args.image_embed_dim,
        decoder_image_size=args.decoder_image_size,
        config_overrides=args.config_overrides,
        dtype=args.dtype,
        seed=args.seed,
        allow_nonfinite=args.allow_nonfinite,
    )
    lines = [f"assembled DEEM -> {out}"]
    for name, info in report["components"].items():
        ignored = f", {len(info['ignored'])} ignored" if info["ignored"] else ""
        lines.append(f"  {name}: {info['loaded']} tensors from {info['source']}{ignored}")
    lines.append(f"  null condition: {report['null_condition']}; tied embeddings: {report['tied_embeddings']}")
    lines.append(
        f"  vocab {model.config.original_vocab_size} + 6 new tokens; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters"
    )
    print("\n".join(lines))


def main(argv=None):
    """``main(list)`` parses and assembles, raising on bad input (``UsageError``, `AssemblyError`, ...); ``main()``
    (``python -m deem.conversion.assemble``) is the command line (one-line errors, exit status)."""
    from deem import cli

    if argv is None:
        return cli.main(["assemble", *sys.argv[1:]])
    return run(cli.parse_command("assemble", argv))


if __name__ == "__main__":
    sys.exit(main())
