"""Bad input to every command line and tool: refused before any work with one clear line, nothing left behind.

Each case builds its inputs under the test's own folder, then runs ``deem ...`` in-process (``deem.cli.main``, the
entry point of the ``deem`` script) or calls a Python tool (``convert``, ``assemble_deem``, the hub helpers). A CLI
case must exit with the expected status (2: bad / missing / contradictory arguments, 1: a failure) and print exactly
one line on stderr, ``deem <command>: error: <message>``, matching the case's pattern; a Python case must raise the
expected type with a one-line message matching it. Afterwards the case's folder and the shared input folders must
hold exactly what they held before the call: no output folder, no temporary folder, no changed input.
"""

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from deem.cli import main

# ------------------------------------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def original(parity_a_dir, tmp_path_factory):
    """Fixture A as a user has it: a safetensors checkpoint, the YAML's model section, a LLaMA dir, an SD dir."""
    from conftest import write_original_configs

    root = tmp_path_factory.mktemp("original")
    shutil.copy(parity_a_dir / "original_state_dict.safetensors", root / "model.safetensors")
    configs = write_original_configs(parity_a_dir, root)
    return SimpleNamespace(root=root, configs=configs)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """Tiny LLaMA / SD-2.1 / open_clip components in their real on-disk formats (as tests/test_assemble.py)."""
    from test_assemble import write_clip, write_llama, write_sd

    root = tmp_path_factory.mktemp("components")
    write_llama(root / "vicuna")
    write_sd(root / "sd21")
    write_clip(root / "open_clip_pytorch_model.bin")
    return root


def _convert_argv(ctx, **changes):
    o = ctx.original.root
    args = {
        "checkpoint": o / "model.safetensors",
        "config": o / "pretrain.yaml",
        "llm": o / "llm",
        "sd": o / "sd",
        "out": ctx.tmp / "out",
        "image_size": 64,
    }
    args.update(changes)
    argv = ["convert"]
    for key, value in args.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def _assemble_argv(ctx, **changes):
    c = ctx.components
    args = {
        "llm": c / "vicuna",
        "sd": c / "sd21",
        "clip": c / "open_clip_pytorch_model.bin",
        "out": ctx.tmp / "out",
        "image_size": 64,
        "num_image_tokens": 4,
        "image_embed_dim": 32,
    }
    flags = [f"--{k.replace('_', '-')}" for k, v in changes.items() if v is True]
    args.update({k: v for k, v in changes.items() if v is not True})
    argv = ["assemble", *flags]
    for key, value in args.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def _model_yaml(ctx, name="pretrain.yaml", model=None, **top):
    """The fixture's YAML with ``model`` changes (dict merged into the model section) and extra top-level keys."""
    section = dict(ctx.original.configs["model_config"])
    section.update(model or {})
    doc = {"model": section, **top}
    path = ctx.tmp / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _transform(resolution, resolution2=512):
    return {"aug_type": "dual_numpy", "resolution": resolution, "resolution2": resolution2}


def _text(ctx, name, text):
    path = ctx.tmp / name
    path.write_text(text)
    return path


def _bytes(ctx, name, data):
    path = ctx.tmp / name
    path.write_bytes(data)
    return path


def _train_yaml(ctx, **sections):
    doc = {
        "stage": 1,
        "model": {"config": "tiny"},
        "data": {"sources": {"synthetic": {"type": "synthetic", "num_samples": 4}}},
        "training": {"max_steps": 1, "report_to": "none", "use_cpu": True, "save_strategy": "no"},
    }
    for key, value in sections.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    path = ctx.tmp / "train.yaml"
    path.write_text(yaml.safe_dump(doc))
    return ["train", "--config", str(path), "--output_dir", str(ctx.tmp / "run")]


def _checkpoint_with(ctx, name, change):
    state = load_file(ctx.original.root / "model.safetensors")
    change(state)
    path = ctx.tmp / name
    if name.endswith(".safetensors"):
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def _nan_state(state):
    state["mm_decoder.norm.weight"] = state["mm_decoder.norm.weight"].clone()
    state["mm_decoder.norm.weight"][0] = float("nan")


class _Pickled:
    def __reduce__(self):
        return (print, ("this must never run",))


def _evil_pickle(ctx):
    with open(ctx.tmp / "evil.bin", "wb") as f:
        pickle.dump({"x": _Pickled()}, f)
    return _convert_argv(ctx, checkpoint=ctx.tmp / "evil.bin")


def _copy_dir(src, dest, edit=None):
    shutil.copytree(src, dest)
    if edit is not None:
        edit(dest)
    return dest


def _edit_json(path, change):
    data = json.loads(path.read_text())
    data = change(data)
    path.write_text(json.dumps(data))


