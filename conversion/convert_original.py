"""Convert an original DEEM / MM-Interleaved (``uni_interleaved``) checkpoint into a ``save_pretrained`` directory.

    deem convert --checkpoint pytorch_model.bin --config pretrain.yaml \
        --llm assets/lmsys/vicuna-7b-v1.5 --sd assets/stabilityai/stable-diffusion-2-1-base \
        --out deem-7b [--image-size 256] [--verify FIXTURE_DIR]

The checkpoint is read with ``torch.load(weights_only=True)`` (``.bin``/``.pt``) or safetensors; the ``model:``
section of the original YAML gives the architecture, the LLaMA directory its ``config.json`` (and tokenizer), the
SD directory its unet / vae / scheduler configs, and the ConvNeXt sizes are read from the checkpoint's own keys.

The encoder resolution is not part of the original's model config: it is the ``resolution`` of the YAML's data
transforms (``transform: {aug_type: dual_numpy, resolution: 256, resolution2: 512}``), read from there; a YAML
without one needs ``--image-size`` (nothing is guessed), and a size that contradicts the YAML (its transforms or the
``spatial_shapes`` of its model section) is refused.

Everything that can be checked without the weights (``--out``, the files, the YAML, the image size) is checked
before the checkpoint is read; weights with NaN / inf are refused (``--allow-nonfinite`` accepts them). Nothing is
written to ``--out`` unless the whole conversion (and ``--verify``) succeeds: the model is saved into a new folder
beside it, which is renamed to ``--out`` at the end (and removed on any error).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers.utils import logging

from .assemble import check_output_dir, infer_convnext_layout, staged_output_dir
from .original import (
    ConversionError,
    check_llama_config,
    check_model_section,
    config_from_original,
    convert_state_dict,
    encoder_spatial_shapes,
    nonfinite_keys,
)

logger = logging.get_logger(__name__)

SNIFFER = "visual_tokenizer.sniffer.vision_model."
SD_CONFIGS = (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json"))
VERIFY_FILES = ("inputs.safetensors", "intermediates.safetensors")
# keys of an original model section; a YAML without `model:` must look like one
_MODEL_KEYS = {
    "llm_model_path",
    "num_img_token",
    "image_embed_dim",
    "cross_attention_frequency",
    "spatial_shapes",
    "visual_tokenizer_config",
    "image_decoder_config",
}


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` / ``.bin`` / ``.pt`` file (or a sharded directory), refusing pickled code."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise ConversionError(f"{path}: no .safetensors or .bin files")
        state = {}
        for f in files:
            part = load_checkpoint(f)
            doubled = sorted(set(part) & set(state))
            if doubled:
                raise ConversionError(f"{f}: key(s) already in another shard: {', '.join(doubled[:10])}")
            state.update(part)
        return state
    if not path.is_file():
        raise ConversionError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as err:  # safetensors raises its own error types for truncated / corrupt headers
            raise ConversionError(f"{path}: not a readable safetensors file ({err})") from err
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            text = str(err)
            if "weights_only" in text or "Unsupported global" in text:
                raise ConversionError(
                    f"{path}: refused: the pickle needs arbitrary code to load (weights_only=True); only plain "
                    "tensors are accepted"
                ) from err
            raise ConversionError(
                f"{path}: cannot read the checkpoint ({text.splitlines()[0] if text else type(err).__name__})"
            ) from err
        for key in ("module", "model", "state_dict"):  # DeepSpeed / trainer wrappers
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConversionError(f"{path}: expected a flat dict of name -> tensor, got {type(state).__name__}")
    if not state:
        raise ConversionError(f"{path}: holds no tensors")
    return state


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: missing ({what})")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: expected a JSON object ({what}), got a JSON {type(value).__name__}")
    return value


def read_llama_config(llm_dir) -> dict:
    """The LLaMA ``config.json`` (``llm_dir`` is its directory or the file itself), checked."""
    llm_dir = Path(llm_dir)
    path = llm_dir / "config.json" if llm_dir.is_dir() else llm_dir
    if not llm_dir.exists():
        raise ConversionError(f"{llm_dir}: no such LLaMA directory (--llm)")
    config = _read_json(path, "LLaMA config")
    check_llama_config(config, str(path))
    return config


def read_sd_configs(sd_dir) -> tuple[dict, dict, dict]:
    """(unet, vae, scheduler) config dicts of a diffusers Stable Diffusion directory."""
    sd_dir = Path(sd_dir)
    if not sd_dir.is_dir():
        raise ConversionError(f"{sd_dir}: not a directory (the Stable Diffusion folder, --sd)")
    configs = [_read_json(sd_dir / sub / name, f"SD {sub} config") for sub, name in SD_CONFIGS]
    unet = configs[0]
    missing = [k for k in ("block_out_channels", "down_block_types", "cross_attention_dim") if k not in unet]
    if missing:
        raise ConversionError(f"{sd_dir / 'unet' / 'config.json'}: not a UNet2DConditionModel config (no {missing})")
    return tuple(configs)


def check_verify_dir(verify_dir) -> Path:
    verify_dir = Path(verify_dir)
    if not verify_dir.is_dir():
        raise ConversionError(f"{verify_dir}: not a directory (the --verify fixture)")
    missing = [name for name in VERIFY_FILES if not (verify_dir / name).is_file()]
    if missing:
        raise ConversionError(f"{verify_dir}: the --verify fixture lacks {', '.join(missing)}")
    return verify_dir


# ------------------------------------------------------------------------------------------------ the YAML


def read_original_yaml(path) -> dict:
    """The original YAML as a mapping (``ConversionError`` if missing, unreadable, not YAML or not a mapping)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such YAML file (--config)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConversionError(f"{path}: not valid YAML ({getattr(err, 'problem', None) or err}{where})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: cannot read the YAML ({err})") from err
    if not isinstance(doc, dict):
        raise ConversionError(f"{path}: expected a YAML mapping with a `model:` section, got {type(doc).__name__}")
    return doc


