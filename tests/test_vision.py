"""Image encoder, perceiver and region extractor: parity with the original (fixture A) and unit checks."""

from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from deem.conversion.original_keys_vision import rename_image_encoder_key, rename_perceiver_key
from deem.modeling.configuration_deem import CLIP_MEAN, CLIP_STD, DeemConfig, DeemPerceiverConfig
from deem.modeling.vision import DeemImageEncoder, DeemPerceiver, DeemRegionExtractor

ATOL = RTOL = 1e-5
SKIPPED_PREFIXES = ("visual_tokenizer.encoder.",)
SKIPPED_KEYS = ("visual_tokenizer.neg_prompt_embeds",)


def fixture_a_config(**vision_overrides) -> DeemConfig:
    """Fixture A's encoder side (configs.json) on top of the tiny text / diffusion parts (widths made to fit)."""
    base = DeemConfig.tiny()
    return DeemConfig.tiny(
        vision_config=dict(
            depths=(1, 1, 2, 1),
            dims=(16, 32, 48, 64),
            embed_dim=48,
            image_size=64,
            grid_size=16,
            drop_path_rate=0.0,
            **vision_overrides,
        ),
        perceiver_config=dict(
            num_queries=8,
            hidden_size=32,
            encoder_hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            cross_attention_frequency=2,
            qk_normalization=True,
        ),
        text_config=dict(base.text_config.to_dict(), hidden_size=48, intermediate_size=96),
        decoder_perceiver_config=dict(
            num_queries=16,
            hidden_size=48,
            encoder_hidden_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            cross_attention_frequency=1,
            qk_normalization=False,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        diffusion_config=dict(
            base.diffusion_config.to_dict(),
            image_size=64,
            unet=dict(base.diffusion_config.unet, cross_attention_dim=48),
        ),
        image_embed_dim=48,
        num_image_tokens=8,
    )


@pytest.fixture(scope="module")
def parity_a(parity_a_dir):
    return (
        load_file(parity_a_dir / "original_state_dict.safetensors"),
        load_file(parity_a_dir / "inputs.safetensors"),
        load_file(parity_a_dir / "intermediates.safetensors"),
    )


def convert(state_dict, prefix, rename):
    """Rename every ``prefix`` key; returns (converted, dropped original keys)."""
    converted, dropped = {}, []
    for key, tensor in state_dict.items():
        if not key.startswith(prefix) or key.startswith(SKIPPED_PREFIXES) or key in SKIPPED_KEYS:
            continue
        new = rename(key[len(prefix) :])
        if new is None:
            dropped.append(key)
            continue
        assert new not in converted, f"two original keys map to {new}"
        converted[new] = tensor
    return converted, dropped


@pytest.fixture(scope="module")
def encoder_a(parity_a):
    state_dict, _, _ = parity_a
    model = DeemImageEncoder(fixture_a_config()).eval()
    converted, dropped = convert(state_dict, "visual_tokenizer.", rename_image_encoder_key)
    model.load_state_dict(converted, strict=True)
    assert sorted(dropped) == sorted(
        k for k in state_dict if k.startswith("visual_tokenizer.sniffer.vision_model.visual.head.mlp.")
    )
    assert dropped
    return model


def max_dev(a, b):
    return (a.float() - b.float()).abs().max().item()


def assert_close(name, ours, ref):
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------- parity (fixture A)


def test_fixture_a_image_encoder_parity(encoder_a, parity_a):
    state_dict, inputs, ref = parity_a
    torch.set_num_threads(1)
    model = encoder_a
    pixels, masks = inputs["image_tensors"], inputs["image_tensors_mask"]
    assert (masks != 1).any(), "fixture A should carry one partial region mask"
    torch.testing.assert_close(model.pos_embed, state_dict["visual_tokenizer.pos_embed"], atol=0, rtol=0)
    torch.testing.assert_close(model.clip_mean.flatten(), torch.tensor(CLIP_MEAN))
    torch.testing.assert_close(model.clip_std.flatten(), torch.tensor(CLIP_STD))
    with torch.no_grad():
        maps, pooled = model.backbone((pixels - model.clip_mean) / model.clip_std)
        out = model(pixels, masks)
        dif = model.diffusion_condition(out.perceiver_output)
    checks = {f"sniffer.hidden_states.{i}": maps[i] for i in range(4)}
    checks["sniffer.pooler_output"] = pooled
    checks["sniffer.last_hidden_state"] = torch.cat([pooled[:, None], maps[2].flatten(2).transpose(1, 2)], dim=1)
    checks["visual_tokenizer.perceiver_in"] = out.perceiver_input
    checks["visual_tokenizer.perceiver_out"] = out.perceiver_output
    checks.update({f"visual_tokenizer.multiscale_features.{i}": out.multiscale_features[i] for i in range(4)})
    checks["visual_tokenizer.vis_embed"] = out.llm_embeds
    checks["encoder_path.dif_embed"] = dif
    checks.update({f"encoder_path.mmfs_features.{i}": out.region_features[i][:, None] for i in range(4)})
    for name, ours in checks.items():
        assert_close(name, ours, ref[name])
    # the mask really changes something (image 1), and multiscale stays unmasked
    assert max_dev(out.region_features[0], out.multiscale_features[0]) > 0
    side = model.config.diffusion_config.latent_size
    assert out.latent_mask.shape == (3, 1, side, side) and out.latent_mask.dtype == torch.bool
    assert out.latent_mask[0].all() and not out.latent_mask[1].all()


def test_fixture_a_eager_perceiver_is_bit_exact(encoder_a, parity_a):
    _, _, ref = parity_a
    torch.set_num_threads(1)
    config = encoder_a.perceiver.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = encoder_a.perceiver(ref["visual_tokenizer.perceiver_in"])
    finally:
        config._attn_implementation = previous
    assert max_dev(out, ref["visual_tokenizer.perceiver_out"]) <= 1e-6


def test_fixture_a_decoder_perceiver_parity(parity_a):
    state_dict, _, ref = parity_a
    torch.set_num_threads(1)
    config = fixture_a_config().decoder_perceiver_config
    perceiver = DeemPerceiver(config).eval()
    converted, dropped = convert(state_dict, "image_decoder.perceiver_resampler.", rename_perceiver_key)
    assert not dropped
    perceiver.load_state_dict(converted, strict=True)
    with torch.no_grad():
        out = perceiver(ref["image_decoder.perceiver_in"], ref["image_decoder.context_attention_mask"])
    assert (ref["image_decoder.context_attention_mask"] == 0).any(), "fixture should exercise the context mask"
    assert_close("image_decoder.context_features", out, ref["image_decoder.context_features"])


def test_rename_rules():
    assert rename_image_encoder_key("sniffer.vision_model.adapter_c2.weight") == "backbone.adapters.0.weight"
    assert rename_image_encoder_key("sniffer.vision_model.adapter_cls.bias") == "backbone.pooled_adapter.bias"
    assert (
        rename_image_encoder_key("sniffer.vision_model.visual.trunk.stages.2.blocks.1.gamma")
        == "backbone.trunk.stages.2.blocks.1.gamma"
    )
    assert rename_image_encoder_key("sniffer.vision_model.visual.head.mlp.fc2.weight") is None
    assert rename_image_encoder_key("proj_t.weight") == "proj_to_llm.weight"
    assert rename_image_encoder_key("proj_i.bias") == "proj_to_diffusion.bias"
    assert (
        rename_image_encoder_key("feature_extractor.mask_linear.layers.2.weight")
        == "region_extractor.mask_linear.layers.2.weight"
    )
    assert (
        rename_image_encoder_key("feature_extractor.mask_feat_linear.bias") == "region_extractor.mask_feat_linear.bias"
    )
    assert rename_image_encoder_key("pos_embed") == "pos_embed"
    assert (
        rename_image_encoder_key(
            "perceiver_resampler.blip2qformer.encoder.layer.4.crossattention.attention.k_norm.weight"
        )
        == "perceiver.layers.4.cross_attention.k_norm.weight"
    )
    assert rename_perceiver_key("queries") == "queries"
    assert rename_perceiver_key("blip2qformer.layernorm.bias") == "input_layernorm.bias"
    assert (
        rename_perceiver_key("blip2qformer.encoder.layer.0.attention.output.LayerNorm.weight")
        == "layers.0.self_attention.layer_norm.weight"
    )
    assert (
        rename_perceiver_key("blip2qformer.encoder.layer.11.intermediate_query.dense.bias") == "layers.11.mlp.fc1.bias"
    )
    assert (
        rename_perceiver_key("blip2qformer.encoder.layer.3.output_query.LayerNorm.bias")
        == "layers.3.mlp.layer_norm.bias"
    )
    for bad in (
        "encoder.unet.conv_in.weight",
        "neg_prompt_embeds",
        "sniffer.vision_model.post_layernorm.weight",
        "pos_proj.gamma",
    ):
        with pytest.raises(KeyError):
            rename_image_encoder_key(bad)
    for bad in (
        "blip2qformer.encoder.layer.0.intermediate.dense.weight",
        "blip2qformer.embeddings.word_embeddings.weight",
    ):
        with pytest.raises(KeyError):
            rename_perceiver_key(bad)


def test_mask_align_keys_round_trip():
    """Every key of a mask_align encoder is reachable from an original-style name (the §7.4 inventory)."""
    model = DeemImageEncoder(fixture_a_config(mask_align=True, mask_size=8))
    originals = [
        "feature_extractor.mask_linear.layers.0.weight",
        "feature_extractor.mask_linear.layers.0.bias",
        "feature_extractor.mask_linear.layers.1.weight",
        "feature_extractor.mask_linear.layers.1.bias",
        "feature_extractor.mask_linear.layers.2.weight",
        "feature_extractor.mask_linear.layers.2.bias",
        "feature_extractor.mask_feat_linear.weight",
        "feature_extractor.mask_feat_linear.bias",
    ]
    ours = {k for k in model.state_dict() if k.startswith("region_extractor.")}
    assert {rename_image_encoder_key(k) for k in originals} == ours
    assert model.region_extractor.mask_linear.layers[0].weight.shape == (48, 64)


# ------------------------------------------------------------------------------------------------- unit checks


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.manual_seed(0)
    return DeemImageEncoder(DeemConfig.tiny()).eval()


@pytest.mark.parametrize(
    "pixels, masks, error, words",
    [
        ("not a tensor", None, TypeError, ["torch.Tensor", "str"]),
        (torch.rand(3, 64, 64), None, ValueError, ["4-D", "(3, 64, 64)"]),
        (torch.rand(1, 1, 64, 64), None, ValueError, ["3 channels", "got 1"]),
        (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), None, TypeError, ["floating", "uint8"]),
        (torch.rand(1, 3, 16, 16), None, ValueError, ["at least 32x32", "configured for 64x64", "got 16x16"]),
        (torch.rand(1, 3, 64, 96), None, ValueError, ["square", "got 64x96"]),
        (torch.rand(2, 3, 64, 64), torch.ones(2, 64, 64), ValueError, ["image_masks", "(2, 1, 64, 64)", "(2, 64, 64)"]),
        (torch.rand(2, 3, 64, 64), torch.ones(1, 1, 64, 64), ValueError, ["image_masks", "(1, 1, 64, 64)"]),
        (torch.rand(2, 3, 64, 64), torch.ones(2, 1, 32, 32), ValueError, ["image_masks", "(2, 1, 32, 32)"]),
        (torch.rand(2, 3, 64, 64), [[1.0]], TypeError, ["image_masks", "list"]),
    ],
)
def test_bad_inputs(tiny_encoder, pixels, masks, error, words):
    with pytest.raises(error) as info:
        tiny_encoder(pixels, masks)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_outputs_and_other_square_sizes(tiny_encoder):
    config = tiny_encoder.config
    E, Q = config.image_embed_dim, config.num_image_tokens
    with torch.no_grad():
        out = tiny_encoder(torch.rand(2, 3, 64, 64))
        big = tiny_encoder(torch.rand(1, 3, 96, 96))
    assert out.llm_embeds.shape == (2, Q, config.text_config.hidden_size)
    assert out.perceiver_output.shape == (2, Q, config.perceiver_config.hidden_size)
    assert [tuple(f.shape) for f in out.multiscale_features] == [
        (2, E, 16, 16),
        (2, E, 8, 8),
        (2, E, 4, 4),
        (2, E, 2, 2),
    ]
    assert all(a is b for a, b in zip(out.region_features, out.multiscale_features))
    assert out.perceiver_input.shape == (2, 1 + 16, E)
    assert out.latent_mask is None
    assert tiny_encoder.diffusion_condition(out.perceiver_output).shape == (
        2,
        Q,
        config.diffusion_config.unet["cross_attention_dim"],
    )
    assert [tuple(f.shape[-2:]) for f in big.multiscale_features] == [(24, 24), (12, 12), (6, 6), (3, 3)]
    assert big.perceiver_input.shape == (1, 1 + 36, E)