def _clip_with(ctx, name, change):
    from test_assemble import write_clip

    path = ctx.tmp / name
    state = write_clip(path)
    key = "visual.trunk.stem.0.weight"
    state[key] = change(state[key].clone())
    torch.save(state, path)
    return _assemble_argv(ctx, clip=path)


def _with_inf(tensor):
    tensor.view(-1)[0] = float("inf")
    return tensor


def _symlinked_out(ctx):
    (ctx.tmp / "elsewhere").mkdir()
    (ctx.tmp / "out").symlink_to(ctx.tmp / "elsewhere")
    return ctx.tmp / "out"


def _fake_model_dir(ctx):
    (ctx.tmp / "model").mkdir()
    (ctx.tmp / "model" / "config.json").write_text("{}")
    return ctx.tmp / "model"


def _tiny_model(ctx):
    from deem import DeemConfig

    return DeemConfig.tiny()


def _hub(name):
    import deem.hub

    return getattr(deem.hub, name)


def _card(ctx, **kw):
    args = dict(model_config=_tiny_model(ctx), repo_id="tester/deem-tiny")
    args.update(kw)
    return lambda: _hub("render_model_card")(**args)


class _FakeModel:
    config = None

    def save_pretrained(self, *a, **k):
        raise AssertionError("push_model must refuse the arguments before saving anything")

    def num_parameters(self):
        return 0


def _push(ctx, **kw):
    args = dict(model=_FakeModel(), processor=None, repo_id="tester/deem-tiny")
    args.update(kw)
    return lambda: _hub("push_model")(**args)


def _api_convert(ctx, **kw):
    from deem.conversion.convert_original import convert

    o = ctx.original.root
    args = dict(
        checkpoint=o / "model.safetensors",
        model_config=dict(ctx.original.configs["model_config"]),
        llm_dir=o / "llm",
        sd_dir=o / "sd",
        out_dir=ctx.tmp / "out",
        image_size=64,
    )
    args.update(kw)
    return lambda: convert(**args)


def _api_assemble(ctx, **kw):
    from deem.conversion.assemble import assemble_deem

    c = ctx.components
    args = dict(
        llm_path=c / "vicuna",
        sd_path=c / "sd21",
        clip_path=c / "open_clip_pytorch_model.bin",
        output_dir=ctx.tmp / "out",
        image_size=64,
        num_image_tokens=4,
        image_embed_dim=32,
    )
    args.update(kw)
    return lambda: assemble_deem(**args)


def _nonempty_out(ctx):
    (ctx.tmp / "out").mkdir()
    (ctx.tmp / "out" / "keep.txt").write_text("the user's file")
    return ctx.tmp / "out"


def _a_file(ctx, name="out"):
    path = ctx.tmp / name
    path.write_text("a file, not a folder")
    return path


# ---------------------------------------------------------------------------------------------------------- cases
# (id, make(ctx) -> argv list (CLI) or a callable (Python), expected exit status or exception type, message pattern)

USAGE, FAIL = 2, 1

