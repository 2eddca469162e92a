"""Original checkpoint -> HF directory: the command line on fixture A's files, --verify, and bad input."""

import pickle
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def original_files(parity_a_dir, tmp_path_factory):
    """Fixture A as a user would have it: a .bin checkpoint, the YAML, a LLaMA dir and an SD dir."""
    from conftest import write_original_configs
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("original")
    state = load_file(parity_a_dir / "original_state_dict.safetensors")
    torch.save(state, root / "pytorch_model.bin")
    write_original_configs(parity_a_dir, root)
    return root, state


def args(root, out, checkpoint="pytorch_model.bin", extra=()):
    return [
        "--checkpoint",
        str(root / checkpoint),
        "--config",
        str(root / "pretrain.yaml"),
        "--llm",
        str(root / "llm"),
        "--sd",
        str(root / "sd"),
        "--out",
        str(out),
        "--image-size",
        "64",
        *extra,
    ]


def test_command_line_converts_and_verifies(original_files, parity_a_dir, tmp_path):
    root, state = original_files
    out = tmp_path / "converted"
    proc = subprocess.run(
        [sys.executable, "-m", "deem", "convert", *args(root, out, extra=["--verify", str(parity_a_dir)])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"verified against {parity_a_dir}" in proc.stdout and f"wrote {out}" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no temporary folder left behind
    from deem import DeemForInterleavedGeneration

    model = DeemForInterleavedGeneration.from_pretrained(out)
    assert torch.equal(model.language_model.norm.weight, state["mm_decoder.norm.weight"])
    assert torch.equal(model.null_condition, state["image_decoder.neg_prompt_embeds"])
    assert model.config.vision_config.depths == [1, 1, 2, 1] and model.config.num_image_tokens == 8


def test_safetensors_checkpoint_and_python_api(original_files, parity_a_dir):
    from deem.conversion.convert_original import convert, verify
    from deem.conversion.original import ConversionError

    root, state = original_files
    save_file(state, root / "model.safetensors")
    cfg = yaml.safe_load((root / "pretrain.yaml").read_text())["model"]
    model = convert(root / "model.safetensors", cfg, root / "llm", root / "sd", image_size=64)
    with pytest.raises(ConversionError, match="image_size .* is required"):  # the Python API does not guess either
        convert(root / "model.safetensors", cfg, root / "llm", root / "sd")
    report = verify(model, parity_a_dir)
    assert max(report.values()) < 1e-4 and "logits_sel" in report


def _expect_failure(root, out, checkpoint, match, extra=()):
    from deem.conversion.convert_original import main
    from deem.conversion.original import ConversionError

    with pytest.raises(ConversionError, match=match):
        main(args(root, out, checkpoint, extra))
    assert not out.exists(), "nothing may be written when the conversion fails"


def test_bad_checkpoints_fail_clearly_and_write_nothing(original_files, tmp_path):
    root, state = original_files
    out = tmp_path / "out"
    # another model's checkpoint
    torch.save(
        {
            "encoder.layer.0.weight": torch.zeros(2, 2),
            **{k: v for k, v in state.items() if not k.startswith("mm_decoder.")},
        },
        root / "other.bin",
    )
    _expect_failure(root, out, "other.bin", r"unmapped key.*encoder\.layer\.0\.weight.*missing.*language_model")
    # truncated file
    data = (root / "pytorch_model.bin").read_bytes()
    (root / "truncated.bin").write_bytes(data[: len(data) // 2])
    _expect_failure(root, out, "truncated.bin", r"truncated\.bin: cannot read")
    save_file(state, root / "whole.safetensors")
    (root / "truncated.safetensors").write_bytes((root / "whole.safetensors").read_bytes()[:4000])
    _expect_failure(root, out, "truncated.safetensors", r"truncated\.safetensors: not a readable safetensors")

    # a pickle that needs arbitrary code
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(root / "evil.bin", "wb") as f:
        pickle.dump({"x": Payload()}, f)
    _expect_failure(root, out, "evil.bin", r"evil\.bin: refused.*arbitrary code")
    # a config that does not match the weights: wrong number of image tokens
    cfg = yaml.safe_load((root / "pretrain.yaml").read_text())
    cfg["model"]["num_img_token"] = 6
    cfg["model"]["visual_tokenizer_config"]["perceiver_config"]["num_queries"] = 6
    (root / "wrong.yaml").write_text(yaml.safe_dump(cfg))
    from deem.conversion.convert_original import main
    from deem.conversion.original import ConversionError

    with pytest.raises(
        ConversionError,
        match=r"shape mismatch.*image_encoder\.perceiver\.queries: checkpoint \(1, 8, 32\) vs model \(1, 6, 32\)",
    ):
        main(
            [
                "--checkpoint",
                str(root / "pytorch_model.bin"),
                "--config",
                str(root / "wrong.yaml"),
                "--llm",
                str(root / "llm"),
                "--sd",
                str(root / "sd"),
                "--out",
                str(out),
                "--image-size",
                "64",
            ]
        )
    assert not out.exists()
    # diffusion weights without the SD configs
    with pytest.raises(ConversionError, match="--sd"):
        main(
            [
                "--checkpoint",
                str(root / "pytorch_model.bin"),
                "--config",
                str(root / "pretrain.yaml"),
                "--llm",
                str(root / "llm"),
                "--out",
                str(out),
                "--image-size",
                "64",
            ]
        )
    assert not out.exists()


def test_duplicated_null_embedding_must_agree(original_files):
    from deem.conversion.original import ConversionError, convert_state_dict

    _, state = original_files
    bad = dict(state)
    bad["visual_tokenizer.neg_prompt_embeds"] = state["visual_tokenizer.neg_prompt_embeds"] + 1
    with pytest.raises(ConversionError, match="neg_prompt_embeds differs"):
        convert_state_dict(bad)
    bad = dict(state)
    bad["mm_decoder.layers.0.llama_cross_attn.attn.ignore_token"] = torch.ones_like(
        state["mm_decoder.layers.0.llama_cross_attn.attn.ignore_token"]
    )
    with pytest.raises(ConversionError, match="ignore_token.*all zeros"):
        convert_state_dict(bad)


@pytest.mark.parametrize("side", [48, 96, 224])
def test_converted_weights_run_at_other_encoder_sizes(original_files, side):
    """The original runs its weights at other encoder resolutions (48 px: maps 12, 6, 3, 1; stage-1 weights at
    448): conversion at such a size gives a model that trains and generates there (the cross-attention keeps the
    configured map shapes for its offsets, as the original does)."""
    from conftest import tiny_batch

    from deem.conversion.convert_original import convert

    root, _ = original_files
    cfg = yaml.safe_load((root / "pretrain.yaml").read_text())["model"]
    model = convert(root / "pytorch_model.bin", cfg, root / "llm", root / "sd", image_size=side)
    assert model.config.vision_config.image_size == side
    batch = tiny_batch(model.config, seed=side)
    assert batch["pixel_values"].shape[-1] == side
    model.train()
    out = model(**batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.loss_nip is not None and out.loss_csr is not None
    out.loss.backward()
    model.eval()
    with torch.no_grad():
        ids = batch["input_ids"][:1, :-1]
        gen = model.generate(
            input_ids=ids,
            pixel_values=batch["pixel_values"][:2],
            num_images=batch["num_images"][:1],
            max_new_tokens=2,
            soi="stop",
        )
    assert gen.shape[1] >= ids.shape[1] + 1