def test_all_ones_mask_is_identity(tiny_encoder):
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        plain = tiny_encoder(pixels)
        ones = tiny_encoder(pixels, torch.ones(2, 1, 64, 64))
    torch.testing.assert_close(ones.llm_embeds, plain.llm_embeds, atol=0, rtol=0)
    for a, b in zip(ones.region_features, plain.multiscale_features):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert ones.latent_mask.all()


def test_region_masking_semantics():
    extractor = DeemRegionExtractor(DeemConfig.tiny().vision_config)
    mask = torch.zeros(1, 1, 64, 64)
    mask[:, :, :8, :] = 1  # top 8 pixel rows: half of the first row of 16-px cells
    x = torch.randn(1, 5, 4, 4)
    masked = extractor.mask_features(x, mask)
    # the partly covered first cell row counts as inside (bilinear resize, then > 0); the rest is zeroed
    torch.testing.assert_close(masked[:, :, 0], x[:, :, 0], atol=0, rtol=0)
    assert (masked[:, :, 1:] == 0).all()
    # a cell whose centre-adjacent pixels are untouched stays outside even with some overlap (7 of 16 rows)
    mask7 = torch.zeros(1, 1, 64, 64)
    mask7[:, :, :7, :] = 1
    assert (extractor.mask_features(x, mask7) == 0).all()
    # token layout [N, h*w, C] matches the map layout
    tokens = x.flatten(2).transpose(1, 2)
    torch.testing.assert_close(extractor.mask_features(tokens, mask), masked.flatten(2).transpose(1, 2), atol=0, rtol=0)
    # masked average over the inside cells; an empty mask gives zeros, not NaN
    torch.testing.assert_close(extractor.pooled(x, mask), x[:, :, 0].mean(-1))
    assert (extractor.pooled(x, torch.zeros(1, 1, 64, 64)) == 0).all()
    # bool / integer masks behave like float ones
    torch.testing.assert_close(extractor.mask_features(x, mask.bool()), masked, atol=0, rtol=0)


