"""Assembling a fresh DEEM from component checkpoints (conversion/assemble.py).

The tests write tiny components in the exact on-disk formats of the real ones: a LLaMA directory from
``LlamaForCausalLM.save_pretrained`` + a LLaMA-style tokenizer, a Stable Diffusion 2.1 diffusers directory (UNet,
VAE, PNDM scheduler config, CLIP text encoder + byte-level BPE tokenizer files, model_index.json) and an open_clip
``open_clip_pytorch_model.bin`` holding a timm ConvNeXt trunk under ``visual.trunk.*``, a projection head and a
text tower.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizer_utils import build_test_tokenizer

from deem.world.components import MODEL_INDEX, SCHEDULER
from deem.world.components import UNET as WORLD_UNET
from deem.world.components import write_clip_tokenizer as world_clip_tokenizer

SD_TEXT_LEN = 16  # the tiny SD tokenizer's model_max_length (77 for the real one)
HIDDEN = 32
CROSS_DIM = 32

OVERRIDES = {
    "perceiver_config": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },
    "decoder_perceiver_config": {"num_attention_heads": 4, "intermediate_size": 64},
    "cross_attention_config": {"num_points": 2, "frequency": 2},
    "diffusion_config": {"side_num_heads": 4, "side_num_points": 2},
}
ASSEMBLE_KW = dict(image_size=64, num_image_tokens=4, image_embed_dim=32, config_overrides=OVERRIDES, seed=0)

UNET = {
    "_class_name": "UNet2DConditionModel",
    **WORLD_UNET,
    "block_out_channels": [16, 32],
    "cross_attention_dim": CROSS_DIM,
}
VAE = {
    "act_fn": "silu",
    "block_out_channels": [8, 16, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "out_channels": 3,
    "sample_size": 64,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


class NotATensor:
    """Pickled into a checkpoint: torch.load(weights_only=True) must refuse it."""

    def __init__(self):
        self.payload = "anything"


# ---------------------------------------------------------------------------------------------------------------------
# writing the components
# ---------------------------------------------------------------------------------------------------------------------


def write_llama(path, tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_test_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def write_clip_tokenizer(path):
    """SD's tokenizer/ folder (byte-level CLIP BPE), the world's writer at this test's text length and pad token."""
    return world_clip_tokenizer(path, max_length=SD_TEXT_LEN, pad_token="!")


def write_sd(path, seed=0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{k: v for k, v in UNET.items() if not k.startswith("_")})
    unet.save_pretrained(path / "unet")
    vae = AutoencoderKL(**VAE)
    vae.save_pretrained(path / "vae")
    (path / "scheduler").mkdir(parents=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    vocab = write_clip_tokenizer(path / "tokenizer")
    text = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=CROSS_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=SD_TEXT_LEN,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=1,
        projection_dim=CROSS_DIM,
    )
    CLIPTextModel(text).save_pretrained(path / "text_encoder")
    (path / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return unet, vae


def write_clip(path, seed=0, extra=None):
    """open_clip ConvNeXt checkpoint: timm trunk under visual.trunk.*, visual.head.proj, a small text tower."""
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(seed)
    trunk = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=0)
    state = {f"visual.trunk.{k}": v.clone() for k, v in trunk.state_dict().items()}
    width = 16
    state.update(
        {
            "visual.head.proj.weight": torch.randn(width, 32),
            "positional_embedding": torch.randn(SD_TEXT_LEN, width),
            "text_projection": torch.randn(width, width),
            "logit_scale": torch.tensor(4.6052),
            "token_embedding.weight": torch.randn(64, width),
            "transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * width, width),
            "transformer.resblocks.0.attn.in_proj_bias": torch.zeros(3 * width),
            "transformer.resblocks.0.ln_1.weight": torch.ones(width),
            "ln_final.weight": torch.ones(width),
            "ln_final.bias": torch.zeros(width),
        }
    )
    state.update(extra or {})
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    root = tmp_path_factory.mktemp("components")
    llama = write_llama(root / "vicuna")
    unet, vae = write_sd(root / "sd21")
    clip = write_clip(root / "open_clip_pytorch_model.bin")
    return {
        "root": root,
        "llm": root / "vicuna",
        "sd": root / "sd21",
        "clip": root / "open_clip_pytorch_model.bin",
        "llama": llama,
        "unet": unet,
        "vae": vae,
        "clip_state": clip,
    }