CASES = [
    # ---- the top-level command and demo / params
    ("unknown-command", lambda c: ["paint"], USAGE, r"invalid choice: 'paint'"),
    ("unknown-global-option", lambda c: ["--colour"], USAGE, r"unrecognized arguments: --colour"),
    ("demo-steps-zero", lambda c: ["demo", "--steps", "0"], USAGE, r"--steps: expected a positive integer, got '0'"),
    ("demo-steps-not-int", lambda c: ["demo", "--steps", "3.5"], USAGE, r"--steps: expected an integer, got '3.5'"),
    (
        "demo-steps-underscore-digits",
        lambda c: ["demo", "--steps", "1_0"],
        USAGE,
        r"--steps: expected an integer, got '1_0'",
    ),
    ("demo-seed-negative", lambda c: ["demo", "--seed", "-1"], USAGE, r"--seed: expected a seed in \[0, 2\*\*63\)"),
    ("params-unknown-size", lambda c: ["params", "--config", "13b"], USAGE, r"--config: invalid choice: '13b'"),
    ("params-stage-4", lambda c: ["params", "--stage", "4"], USAGE, r"--stage: invalid choice: 4"),
    # ---- convert: arguments
    (
        "convert-missing-arguments",
        lambda c: ["convert", "--checkpoint", "x.bin"],
        USAGE,
        r"required: --config, --llm, --out",
    ),
    (
        "convert-image-size-below-32",
        lambda c: _convert_argv(c, image_size=16),
        USAGE,
        r"--image-size: expected an encoder image side of at least 32 px .*got '16'",
    ),
    (
        "convert-out-twice",
        lambda c: _convert_argv(c) + ["--out", str(c.tmp / "other")],
        USAGE,
        r"--out: given more than once",
    ),
    ("convert-empty-path", lambda c: _convert_argv(c, checkpoint=""), USAGE, r"--checkpoint: expected a path, got an"),
    (
        "convert-abbreviated-option",
        lambda c: _convert_argv(c) + ["--verif", "x"],
        USAGE,
        r"unrecognized arguments: --verif x",
    ),
    (
        "convert-no-resolution-anywhere",
        lambda c: _convert_argv(c, image_size=None),
        USAGE,
        r"names no encoder resolution .*pass it .*spatial_shapes \[8, 4, 2\] are the maps of 64 px",
    ),
    (
        "convert-flag-contradicts-yaml",
        lambda c: _convert_argv(
            c, config=_model_yaml(c, data={"train": {"datasets": [{"transform": _transform(64, 64)}]}}), image_size=128
        ),
        USAGE,
        r"--image-size 128 contradicts .*data\.train\.datasets\[0\]\.transform\.resolution = 64",
    ),
    (
        "convert-yaml-several-resolutions",
        lambda c: _convert_argv(
            c,
            config=_model_yaml(
                c, data={"train": {"transform": _transform(64)}, "val": [{"transform": {"resolution": 128}}]}
            ),
            image_size=None,
        ),
        USAGE,
        r"names several encoder resolutions .*= 64, .*= 128.*pass --image-size",
    ),
    # ---- convert: files and content
    (
        "convert-checkpoint-missing",
        lambda c: _convert_argv(c, checkpoint=c.tmp / "nope.bin"),
        FAIL,
        r"nope\.bin: no such checkpoint file or directory",
    ),
    (
        "convert-yaml-missing",
        lambda c: _convert_argv(c, config=c.tmp / "nope.yaml"),
        FAIL,
        r"nope\.yaml: no such YAML file",
    ),
    (
        "convert-yaml-syntax",
        lambda c: _convert_argv(c, config=_text(c, "bad.yaml", "model: {num_img_token: [8\n")),
        FAIL,
        r"bad\.yaml: not valid YAML .*line \d+",
    ),
    (
        "convert-yaml-top-level-list",
        lambda c: _convert_argv(c, config=_text(c, "list.yaml", "- model\n- data\n")),
        FAIL,
        r"list\.yaml: expected a YAML mapping with a `model:` section, got list",
    ),
    (
        "convert-model-section-not-mapping",
        lambda c: _convert_argv(c, config=_text(c, "m.yaml", "model: uni_interleaved\n")),
        FAIL,
        r"m\.yaml: `model:` must be a mapping, got str 'uni_interleaved'",
    ),
    (
        "convert-yaml-without-model-section",
        lambda c: _convert_argv(c, config=_text(c, "d.yaml", "data: {train: {}}\nseed: 3\n")),
        FAIL,
        r"d\.yaml: no `model:` section",
    ),
    (
        "convert-num-img-token-text",
        lambda c: _convert_argv(c, config=_model_yaml(c, model={"num_img_token": "eight"})),
        FAIL,
        r"model\.num_img_token must be a positive integer, got 'eight'",
    ),
    (
        "convert-spatial-shapes-scalar",
        lambda c: _convert_argv(c, config=_model_yaml(c, model={"spatial_shapes": 8})),
        FAIL,
        r"model\.spatial_shapes must be a list of positive integers, got 8",
    ),
    (
        "convert-decoder-size-not-divisor-of-512",
        lambda c: _convert_argv(
            c,
            config=_model_yaml(
                c,
                model={
                    "image_decoder_config": {
                        **c.original.configs["model_config"]["image_decoder_config"],
                        "image_size": 96,
                    }
                },
            ),
        ),
        FAIL,
        r"image_decoder_config\.image_size must be a divisor of 512 .*got 96",
    ),
    (
        "convert-yaml-resolution-text",
        lambda c: _convert_argv(c, config=_model_yaml(c, transform={"resolution": "64px"}), image_size=None),
        FAIL,
        r"transform\.resolution must be a positive integer, got '64px'",
    ),
    (
        "convert-out-not-empty",
        lambda c: _convert_argv(c, out=_nonempty_out(c)),
        FAIL,
        r"out: exists and is not empty \(choose a new folder\)$",
    ),
    ("convert-out-is-a-file", lambda c: _convert_argv(c, out=_a_file(c)), FAIL, r"out: exists and is not a directory"),
    (
        "convert-out-is-a-symlink",
        lambda c: _convert_argv(c, out=_symlinked_out(c)),
        FAIL,
        r"out: is a symbolic link; give the real folder",
    ),
    (
        "convert-yaml-not-utf8",
        lambda c: _convert_argv(c, config=_bytes(c, "latin.yaml", "model: {name: 'caf\xe9'}\n".encode("latin-1"))),
        FAIL,
        r"latin\.yaml: cannot read the YAML \(.*can't decode byte 0xe9",
    ),
    (
        "convert-integer-weights",
        lambda c: _convert_argv(
            c,
            checkpoint=_checkpoint_with(
                c, "int.safetensors", lambda s: s.update({"mm_decoder.norm.weight": s["mm_decoder.norm.weight"].long()})
            ),
        ),
        FAIL,
        r"1 dtype mismatch\(es\) \(integer vs floating point\): model\.language_model\.norm\.weight: checkpoint "
        r"torch\.int64",
    ),
    (
        "convert-out-under-a-file",
        lambda c: _convert_argv(c, out=_a_file(c, "notes.txt") / "out"),
        FAIL,
        r"out: cannot be created, .*notes\.txt is not a directory",
    ),
    (
        "convert-llm-missing",
        lambda c: _convert_argv(c, llm=c.tmp / "vicuna"),
        FAIL,
        r"vicuna: no such LLaMA directory \(--llm\)",
    ),
    (
        "convert-llm-config-list",
        lambda c: _convert_argv(
            c, llm=_copy_dir(c.original.root / "llm", c.tmp / "llm", lambda d: _text(c, "llm/config.json", "[1, 2]"))
        ),
        FAIL,
        r"config\.json: expected a JSON object \(LLaMA config\), got a JSON list",
    ),
    (
        "convert-llm-config-no-hidden-size",
        lambda c: _convert_argv(
            c,
            llm=_copy_dir(
                c.original.root / "llm",
                c.tmp / "llm",
                lambda d: _edit_json(d / "config.json", lambda j: {k: v for k, v in j.items() if k != "hidden_size"}),
            ),
        ),
        FAIL,
        r"config\.json: missing hidden_size",
    ),
    (
        "convert-llm-not-llama",
        lambda c: _convert_argv(
            c,
            llm=_copy_dir(
                c.original.root / "llm",
                c.tmp / "llm",
                lambda d: _edit_json(d / "config.json", lambda j: {**j, "model_type": "gpt2"}),
            ),
        ),
        FAIL,
        r"DEEM's language model is a LLaMA; this config has model_type 'gpt2'",
    ),
    (
        "convert-sd-folder-incomplete",
        lambda c: _convert_argv(
            c, sd=_copy_dir(c.original.root / "sd", c.tmp / "sd", lambda d: (d / "vae" / "config.json").unlink())
        ),
        FAIL,
        r"sd/vae/config\.json: missing \(SD vae config\)",
    ),
    (
        "convert-diffusion-weights-without-sd",
        lambda c: _convert_argv(c, sd=None),
        FAIL,
        r"holds diffusion weights; pass the SD directory \(--sd\)",
    ),
    (
        "convert-verify-fixture-incomplete",
        lambda c: _convert_argv(c, verify=_copy_dir(c.original.root / "llm", c.tmp / "fixture")),
        FAIL,
        r"fixture: the --verify fixture lacks inputs\.safetensors, intermediates\.safetensors",
    ),
    (
        "convert-nan-weights",
        lambda c: _convert_argv(c, checkpoint=_checkpoint_with(c, "nan.safetensors", _nan_state)),
        FAIL,
        r"nan\.safetensors: 1 tensor\(s\) hold NaN or inf: mm_decoder\.norm\.weight .*--allow-nonfinite",
    ),
    (
        "convert-truncated-safetensors",
        lambda c: _convert_argv(
            c, checkpoint=_bytes(c, "cut.safetensors", (c.original.root / "model.safetensors").read_bytes()[:5000])
        ),
        FAIL,
        r"cut\.safetensors: not a readable safetensors file",
    ),
    ("convert-code-pickle", _evil_pickle, FAIL, r"evil\.bin: refused: the pickle needs arbitrary code"),
    (
        "convert-empty-checkpoint",
        lambda c: _convert_argv(c, checkpoint=_checkpoint_with(c, "empty.bin", lambda s: s.clear())),
        FAIL,
        r"empty\.bin: holds no tensors",
    ),
    (
        "convert-checkpoint-folder-without-weights",
        lambda c: _convert_argv(c, checkpoint=_copy_dir(c.original.root / "llm", c.tmp / "shards")),
        FAIL,
        r"shards: no \.safetensors or \.bin files",
    ),
    (
        "convert-api-no-image-size",
        lambda c: _api_convert(c, image_size=None),
        "ConversionError",
        r"image_size \(the encoder resolution.*\) is required, got None",
    ),
    (
        "convert-api-model-config-not-dict",
        lambda c: _api_convert(c, model_config=["num_img_token", 8]),
        "ConversionError",
        r"model must be a mapping, got list",
    ),
    # ---- assemble: arguments
    ("assemble-missing-clip", lambda c: _assemble_argv(c, clip=None), USAGE, r"required: --clip"),
    (
        "assemble-image-size-zero",
        lambda c: _assemble_argv(c, image_size=0),
        USAGE,
        r"--image-size: expected an encoder image side of at least 32 px .*got '0'",
    ),
    (
        "assemble-embed-dim-not-16x",
        lambda c: _assemble_argv(c, image_embed_dim=20),
        USAGE,
        r"--image-embed-dim: expected a positive multiple of 16",
    ),
    (
        "assemble-negative-image-tokens",
        lambda c: _assemble_argv(c, num_image_tokens=-4),
        USAGE,
        r"--num-image-tokens: expected a positive integer, got '-4'",
    ),
    (
        "assemble-overrides-bad-json",
        lambda c: _assemble_argv(c, config_overrides="{perceiver_config: 1"),
        USAGE,
        r"--config-overrides: the value is not valid JSON",
    ),
    (
        "assemble-overrides-json-list",
        lambda c: _assemble_argv(c, config_overrides="[1, 2]"),
        USAGE,
        r"--config-overrides: expected a JSON object, got a JSON list",
    ),
    (
        "assemble-overrides-missing-file",
        lambda c: _assemble_argv(c, config_overrides=c.tmp / "overrides.json"),
        USAGE,
        r"--config-overrides: expected a JSON object or a JSON file, got .*overrides\.json' \(no such file\)",
    ),
    ("assemble-dtype-float64", lambda c: _assemble_argv(c, dtype="float64"), USAGE, r"--dtype: invalid choice"),
    # ---- assemble: files and content
    (
        "assemble-llm-not-a-folder",
        lambda c: _assemble_argv(c, llm=c.tmp / "vicuna"),
        FAIL,
        r"vicuna: not a directory \(LLaMA directory\)",
    ),
    (
        "assemble-clip-missing",
        lambda c: _assemble_argv(c, clip=c.tmp / "clip.bin"),
        FAIL,
        r"clip\.bin: not a file \(open_clip checkpoint\)",
    ),
    (
        "assemble-out-not-empty",
        lambda c: _assemble_argv(c, out=_nonempty_out(c)),
        FAIL,
        r"out: exists and is not empty \(choose a new folder, or pass --overwrite",
    ),
    (
        "assemble-overwrite-an-input",
        lambda c: _assemble_argv(c, out=c.components, overwrite=True),
        FAIL,
        r"the output folder would replace the input .*vicuna; choose another folder",
    ),
    (
        "assemble-overrides-unknown-field",
        lambda c: _assemble_argv(c, config_overrides=json.dumps({"perciever_config": {"hidden_size": 32}})),
        FAIL,
        r"config_overrides: unknown DeemConfig field\(s\) \['perciever_config'\]",
    ),
    (
        "assemble-overrides-unknown-nested-field",
        lambda c: _assemble_argv(c, config_overrides=json.dumps({"vision_config": {"imagesize": 64}})),
        FAIL,
        r"unknown DeemConfig field\(s\) \['vision_config\.imagesize'\]",
    ),
    (
        "assemble-llm-config-list",
        lambda c: _assemble_argv(
            c, llm=_copy_dir(c.components / "vicuna", c.tmp / "vicuna", lambda d: (d / "config.json").write_text("[]"))
        ),
        FAIL,
        r"vicuna/config\.json: expected a JSON object \(LLM config\), got a JSON list",
    ),
    (
        "assemble-unet-config-without-sample-size",
        lambda c: _assemble_argv(
            c,
            sd=_copy_dir(
                c.components / "sd21",
                c.tmp / "sd21",
                lambda d: _edit_json(
                    d / "unet" / "config.json", lambda j: {k: v for k, v in j.items() if k != "sample_size"}
                ),
            ),
        ),
        FAIL,
        r"unet/config\.json: not a usable UNet config: no sample_size",
    ),
    (
        "assemble-decoder-size-not-latent-multiple",
        lambda c: _assemble_argv(c, decoder_image_size=72),
        FAIL,
        r"decoder_image_size 72 is not a multiple of 16 \(the VAE factor 8 times the 1 UNet downsamplings",
    ),
    (
        "assemble-clip-with-inf",
        lambda c: _clip_with(c, "clip_nan.bin", _with_inf),
        FAIL,
        r"clip_nan\.bin: visual\.trunk\.stem\.0\.weight holds NaN or inf",
    ),
    (
        "assemble-clip-integer-weights",
        lambda c: _clip_with(c, "clip_int.bin", lambda t: t.round().to(torch.int64)),
        FAIL,
        r"clip_int\.bin: visual\.trunk\.stem\.0\.weight holds torch\.int64 values where the open_clip ConvNeXt",
    ),
    (
        "assemble-image-size-huge",
        lambda c: _assemble_argv(c, image_size=2**20),
        USAGE,
        r"--image-size: expected at most 4096, got '1048576'",
    ),
    (
        "assemble-clip-unsupported-format",
        lambda c: _assemble_argv(c, clip=_text(c, "clip.txt", "weights")),
        FAIL,
        r"clip\.txt: unsupported open_clip checkpoint format '\.txt'",
    ),
    (
        "assemble-api-seed-negative",
        lambda c: _api_assemble(c, seed=-3),
        ValueError,
        r"seed must be an integer in \[0, 2\*\*63\) or None, got -3",
    ),
    (
        "assemble-api-out-is-a-file",
        lambda c: _api_assemble(c, output_dir=_a_file(c), overwrite=True),
        FileExistsError,
        r"out: exists and is not a directory",
    ),
    # ---- train: arguments
    ("train-missing-config", lambda c: ["train", "--stage", "1"], USAGE, r"required: --config"),
    ("train-stage-5", lambda c: ["train", "--config", "tiny", "--stage", "5"], USAGE, r"--stage: invalid choice: 5"),
    (
        "train-set-without-equals",
        lambda c: ["train", "--config", "tiny", "--set", "training.max_steps"],
        USAGE,
        r"--set: expected KEY=VALUE",
    ),
    (
        "train-set-empty-key-part",
        lambda c: ["train", "--config", "tiny", "--set", "training..max_steps=3"],
        USAGE,
        r"--set: expected a dotted KEY of names .*got 'training\.\.max_steps'",
    ),
    (
        "train-no-stage",
        lambda c: ["train", "--config", "tiny", "--output_dir", str(c.tmp / "run")],
        USAGE,
        r"give --stage \(the config tiny names none\)",
    ),
    (
        "train-stage-contradicts-config",
        lambda c: ["train", "--config", "stage1_7b", "--stage", "2", "--dry_run"],
        USAGE,
        r"--stage 2 contradicts stage: 1 in stage1_7b",
    ),
    (
        "train-set-twice",
        lambda c: _train_yaml(c) + ["--set", "training.max_steps=1", "--set", "training.max_steps=2"],
        USAGE,
        r"--set training\.max_steps given more than once",
    ),
    (
        "train-set-into-a-value",
        lambda c: _train_yaml(c) + ["--set", "model.config.size=1"],
        USAGE,
        r"--set model\.config\.size: model\.config is a str, not a section",
    ),
    (
        "train-set-bad-yaml-value",
        lambda c: _train_yaml(c) + ["--set", "training.max_steps=[1"],
        USAGE,
        r"--set training\.max_steps: the value '\[1' is not valid YAML",
    ),
    # ---- train: files and content
    (
        "train-config-missing",
        lambda c: ["train", "--config", str(c.tmp / "nope.yaml"), "--stage", "1"],
        FAIL,
        r"--config .*nope\.yaml: no such file, nor a shipped config "
        r"\(stage1_7b, stage2_7b, stage3_7b, tiny, world_stage1, world_stage2, world_stage2_grounding, world_stage3\)",
    ),
    (
        "train-config-syntax",
        lambda c: ["train", "--config", str(_text(c, "t.yaml", "model: {config: tiny\n")), "--stage", "1"],
        FAIL,
        r"t\.yaml: not valid YAML",
    ),
    (
        "train-config-top-level-list",
        lambda c: ["train", "--config", str(_text(c, "t.yaml", "- stage\n")), "--stage", "1"],
        FAIL,
        r"t\.yaml: the top level must be a mapping of sections, got a list",
    ),
    (
        "train-yaml-duplicate-key",
        lambda c: [
            "train",
            "--config",
            str(_text(c, "d.yaml", "stage: 1\ntraining:\n  max_steps: 1\n  max_steps: 100\n")),
        ],
        FAIL,
        r"d\.yaml: not valid YAML \(duplicate key 'max_steps' \(line 4\)",
    ),
    (
        "train-output-dir-is-the-model",
        lambda c: _train_yaml(c, model={"path": str(_fake_model_dir(c))})[:-1] + [str(c.tmp / "model")],
        FAIL,
        r"output_dir .*model is the model\.path folder: the run would overwrite its own input",
    ),
    (
        "train-unknown-section",
        lambda c: _train_yaml(c, optimizer={"lr": 1}),
        FAIL,
        r"unknown sections \['optimizer'\]",
    ),
    (
        "train-model-path-and-config",
        lambda c: _train_yaml(c, model={"config": "tiny", "path": str(c.tmp)}),
        FAIL,
        r"model: give either `path` \(a DEEM directory\) or `config: tiny`, not both",
    ),
    (
        "train-model-config-7b",
        lambda c: _train_yaml(c, model={"config": "7b"}),
        FAIL,
        r"model\.config must be 'tiny' \(or absent, with model\.path\), got '7b'",
    ),
    (
        "train-model-path-missing",
        lambda c: _train_yaml(c, model={"path": str(c.tmp / "no" / "such" / "model")}),
        FAIL,
        r"model\.path .*no/such/model: no such directory",
    ),
    (
        "train-model-path-without-config-json",
        lambda c: _train_yaml(c, model={"path": str(c.tmp)}),
        FAIL,
        r"model\.path .*: holds no config\.json",
    ),
    (
        "train-model-dtype-fp8",
        lambda c: _train_yaml(c, model={"config": "tiny", "dtype": "fp8"}),
        FAIL,
        r"model\.dtype must be one of \['float32', 'bfloat16', 'float16'\], got 'fp8'",
    ),
    (
        "train-overrides-break-the-vocab",
        lambda c: _train_yaml(c, model={"config": "tiny", "config_overrides": {"text_config": {"vocab_size": 50}}}),
        FAIL,
        r"model\.config_overrides: DeemConfig: text_config\.vocab_size does not fit the special token ids",
    ),
    ("train-no-sources", lambda c: _train_yaml(c, data={"sources": {}}), FAIL, r"data\.sources is empty"),
    (
        "train-source-unknown-type",
        lambda c: _train_yaml(c, data={"sources": {"web": {"type": "laion"}}}),
        FAIL,
        r"data\.sources\.web\.type must be one of \['mmc4', 'pairs', 'llava', 'referring', 'synthetic'\]",
    ),
    (
        "train-synthetic-negative-images",
        lambda c: _train_yaml(c, data={"sources": {"s": {"type": "synthetic", "max_images": -3}}}),
        FAIL,
        r"data\.sources\.s\.max_images must be an integer >= 1, got -3",
    ),
    (
        "train-reader-without-images",
        lambda c: _train_yaml(c, data={"sources": {"docs": {"type": "mmc4", "path": "docs.jsonl"}}}),
        FAIL,
        r"data\.sources\.docs\.images must be a path \(or a list of paths\), got None",
    ),
    (
        "train-reader-unknown-key",
        lambda c: _train_yaml(c, data={"sources": {"docs": {"type": "pairs", "path": "a.jsonl", "shuffle": True}}}),
        FAIL,
        r"data\.sources\.docs: unknown keys \['shuffle'\]",
    ),
    (
        "train-unknown-training-field",
        lambda c: _train_yaml(c, training={"max_steps": 1, "bogus_field": 3}),
        FAIL,
        r"training: unknown DeemTrainingArguments field\(s\) \['bogus_field'\]",
    ),
    (
        "train-max-steps-text",
        lambda c: _train_yaml(c, training={"max_steps": "many"}),
        FAIL,
        r"training\.max_steps must be int, got 'many'",
    ),
    (
        "train-learning-rate-nan",
        lambda c: _train_yaml(c, training={"max_steps": 1, "learning_rate": float("nan")}),
        FAIL,
        r"training\.learning_rate must be a finite number, got nan",
    ),
    (
        "train-output-dir-is-a-file",
        lambda c: _train_yaml(c)[:-1] + [str(_a_file(c, "run"))],
        FAIL,
        r"output_dir .*run: exists and is not a directory",
    ),
    (
        "train-resume-from-missing-checkpoint",
        lambda c: _train_yaml(c) + ["--resume_from_checkpoint", str(c.tmp / "checkpoint-9")],
        FAIL,
        r"--resume_from_checkpoint .*checkpoint-9: not a checkpoint directory",
    ),
    (
        "train-resume-without-checkpoints",
        lambda c: _train_yaml(c) + ["--resume_from_checkpoint"],
        FAIL,
        r"--resume_from_checkpoint: no checkpoint-\* folder in .*run to resume from",
    ),
    # ---- hub helpers
    (
        "hub-repo-id-three-parts",
        lambda c: _card(c, repo_id="a/b/c"),
        ValueError,
        r"repo_id 'a/b/c' is not a valid Hub repo id: .*'namespace/repo_name'",
    ),
    ("hub-repo-id-empty", lambda c: _card(c, repo_id=""), ValueError, r"repo_id '' is not a valid Hub repo id"),
    (
        "hub-repo-id-double-dash",
        lambda c: _card(c, repo_id="tester/deem--tiny"),
        ValueError,
        r"repo_id 'tester/deem--tiny' is not a valid Hub repo id: Cannot have -- or \.\.",
    ),
    ("hub-repo-id-not-str", lambda c: _card(c, repo_id=42), ValueError, r"repo_id must be a string .*got int"),
    (
        "hub-bad-base-model",
        lambda c: _card(c, base_model="stable diffusion 2.1"),
        ValueError,
        r"base_model 'stable diffusion 2\.1' is not a valid Hub repo id",
    ),
    ("hub-tags-a-string", lambda c: _card(c, tags="vision"), ValueError, r"tags must be a list of non-empty strings"),
    (
        "hub-results-file-missing",
        lambda c: _card(c, results_json=str(c.tmp / "results.json")),
        FileNotFoundError,
        r"results: '.*results\.json' is neither JSON text nor an existing JSON file",
    ),
    (
        "hub-results-json-syntax",
        lambda c: _card(c, results_json='{"VQAv2": 68.2,'),
        ValueError,
        r"results: not valid JSON text",
    ),
    (
        "hub-results-nan-score",
        lambda c: _card(c, results_json={"VQAv2": float("nan")}),
        ValueError,
        r"results row 0 \(VQAv2\): 'score' must be a finite number, got nan",
    ),
    (
        "hub-template-missing",
        lambda c: _card(c, template=c.tmp / "card.md"),
        FileNotFoundError,
        r"template: .*card\.md is not a file",
    ),
    (
        "hub-template-unknown-placeholder",
        lambda c: _card(c, template=_text(c, "card.md", "# ${model_name}\n${licence}\n")),
        ValueError,
        r"template .*card\.md: unknown placeholder \$\{licence\}",
    ),
    (
        "hub-write-card-missing-folder",
        lambda c: lambda: _hub("write_model_card")(c.tmp / "save", _tiny_model(c), "tester/deem-tiny"),
        NotADirectoryError,
        r"save_directory .*save does not exist",
    ),
    (
        "hub-write-card-into-a-file",
        lambda c: (lambda path: lambda: _hub("write_model_card")(path, _tiny_model(c), "tester/deem-tiny"))(
            _a_file(c, "save")
        ),
        NotADirectoryError,
        r"save_directory .*save is not a directory",
    ),
    (
        "hub-push-bad-repo-id",
        lambda c: _push(c, repo_id="tester/deem tiny"),
        ValueError,
        r"repo_id 'tester/deem tiny' is not a valid Hub repo id",
    ),
    ("hub-push-not-a-model", lambda c: _push(c, model=object()), ValueError, r"model must be a PreTrainedModel"),
    (
        "hub-push-bad-shard-size",
        lambda c: _push(c, max_shard_size="5 gigabytes"),
        ValueError,
        r"max_shard_size must be a positive number of bytes or a size like '5GB', got '5 gigabytes'",
    ),
    (
        "hub-push-empty-revision",
        lambda c: _push(c, revision=""),
        ValueError,
        r"revision must be a non-empty string, got ''",
    ),
]


