"""Valid inputs and configurations are accepted: encoder resolutions the original runs (not only multiples of 32),
and randomly drawn tiny configurations (widths, head counts, cross-attention frequency and levels, image-token
counts, perceiver levels, mask alignment, decoder sizes) through a training step (all three losses, finite, with
gradients) and interleaved generation."""

import pytest
import torch
from conftest import tiny_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deem import DeemConfig, DeemForInterleavedGeneration

SIDES = [48, 40, 36, 50, 96]  # 48: the original's smallest maps are 1x1; none is a multiple of 32 but 96


def _vision(side, **extra):
    return (
        dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), embed_dim=32, image_size=side, grid_size=4, drop_path_rate=0.0)
        | extra
    )


def _train_step(model, batch):
    model.train()
    out = model(**batch, generator=torch.Generator().manual_seed(0))
    for name in ("loss", "loss_ntp", "loss_nip", "loss_csr"):
        value = getattr(out, name)
        assert value is not None and torch.isfinite(value), name
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    model.zero_grad(set_to_none=True)
    return out


def _draw(model, batch, n_new=3):
    """One row that is forced to draw: the prompt ends in <|startofimage|>."""
    cfg = model.config
    model.eval()
    ids = torch.tensor([[cfg.bos_token_id, 5, 6, cfg.soi_token_id]])
    out = model.generate(
        input_ids=ids,
        soi="draw",
        max_new_tokens=n_new,
        num_inference_steps=1,
        generator=[torch.Generator().manual_seed(1)],
        eos_token_id=-5,
    )
    assert len(out.images[0]) == 1 and torch.isfinite(out.images[0][0]).all()
    assert out.sequences.shape[1] == ids.shape[1] + cfg.num_image_tokens + n_new
    return out


@pytest.mark.parametrize("side", SIDES)
def test_encoder_resolutions_the_original_runs(side):
    torch.manual_seed(side)
    cfg = DeemConfig.tiny(vision_config=_vision(side))
    assert cfg.cross_attention_config.spatial_shapes == [side // 8, side // 16, side // 32]
    model = DeemForInterleavedGeneration(cfg)
    batch = tiny_batch(cfg, seed=side)
    assert batch["pixel_values"].shape[-1] == side
    with torch.no_grad():
        enc = model.image_encoder(batch["pixel_values"])
    assert [tuple(m.shape[-2:]) for m in enc.multiscale_features] == [(side // 2**k,) * 2 for k in (2, 3, 4, 5)]
    _train_step(model, batch)
    _draw(model, batch)


def test_a_model_reads_other_resolutions_than_its_own():
    """A 64-px model reads 48- and 96-px images (the original feeds 448-px images to 256-px-trained weights)."""
    torch.manual_seed(0)
    cfg = DeemConfig.tiny()
    model = DeemForInterleavedGeneration(cfg).eval()
    for side in (48, 96):
        batch = tiny_batch(DeemConfig.tiny(vision_config=_vision(side)), seed=1)
        with torch.no_grad():
            out = model(**batch, return_loss=False)
        assert torch.isfinite(out.logits).all()


def test_too_small_or_non_square_images_are_refused_clearly():
    torch.manual_seed(0)
    model = DeemForInterleavedGeneration(DeemConfig.tiny()).eval()
    for shape in ((1, 3, 16, 16), (1, 3, 31, 31), (1, 3, 64, 48)):
        with pytest.raises(ValueError, match=r"square images of at least 32x32 px .* got \d+x\d+"):
            model.image_encoder(torch.rand(shape))


@st.composite
def tiny_configs(draw):
    heads_text = draw(st.sampled_from([2, 4]))
    hidden = heads_text * draw(st.sampled_from([8, 12]))
    xattn_heads = draw(st.sampled_from([h for h in (2, 4, 8) if hidden % h == 0 and 32 % h == 0]))
    layers = draw(st.integers(1, 4))
    levels = draw(st.sampled_from([(1, 2, 3), (2, 3), (0, 1, 2, 3), (3,), (1, 3)]))
    q = draw(st.integers(1, 6))
    side = draw(st.sampled_from([48, 64, 80]))
    dec_q = draw(st.integers(1, 5))
    perceiver_width = draw(st.sampled_from([16, 32]))
    mask_align = draw(st.booleans())
    text = dict(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads_text,
        num_key_value_heads=draw(st.sampled_from([k for k in (1, 2, heads_text) if heads_text % k == 0])),
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=121,
        tie_word_embeddings=False,
    )
    return DeemConfig.tiny(
        vision_config=_vision(side, perceiver_level=draw(st.integers(0, 3)), mask_align=mask_align, mask_size=16),
        perceiver_config=dict(
            num_queries=q,
            hidden_size=perceiver_width,
            encoder_hidden_size=32,
            num_hidden_layers=draw(st.integers(1, 2)),
            num_attention_heads=4,
            intermediate_size=2 * perceiver_width,
            cross_attention_frequency=draw(st.integers(1, 2)),
            qk_normalization=draw(st.booleans()),
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        text_config=text,
        cross_attention_config=dict(
            frequency=draw(st.integers(1, layers)),
            num_heads=xattn_heads,
            num_points=draw(st.integers(1, 3)),
            feature_levels=levels,
            base_spatial_shape=4,
            max_num_images=8,
        ),
        decoder_perceiver_config=dict(
            num_queries=dec_q,
            hidden_size=32,
            encoder_hidden_size=hidden,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            cross_attention_frequency=1,
            qk_normalization=False,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        num_image_tokens=q,
    )


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(tiny_configs())
def test_random_tiny_configurations_train_and_generate(cfg):
    torch.manual_seed(0)
    model = DeemForInterleavedGeneration(cfg)
    batch = tiny_batch(cfg, seed=3)
    side = cfg.vision_config.image_size
    masks = torch.zeros(3, 1, side, side)
    masks[:, :, side // 4 :, : side // 2] = 1  # region masks (CSR inside the region, mask-aligned tokens)
    batch["image_masks"] = masks
    _train_step(model, batch)
    _draw(model, batch, n_new=2)
    # non-square drawn images from the pipeline (the decoder's own size is square)
    pipe = model.image_pipeline()
    pipe.set_progress_bar_config(disable=True)
    cond = torch.randn(1, cfg.decoder_perceiver_config.num_queries, 32)
    image = pipe(prompt_embeds=cond, height=32, width=48, num_inference_steps=1, output_type="pt").images
    assert image.shape == (1, 3, 32, 48) and torch.isfinite(image).all()