@pytest.fixture(scope="module")
def assembled(components):
    from deem.conversion.assemble import assemble_deem

    model, processor = assemble_deem(components["llm"], components["sd"], components["clip"], **ASSEMBLE_KW)
    return model, processor


def _assemble(components, out=None, llm=None, sd=None, clip=None, **kw):
    from deem.conversion.assemble import assemble_deem

    args = {**ASSEMBLE_KW, **kw}
    return assemble_deem(llm or components["llm"], sd or components["sd"], clip or components["clip"], out, **args)


def _copy_llm(components, dest):
    shutil.copytree(components["llm"], dest)
    return dest


# ---------------------------------------------------------------------------------------------------------------------
# (a) (b) the assembled LLM is the source LLaMA; gates 0; new tokens at -5
# ---------------------------------------------------------------------------------------------------------------------


def test_text_logits_equal_the_source_llama_and_new_tokens_start_at_minus_5(components, assembled):
    model, _ = assembled
    llama = components["llama"]
    v0 = llama.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, v0, (2, 11), generator=g)
    ids[:, 0] = 1
    with torch.no_grad():
        ours = model(input_ids=ids, return_loss=False).logits
        ref = llama(input_ids=ids).logits
    assert ours.shape == (2, 11, v0 + 6)
    torch.testing.assert_close(ours[..., :v0], ref, rtol=0, atol=1e-6)
    assert torch.equal(ours[..., v0:], torch.full_like(ours[..., v0:], -5.0))

    gates = [layer.cross_attn.gate for layer in model.language_model.layers if layer.cross_attn is not None]
    assert len(gates) == 1 and all(torch.equal(g, torch.zeros(1)) for g in gates)
    assert torch.equal(model.soi_embedding, torch.zeros_like(model.soi_embedding))
    head = model.lm_head
    assert torch.equal(head.base.weight[:v0], llama.lm_head.weight)
    assert torch.equal(head.base.weight[v0:], torch.zeros(6, HIDDEN))
    assert torch.equal(head.base.bias, torch.cat([torch.zeros(v0), torch.full((6,), -100.0)]))
    assert torch.equal(head.new_tokens.weight, torch.zeros(6, HIDDEN)) and torch.equal(
        head.new_tokens.bias, torch.full((6,), 95.0)
    )


def test_new_embedding_rows_are_freshly_initialised_and_stage_1_is_set(components, assembled):
    model, _ = assembled
    v0 = components["llama"].config.vocab_size
    emb = model.language_model.embed_tokens.weight
    assert torch.equal(emb[:v0], components["llama"].model.embed_tokens.weight)
    new = emb[v0:].detach()
    assert new.shape == (6, HIDDEN) and bool(new.abs().gt(0).all()) and 0.005 < float(new.std()) < 0.05
    # LLM cross-attention (§2.6, §2.11): HF init (normal 0.02) then the MMFS reset; offsets bias uniform(-3, 3)
    attn = model.language_model.layers[0].cross_attn.attn
    assert torch.equal(attn.sampling_offsets.weight, torch.zeros_like(attn.sampling_offsets.weight))
    offsets = attn.sampling_offsets.bias.detach()
    assert float(offsets.abs().max()) <= 3.0 and float(offsets.std()) > 1.0
    assert torch.equal(attn.attention_weights.bias, torch.zeros_like(attn.attention_weights.bias))
    assert torch.equal(attn.value_proj.bias, torch.zeros_like(attn.value_proj.bias))
    for weight in (attn.attention_weights.weight, attn.dynamic_offset_mask.weight, attn.query_relpos.weight):
        assert 0.015 < float(weight.detach().std()) < 0.025
    side = model.unet_side.blocks()[0].attn
    assert torch.equal(side.sampling_offsets.weight, torch.zeros_like(side.sampling_offsets.weight))
    assert all(torch.equal(b.conv.weight, torch.zeros_like(b.conv.weight)) for b in model.unet_side.blocks())
    # stage-1 preset: LLM and base head frozen, cross-attention and new-token head trainable
    assert not model.language_model.layers[0].self_attn.q_proj.weight.requires_grad
    assert model.language_model.layers[0].cross_attn.gate.requires_grad
    assert not model.lm_head.base.weight.requires_grad and model.lm_head.new_tokens.weight.requires_grad