def _snapshot(*roots: Path) -> dict:
    """Every path under ``roots`` with its kind, size and modification time."""
    out = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            st = path.lstat()
            # a folder counts by its presence (making and removing a temporary entry changes its mtime)
            out[str(path)] = ("dir",) if path.is_dir() else ("file", st.st_size, st.st_mtime_ns)
    return out


def _exception_type(expected):
    if isinstance(expected, str):  # the conversion error class, imported lazily
        from deem.conversion.original import ConversionError

        return {"ConversionError": ConversionError}[expected]
    return expected


def test_at_least_45_distinct_cases():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 45, len(ids)


@pytest.mark.parametrize("case_id,make,expected,pattern", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_refused_with_one_line_and_leaves_nothing(
    case_id, make, expected, pattern, original, components, tmp_path, capsys
):
    work = tmp_path / "work"
    work.mkdir()
    ctx = SimpleNamespace(tmp=work, original=original, components=components)
    call = make(ctx)
    before = _snapshot(work, original.root, components)
    capsys.readouterr()
    if isinstance(call, list):
        with pytest.raises(SystemExit) as exit_info:
            main(call)
        err = capsys.readouterr().err
        assert exit_info.value.code == expected, err
        lines = err.splitlines()
        assert len(lines) == 1, err  # one line, no usage dump, no traceback
        command = call[0] if call[0] in ("demo", "params", "assemble", "convert", "train") else None
        prefix = f"deem {command}: error: " if command else "deem: error: "
        assert lines[0].startswith(prefix), lines[0]
        message = lines[0][len(prefix) :]
    else:
        with pytest.raises(_exception_type(expected)) as err_info:
            call()
        message = str(err_info.value)
        assert "\n" not in message, message
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    after = _snapshot(work, original.root, components)
    assert after == before, sorted(set(after) ^ set(before)) or "a file changed"
    if os.path.isdir(work / "out") and (work / "out" / "keep.txt").exists():
        assert (work / "out" / "keep.txt").read_text() == "the user's file"


@pytest.mark.parametrize("command", ["convert", "assemble"])
def test_a_failure_while_saving_leaves_nothing(command, original, components, tmp_path, monkeypatch, capsys):
    """The model is written into a folder beside --out and renamed at the end: a crash half-way through saving
    leaves neither that folder, nor --out, nor the parent folders made for it."""
    from deem import DeemForInterleavedGeneration

    def half_written(self, save_directory, **kwargs):
        Path(save_directory, "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DeemForInterleavedGeneration, "save_pretrained", half_written)
    ctx = SimpleNamespace(tmp=tmp_path, original=original, components=components)
    out = tmp_path / "new" / "parents" / "out"
    argv = _convert_argv(ctx, out=out) if command == "convert" else _assemble_argv(ctx, out=out)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [f"deem {command}: error: [Errno 28] No space left on device"]
    assert list(tmp_path.iterdir()) == []