def model_section(doc: dict, source="the YAML") -> dict:
    """The ``model:`` section of an original YAML (or the whole document when it is only that section)."""
    if "model" in doc:
        section = doc["model"]
        if not isinstance(section, dict):
            raise ConversionError(f"{source}: `model:` must be a mapping, got {type(section).__name__} {section!r:.60}")
    else:
        if not _MODEL_KEYS & set(doc):
            raise ConversionError(
                f"{source}: no `model:` section (and the top level has none of its keys, e.g. num_img_token, "
                "visual_tokenizer_config)"
            )
        section = doc
    check_model_section(section, f"{source}: model")
    return section


def yaml_image_sizes(doc) -> list[tuple[str, int]]:
    """Every encoder resolution the YAML's data transforms name: ``(where, resolution)`` for each
    ``transform: {..., resolution: N}`` (``resolution2`` is the diffusion view and is not the encoder's)."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{where}.{key}" if where else str(key)
                if key == "transform" and isinstance(value, dict) and "resolution" in value:
                    size = value["resolution"]
                    if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
                        raise ConversionError(f"{here}.resolution must be a positive integer, got {size!r}")
                    found.append((f"{here}.resolution", size))
                else:
                    walk(value, here)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(doc, "")
    return found


def resolve_image_size(flag: int | None, found: list[tuple[str, int]], model_config: dict, source="the YAML") -> int:
    """The encoder resolution: the YAML's (``found``), or ``flag`` when the YAML names none; refuses a flag that
    contradicts the YAML, a YAML that names several, none at all, and a size whose feature maps are not the
    model section's ``spatial_shapes``."""
    from deem.cli import UsageError

    sizes = sorted({size for _, size in found})
    listing = ", ".join(f"{where} = {size}" for where, size in found[:4]) + (" ..." if len(found) > 4 else "")
    shapes = encoder_spatial_shapes(model_config)
    hint = shapes[0] * 8 if shapes else None
    if flag is not None:
        if sizes and flag not in sizes:
            raise UsageError(f"--image-size {flag} contradicts {source} ({listing}); leave --image-size out")
        size, origin = flag, "--image-size"
    elif len(sizes) == 1:
        size, origin = sizes[0], f"{source} ({found[0][0]})"
    elif sizes:
        raise UsageError(f"{source} names several encoder resolutions ({listing}); pass --image-size")
    else:
        raise UsageError(
            f"{source} names no encoder resolution (no data `transform: {{resolution: N}}`) and --image-size is not "
            f"given: pass it (256 for stage-1 checkpoints, 448 for stages 2-3"
            + (f"; the model section's spatial_shapes {shapes} are the maps of {hint} px" if hint else "")
            + ")"
        )
    expected = [size // 8, size // 16, size // 32]
    if len(shapes) == 3 and shapes != expected:
        # valid in the original (stage-1 weights read 448-px images; the offsets keep the configured scale), so a
        # warning, not an error
        logger.warning(
            f"image size {size} (from {origin}) gives encoder maps {expected}, the model section's spatial_shapes are "
            f"{shapes}" + (f" (those of {hint} px)" if hint and hint >= 32 else "") + ": the cross-attention keeps "
            "the configured shapes for its sampling offsets, as the original does"
        )
    return size


# -------------------------------------------------------------------------------------------------- conversion


def _check_finite(state, source, allow_nonfinite: bool) -> None:
    bad = nonfinite_keys(state)
    if not bad:
        return
    listing = ", ".join(bad[:10]) + (f", ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
    if not allow_nonfinite:
        raise ConversionError(
            f"{source}: {len(bad)} tensor(s) hold NaN or inf: {listing} (a diverged or corrupt checkpoint; "
            "--allow-nonfinite / allow_nonfinite=True converts it anyway)"
        )
    logger.warning(f"{source}: {len(bad)} tensor(s) hold NaN or inf: {listing}")


def _convert(
    checkpoint,
    model_config: dict,
    llm_dir,
    sd_dir=None,
    out_dir=None,
    image_size: int | None = None,
    verify_dir=None,
    dtype=torch.float32,
    allow_nonfinite: bool = False,
):
    from deem import DeemForInterleavedGeneration

    # ---- everything that can be checked without the weights
    check_model_section(model_config)
    if not (isinstance(image_size, int) and not isinstance(image_size, bool) and image_size >= 32):
        raise ConversionError(
            "image_size (the encoder resolution, at least 32 px: 256 for stage-1 checkpoints, 448 for "
            f"stages 2-3) is required, got {image_size!r}"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConversionError(f"dtype must be a floating torch dtype, got {dtype!r}")
    if out_dir is not None:
        check_output_dir(
            out_dir, inputs=[p for p in (checkpoint, llm_dir, sd_dir, verify_dir) if p is not None], overwrite_hint=None
        )
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise ConversionError(f"{checkpoint}: no such checkpoint file or directory")
    llm_dir = Path(llm_dir)
    llama = read_llama_config(llm_dir)
    sd_configs = read_sd_configs(sd_dir) if sd_dir is not None else None
    if verify_dir is not None:
        verify_dir = check_verify_dir(verify_dir)

    # ---- the weights
    state = load_checkpoint(checkpoint)
    _check_finite(state, checkpoint, allow_nonfinite)
    unet = vae = scheduler = None
    has_sd = any(k.startswith("visual_tokenizer.encoder.unet.") for k in state)
    if has_sd:
        if sd_configs is None:
            raise ConversionError(
                f"{checkpoint}: the checkpoint holds diffusion weights; pass the SD directory (--sd) for their configs"
            )
        unet, vae, scheduler = sd_configs
    elif sd_configs is not None:
        logger.warning(f"{checkpoint} holds no diffusion weights (a stage-3 checkpoint?): --sd {sd_dir} is not used")
    trunk_shapes = {k[len(SNIFFER) :]: tuple(v.shape) for k, v in state.items() if k.startswith(SNIFFER)}
    try:
        convnext = infer_convnext_layout(trunk_shapes, source=str(checkpoint))
    except ValueError as err:
        raise ConversionError(str(err)) from err
    config = config_from_original(
        model_config, llama, convnext=convnext, unet=unet, vae=vae, scheduler=scheduler, image_size=image_size
    )
    with torch.device("meta"):
        skeleton = DeemForInterleavedGeneration(config)
    converted = convert_state_dict(state, expected=skeleton.state_dict())
    del skeleton
    model = DeemForInterleavedGeneration(config)
    model.load_state_dict(converted, strict=True)
    model = model.to(dtype).eval()
    report = None
    if verify_dir is not None:
        report = verify(model, verify_dir)
        logger.info(f"verified against {verify_dir}: {report}")
    if out_dir is not None:
        _save_atomically(model, out_dir, llm_dir if llm_dir.is_dir() else None, config)
    return model, report


def convert(
    checkpoint,
    model_config: dict,
    llm_dir,
    sd_dir=None,
    out_dir=None,
    image_size: int | None = None,
    verify_dir=None,
    dtype=torch.float32,
    allow_nonfinite: bool = False,
):
    """Convert; returns the model (and writes ``out_dir`` when given, atomically). See the module docstring.

    ``image_size`` (the encoder resolution) is required: the original's model config does not say it
    (`yaml_image_sizes` reads it from the original YAML's data transforms). ``out_dir`` must be new or empty; it is
    checked, with the files and configs, before the checkpoint is read. Raises ``ConversionError``."""
    model, _ = _convert(
        checkpoint, model_config, llm_dir, sd_dir, out_dir, image_size, verify_dir, dtype, allow_nonfinite
    )
    return model


SCALE_ULPS = 16


def parity_close(
    ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5, ulps: int = SCALE_ULPS
) -> tuple[bool, float]:
    """Float32 parity: every element within ``atol + rtol·|ref|`` or within ``ulps`` float32 ulps of the tensor's
    scale (``ulps·eps·max|ref|``). The second bound covers small elements computed from large ones (LLM residual
    streams reach |x| ≈ 20, so different BLAS kernels leave ~1e-5 on elements of size 0.01). Returns (ok, max abs
    deviation)."""
    if ours.shape != ref.shape:
        return False, float("inf")
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    dev = (ours - ref).abs()
    scale = ulps * torch.finfo(torch.float32).eps * float(ref.abs().max()) if ref.numel() else 0.0
    ok = bool(((dev <= atol + rtol * ref.abs()) | (dev <= scale)).all()) and not bool(
        torch.isnan(ours).any() ^ torch.isnan(ref).any()
    )
    return ok, float(dev.max()) if dev.numel() else 0.0


def verify(model, fixture_dir, atol: float = 1e-5, rtol: float = 1e-5) -> dict[str, float]:
    """Run ``model`` on a recorded batch (``inputs.safetensors``) and compare with the recorded outputs
    (``intermediates.safetensors``: hidden states, logit slices, log-sum-exp, arg-max). Returns the max abs
    deviation per tensor; raises ``ConversionError`` on the first tensor outside the tolerance."""
    from safetensors.torch import load_file

    fixture_dir = check_verify_dir(fixture_dir)
    try:
        inp = load_file(fixture_dir / "inputs.safetensors")
        ref = load_file(fixture_dir / "intermediates.safetensors")
    except Exception as err:
        raise ConversionError(f"{fixture_dir}: not a readable --verify fixture ({err})") from err
    needed = {"text_ids", "attention_mask", "image_tensors"} - set(inp)
    needed |= {"text_decoder.logits_sel_cols", "text_decoder.logits_sel", "text_decoder.logits_logsumexp"} - set(ref)
    needed |= {"text_decoder.logits_argmax"} - set(ref)
    if needed:
        raise ConversionError(f"{fixture_dir}: the --verify fixture lacks {sorted(needed)}")
    try:
        with torch.no_grad():
            out = model(
                input_ids=inp["text_ids"],
                attention_mask=inp["attention_mask"],
                pixel_values=inp["image_tensors"].to(model.dtype),
                image_masks=inp.get("image_tensors_mask"),
                num_images=inp.get("num_image_per_seq"),
                output_hidden_states=True,
                return_loss=False,
            )
    except (RuntimeError, ValueError, IndexError) as err:
        raise ConversionError(
            f"verification failed: the model cannot run the recorded batch of {fixture_dir} ({err})"
        ) from err
    pairs = {
        f"hidden_states.{i}": (h, ref[f"mm_decoder.hidden_states.{i}"])
        for i, h in enumerate(out.hidden_states)
        if f"mm_decoder.hidden_states.{i}" in ref
    }
    cols = ref["text_decoder.logits_sel_cols"]
    pairs["logits_sel"] = (out.logits[..., cols], ref["text_decoder.logits_sel"])
    pairs["logsumexp"] = (out.logits.logsumexp(-1), ref["text_decoder.logits_logsumexp"])
    report = {}
    for name, (ours, theirs) in pairs.items():
        ok, dev = parity_close(ours, theirs, atol=atol, rtol=rtol)
        report[name] = dev
        if not ok:
            raise ConversionError(f"verification failed: {name} deviates by {dev:.3g} from {fixture_dir}")
    if not torch.equal(out.logits.argmax(-1), ref["text_decoder.logits_argmax"]):
        raise ConversionError(f"verification failed: arg-max of the logits differs from {fixture_dir}")
    return report


def _save_atomically(model, out_dir, llm_dir, config):
    with staged_output_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if llm_dir is not None and any(llm_dir.glob("tokenizer*")):
            from transformers import AutoTokenizer

            from deem import DeemImageProcessor, DeemProcessor, prepare_tokenizer

            try:
                tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(llm_dir))
            except Exception as err:
                raise ConversionError(f"{llm_dir}: cannot load the LLaMA tokenizer ({err})") from err
            decoder = config.diffusion_config.image_size if config.diffusion_config is not None else 512
            DeemProcessor(
                DeemImageProcessor(size=config.vision_config.image_size, decoder_size=decoder),
                tokenizer,
                num_image_tokens=config.num_image_tokens,
            ).save_pretrained(tmp)
        else:
            logger.warning(f"no LLaMA tokenizer files next to the --llm config: {out_dir} gets no processor")


# ------------------------------------------------------------------------------------------------ command line


def run(args) -> None:
    """``deem convert`` with parsed arguments (see `deem.cli`): checks, converts, prints what it wrote."""
    inputs = [p for p in (args.checkpoint, args.llm, args.sd, args.verify) if p is not None]
    out = check_output_dir(args.out, inputs=inputs, overwrite_hint=None)
    if not Path(args.checkpoint).exists():
        raise ConversionError(f"{args.checkpoint}: no such checkpoint file or directory (--checkpoint)")
    doc = read_original_yaml(args.config)
    section = model_section(doc, args.config)
    image_size = resolve_image_size(args.image_size, yaml_image_sizes(doc), section, args.config)
    read_llama_config(args.llm)
    if args.sd is not None:
        read_sd_configs(args.sd)
    if args.verify is not None:
        check_verify_dir(args.verify)
    print(f"deem convert: {args.checkpoint} at {image_size} px -> {out}", flush=True)
    _, report = _convert(
        args.checkpoint,
        section,
        args.llm,
        args.sd,
        out,
        image_size,
        args.verify,
        allow_nonfinite=args.allow_nonfinite,
    )
    if report is not None:
        print(
            f"verified against {args.verify}: max abs deviation {max(report.values()):.3g} over {len(report)} tensors"
        )
    print(f"deem convert: wrote {out}")


def main(argv=None):
    """``main(list)`` parses and converts, raising on bad input (``UsageError``, ``ConversionError``, ...);
    ``main()`` (``python -m deem.conversion.convert_original``) is the command line (one-line errors, exit status)."""
    from deem import cli

    if argv is None:
        return cli.main(["convert", *sys.argv[1:]])
    return run(cli.parse_command("convert", argv))


if __name__ == "__main__":
    sys.exit(main())