def test_stage_1_training_step_runs_on_the_assembled_model(components):
    """Processor -> stage-1 forward with all three losses -> backward: only stage-1 parts get gradients."""
    model, processor = _assemble(components)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 40, 48, generator=g) for _ in range(2)]
    batch = processor(
        ["A photo of a cat. <image> The cat is sitting on a table. <image>", "<image> A dog is looking at the river."],
        images=[images, images[:1]],
        add_eos=True,
        generator=0,
    )
    model.train()
    out = model(**batch, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(x) for x in (out.loss, out.loss_ntp, out.loss_nip, out.loss_csr))
    out.loss.backward()
    assert (
        model.lm_head.new_tokens.bias.grad is not None
        and model.language_model.layers[0].cross_attn.gate.grad is not None
    )
    assert model.language_model.embed_tokens.weight.grad is None and model.unet.conv_in.weight.grad is None


# ---------------------------------------------------------------------------------------------------------------------
# (c) vision trunk, UNet, VAE equal the sources; null condition = CLIP text encoder on ""
# ---------------------------------------------------------------------------------------------------------------------


def test_trunk_unet_vae_and_null_condition_come_from_the_sources(components, assembled):
    from transformers import AutoTokenizer, CLIPTextModel

    model, _ = assembled
    trunk = model.image_encoder.backbone.trunk.state_dict()
    source = {
        k[len("visual.trunk.") :]: v for k, v in components["clip_state"].items() if k.startswith("visual.trunk.")
    }
    assert set(trunk) == set(source)
    assert all(torch.equal(trunk[k], source[k]) for k in source)
    for name in ("unet", "vae"):
        ours, ref = getattr(model, name).state_dict(), components[name].state_dict()
        assert set(ours) == set(ref), name
        assert all(torch.equal(ours[k], ref[k]) for k in ref), name

    tokenizer = AutoTokenizer.from_pretrained(components["sd"] / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(components["sd"] / "text_encoder").eval()
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = encoder(ids).last_hidden_state
    assert model.null_condition.shape == (1, SD_TEXT_LEN, CROSS_DIM)
    assert torch.equal(model.null_condition.detach(), expected)


def test_sizes_are_read_from_the_components(components, assembled):
    model, processor = assembled
    cfg = model.config
    v0 = components["llama"].config.vocab_size
    assert cfg.original_vocab_size == v0 and cfg.text_config.vocab_size == v0 + 6
    assert (
        cfg.text_config.num_hidden_layers == 2
        and cfg.text_config.num_key_value_heads == 2
        and cfg.text_config.hidden_size == HIDDEN
    )
    assert list(cfg.vision_config.depths) == [1, 1, 1, 1] and list(cfg.vision_config.dims) == [8, 16, 24, 32]
    assert (
        cfg.decoder_perceiver_config.num_queries == SD_TEXT_LEN
        and cfg.decoder_perceiver_config.hidden_size == CROSS_DIM
    )
    assert cfg.decoder_perceiver_config.encoder_hidden_size == HIDDEN
    assert cfg.diffusion_config.unet["cross_attention_dim"] == CROSS_DIM and cfg.diffusion_config.image_size == 64
    assert (
        cfg.diffusion_config.scheduler["beta_schedule"] == "scaled_linear"
        and "_class_name" not in cfg.diffusion_config.scheduler
    )
    assert list(cfg.cross_attention_config.spatial_shapes) == [8, 4, 2]
    assert processor.image_processor.size == 64 and processor.image_processor.decoder_size == 64
    assert processor.num_image_tokens == 4 == cfg.num_image_tokens


# ---------------------------------------------------------------------------------------------------------------------
# (d) tokenizer: six new tokens right after the base vocab, config ids match
# ---------------------------------------------------------------------------------------------------------------------


def test_tokenizer_has_the_six_tokens_after_the_base_vocab(components, assembled):
    model, processor = assembled
    tok, cfg = processor.tokenizer, model.config
    v0 = components["llama"].config.vocab_size
    names = ["<|startofimage|>", "<|sniffer|>", "<ref>", "</ref>", "<box>", "</box>"]
    assert len(tok) == v0 + 6
    assert tok.convert_tokens_to_ids(names) == list(range(v0, v0 + 6))
    ids = [
        cfg.soi_token_id,
        cfg.image_token_id,
        cfg.ref_start_token_id,
        cfg.ref_end_token_id,
        cfg.box_start_token_id,
        cfg.box_end_token_id,
    ]
    assert ids == list(range(v0, v0 + 6))
    assert (processor.soi_token_id, processor.image_token_id) == (v0, v0 + 1)
    assert cfg.bos_token_id == tok.bos_token_id == 1 and cfg.eos_token_id == tok.eos_token_id == 2
    assert cfg.pad_token_id == tok.pad_token_id is not None


# ---------------------------------------------------------------------------------------------------------------------
# (e) save -> AutoModel / AutoProcessor with trust_remote_code; the CLI
# ---------------------------------------------------------------------------------------------------------------------


def test_saved_model_loads_with_auto_classes(components, assembled, tmp_path):
    from transformers import AutoModel, AutoProcessor

    out = tmp_path / "deem-assembled"
    model, processor = _assemble(components, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deem-assembled"]  # no temporary folder left behind
    loaded = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert type(loaded).__name__ == "DeemForInterleavedGeneration"
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # same seed -> same fresh init
    ref = assembled[0].state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    proc = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert type(proc).__name__ == "DeemProcessor" and proc.soi_token_id == model.config.soi_token_id
    with pytest.raises(FileExistsError):
        _assemble(components, out)


def test_cli_writes_the_model(components, tmp_path, capsys):
    from deem.conversion.assemble import main

    out = tmp_path / "cli-out"
    main(
        [
            "--llm",
            str(components["llm"]),
            "--sd",
            str(components["sd"]),
            "--clip",
            str(components["clip"]),
            "--out",
            str(out),
            "--image-size",
            "64",
            "--num-image-tokens",
            "4",
            "--image-embed-dim",
            "32",
            "--seed",
            "0",
            "--dtype",
            "bfloat16",
            "--config-overrides",
            json.dumps(OVERRIDES),
        ]
    )
    printed = capsys.readouterr().out
    assert "open_clip ConvNeXt" in printed and "ignored" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["original_vocab_size"] == components["llama"].config.vocab_size
    weights = {}
    for shard in out.glob("*.safetensors"):
        weights.update(load_file(shard))
    assert weights["model.language_model.embed_tokens.weight"].dtype == torch.bfloat16
    assert weights["image_decoder.vae.encoder.conv_in.weight"].dtype == torch.float32  # the VAE stays fp32
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # the permissions of mkdir, not mkdtemp's 0700
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        main(
            [
                "--llm",
                str(components["llm"]),
                "--sd",
                str(components["sd"]),
                "--clip",
                str(components["clip"]),
                "--out",
                str(out),
            ]
        )


# ---------------------------------------------------------------------------------------------------------------------
# variants that must work
# ---------------------------------------------------------------------------------------------------------------------


def test_tied_embedding_llama_and_sd_without_text_encoder(components, tmp_path, caplog):
    llm = tmp_path / "tied"
    llama = write_llama(llm, tie=True, seed=3)
    assert not any("lm_head" in k for k in load_file(llm / "model.safetensors"))
    sd = tmp_path / "sd-no-te"
    sd.mkdir()
    for part in ("unet", "vae", "scheduler"):
        shutil.copytree(components["sd"] / part, sd / part)
    with caplog.at_level("WARNING"):
        model, _ = _assemble(components, llm=llm, sd=sd)
    assert "null_condition keeps its random init" in caplog.text
    v0 = llama.config.vocab_size
    assert torch.equal(model.lm_head.base.weight[:v0], llama.model.embed_tokens.weight)
    ids = torch.randint(3, v0, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, return_loss=False).logits[..., :v0], llama(input_ids=ids).logits, rtol=0, atol=1e-6
        )
    assert model.config.decoder_perceiver_config.num_queries == 77  # no text encoder: the paper's 77


def test_sharded_llama_and_old_vae_attention_names(components, tmp_path):
    """A sharded LLaMA (index + shards, old rotary buffers) and an SD-era VAE file with query/key/value/proj_attn."""
    llm = tmp_path / "sharded"
    components["llama"].save_pretrained(llm, max_shard_size="20KB")
    build_test_tokenizer().save_pretrained(llm)
    index = json.loads((llm / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    first = sorted(set(index["weight_map"].values()))[0]
    shard = load_file(llm / first)
    shard["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # written by transformers < 4.35
    save_file(shard, llm / first, metadata={"format": "pt"})
    index["weight_map"]["model.layers.0.self_attn.rotary_emb.inv_freq"] = first
    (llm / "model.safetensors.index.json").write_text(json.dumps(index))

    sd = tmp_path / "sd-old-vae"
    shutil.copytree(components["sd"], sd)
    vae = load_file(sd / "vae" / "diffusion_pytorch_model.safetensors")
    renamed = {}
    for k, v in vae.items():
        for new, old in (
            (".to_q.", ".query."),
            (".to_k.", ".key."),
            (".to_v.", ".value."),
            (".to_out.0.", ".proj_attn."),
        ):
            if "mid_block.attentions.0" in k and new in k:
                k = k.replace(new, old)
        renamed[k] = v
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, sd / "vae" / "diffusion_pytorch_model.safetensors")
    model, _ = _assemble(components, llm=llm, sd=sd)
    ref = components["vae"].state_dict()
    assert all(torch.equal(model.vae.state_dict()[k], ref[k]) for k in ref)
    assert torch.equal(
        model.language_model.layers[1].mlp.down_proj.weight, components["llama"].model.layers[1].mlp.down_proj.weight
    )


# ---------------------------------------------------------------------------------------------------------------------
# (f) bad inputs: clear errors naming the file, nothing written
# ---------------------------------------------------------------------------------------------------------------------


def _truncated_llama(components, tmp_path):
    llm = _copy_llm(components, tmp_path / "truncated")
    data = (llm / "model.safetensors").read_bytes()
    (llm / "model.safetensors").write_bytes(data[: len(data) - 1000])
    return {"llm": llm}, [str(llm / "model.safetensors"), "safetensors"]


def _other_model_llama(components, tmp_path):
    llm = _copy_llm(components, tmp_path / "other")
    weights = load_file(llm / "model.safetensors")
    del weights["model.norm.weight"]
    weights["model.vision_tower.proj.weight"] = torch.zeros(2, 2)
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, HIDDEN)
    save_file(weights, llm / "model.safetensors", metadata={"format": "pt"})
    return {"llm": llm}, [
        str(llm / "model.safetensors"),
        "model.norm.weight",
        "model.vision_tower.proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "(65, 32)",
    ]


def _unsafe_pickle(components, tmp_path):
    clip = tmp_path / "open_clip_pytorch_model.bin"
    write_clip(clip, extra={"visual.trunk.extra": NotATensor()})
    return {"clip": clip}, [str(clip), "arbitrary code", "weights_only"]


def _clip_unknown_key(components, tmp_path):
    clip = tmp_path / "clip.safetensors"
    state = write_clip(tmp_path / "tmp.bin", extra={"visual.attnpool.weight": torch.zeros(3)})
    save_file({k: v.contiguous() for k, v in state.items()}, clip)
    return {"clip": clip}, [str(clip), "visual.attnpool.weight"]


def _vocab_mismatch(components, tmp_path):
    llm = _copy_llm(components, tmp_path / "vocab")
    config = json.loads((llm / "config.json").read_text())
    config["vocab_size"] += 5
    (llm / "config.json").write_text(json.dumps(config))
    return {"llm": llm}, [str(llm), "vocab_size"]


def _queries_mismatch(components, tmp_path):
    overrides = {**OVERRIDES, "decoder_perceiver_config": {**OVERRIDES["decoder_perceiver_config"], "num_queries": 8}}
    return {"config_overrides": overrides}, ["num_queries", str(SD_TEXT_LEN), "tokenizer"]


def _unet_missing(components, tmp_path):
    sd = tmp_path / "sd"
    shutil.copytree(components["sd"], sd)
    (sd / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    return {"sd": sd}, [str(sd / "unet"), "diffusion_pytorch_model.safetensors"]


def _v_prediction(components, tmp_path):
    sd = tmp_path / "sd-v"
    shutil.copytree(components["sd"], sd)
    (sd / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SCHEDULER, "prediction_type": "v_prediction"})
    )
    return {"sd": sd}, [str(sd / "scheduler" / "scheduler_config.json"), "v_prediction"]


@pytest.mark.parametrize(
    "make_bad",
    [
        _truncated_llama,
        _other_model_llama,
        _unsafe_pickle,
        _clip_unknown_key,
        _vocab_mismatch,
        _queries_mismatch,
        _unet_missing,
        _v_prediction,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_bad_inputs_raise_clear_errors_and_write_nothing(components, tmp_path, make_bad):
    from deem.conversion.assemble import AssemblyError

    kwargs, expected_in_message = make_bad(components, tmp_path)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    out = out_parent / "deem"
    with pytest.raises(AssemblyError) as err:
        _assemble(components, out, **kwargs)
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    for part in expected_in_message:
        assert part in message, (part, message)
    assert not out.exists() and list(out_parent.iterdir()) == []