def test_mask_align_tokens_shape_and_order():
    torch.manual_seed(0)
    config = DeemConfig.tiny(
        vision_config=dict(DeemConfig.tiny().vision_config.to_dict(), mask_align=True, mask_size=8)
    )
    model = DeemImageEncoder(config).eval()
    pixels = torch.rand(2, 3, 64, 64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 10:40, 5:50] = 1
    mask[1] = 1
    E = config.image_embed_dim
    extractor = model.region_extractor
    with torch.no_grad():
        out = model(pixels, mask)
        default = model(pixels)
        region = out.perceiver_input[:, :5]
        expected = [extractor.mask_feat_linear(extractor.pooled(f, mask)) for f in out.multiscale_features]
        shape = torch.nn.functional.interpolate(mask, size=(8, 8), mode="bilinear", align_corners=False)
        expected.append(extractor.mask_linear(shape.flatten(1)))
        ref = DeemImageEncoder(DeemConfig.tiny())
        ref.load_state_dict(model.state_dict(), strict=False)
        ref_tokens = ref.eval()(pixels, mask).perceiver_input
    assert out.perceiver_input.shape == (2, 5 + 1 + 16, E)
    for i in range(5):
        torch.testing.assert_close(region[:, i], expected[i])
    # the image tokens after the 5 region tokens are the mask_align=False tokens (cls first)
    torch.testing.assert_close(out.perceiver_input[:, 5:], ref_tokens)
    # no mask = the whole image
    torch.testing.assert_close(default.perceiver_input[1], out.perceiver_input[1])
    assert out.llm_embeds.shape == (2, config.num_image_tokens, config.text_config.hidden_size)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_batched_perceiver_equals_per_sample(qk_norm):
    torch.manual_seed(0)
    config = DeemPerceiverConfig(
        num_queries=5,
        hidden_size=16,
        encoder_hidden_size=12,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        cross_attention_frequency=2,
        qk_normalization=qk_norm,
    )
    perceiver = DeemPerceiver(config).eval()
    states = torch.randn(3, 7, 12)
    mask = torch.ones(3, 7)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    with torch.no_grad():
        batched = perceiver(states, mask)
        single = torch.cat([perceiver(states[i : i + 1], mask[i : i + 1]) for i in range(3)])
        trimmed = perceiver(states[:1, :4])  # masking = dropping the masked keys
        no_mask = perceiver(states)
        ones = perceiver(states, torch.ones(3, 7, dtype=torch.long))
    assert batched.shape == (3, 5, 16)
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(batched[:1], trimmed, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(no_mask, ones, atol=1e-6, rtol=1e-6)
    assert [layer.cross_attention is not None for layer in perceiver.layers] == [True, False, True]
    has_norm = any(k.endswith("q_norm.weight") for k in perceiver.state_dict())
    assert has_norm == qk_norm
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        perceiver(states, mask[:, :5])


def test_init_matches_original_scheme():
    torch.manual_seed(0)
    model = DeemImageEncoder(DeemConfig.tiny())
    for proj in (model.proj_to_llm, model.proj_to_diffusion):
        assert proj.weight.std() < 3e-3 and (proj.bias == 0).all()
    perceiver = model.perceiver
    assert 0.01 < perceiver.queries.std() < 0.03
    assert (perceiver.layers[0].self_attention.query.bias == 0).all()
    assert (perceiver.layers[0].self_attention.q_norm.weight == 1).all()
    # reset_parameters restores the original scheme after the buffers were clobbered
    model.pos_embed.zero_()
    model.clip_std.zero_()
    model.reset_parameters()
    torch.testing.assert_close(model.clip_std.flatten(), torch.tensor(CLIP_STD))
    assert model.pos_embed[1:].abs().sum() > 0 and (model.pos_embed[0] == 0).all()
    gamma = model.backbone.trunk.stages[0].blocks[0].gamma
    torch.testing.assert_close(gamma, torch.full_like(gamma, model.vision_config.ls_init_value))


def test_train_mode_backward_checkpointing_and_bf16():
    torch.manual_seed(0)
    model = DeemImageEncoder(DeemConfig.tiny()).train()  # tiny: dropout and drop-path 0, so train mode is deterministic
    pixels = torch.rand(2, 3, 64, 64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 8:40, 8:40] = 1

    def backward():
        model.zero_grad()
        out = model(pixels, mask)
        loss = out.llm_embeds.sum() + model.diffusion_condition(out.perceiver_output).sum()
        (loss + sum(f.sum() for f in out.region_features)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    grads = backward()
    for name in (
        "backbone.trunk.stem.0.weight",
        "backbone.adapters.0.weight",
        "backbone.pooled_adapter.weight",
        "pos_proj.weight",
        "perceiver.queries",
        "proj_to_llm.weight",
        "proj_to_diffusion.weight",
    ):
        assert name in grads and grads[name].abs().sum() > 0, name
    # perceiver layers are GradientCheckpointingLayers (set up as PreTrainedModel.gradient_checkpointing_enable does)
    for layer in model.perceiver.layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(torch.utils.checkpoint.checkpoint, use_reentrant=True)
    checkpointed = backward()
    assert grads.keys() == checkpointed.keys()
    for name in grads:
        torch.testing.assert_close(checkpointed[name], grads[name], msg=name)
    with torch.no_grad():
        half = model.eval().to(torch.bfloat16)(pixels, mask)
    assert half.llm_embeds.dtype == torch.bfloat16 and torch.isfinite(half.llm_embeds.float()).all()
