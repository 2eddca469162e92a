"""The model on tiny configs: losses, gradients, visibility, stages, bad input, dtype, checkpointing."""

import time

import pytest
import torch
from conftest import tiny_batch, tiny_config, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batch(model):
    return tiny_batch(model.config)


def count_unet_passes(model):
    """Count UNet passes by hooking conv_in (run exactly once per pass)."""
    calls = []
    handle = model.unet.conv_in.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls, handle


def test_train_mode_losses_are_finite_and_combined(model, batch):
    model.train()
    try:
        out = model(**batch, generator=torch.Generator().manual_seed(0))
    finally:
        model.eval()
    cfg = model.config
    for name in ("loss_ntp", "loss_nip", "loss_csr"):
        value = getattr(out, name)
        assert value is not None and value.dim() == 0 and torch.isfinite(value), name
        assert value.item() > 0, name
    expected = (
        cfg.loss_ntp_weight * out.loss_ntp + cfg.loss_nip_weight * out.loss_nip + cfg.loss_csr_weight * out.loss_csr
    )
    torch.testing.assert_close(out.loss, expected)
    assert out.logits.shape == (*batch["input_ids"].shape, cfg.vocab_size)
    assert out.image_embeds.shape == (3, cfg.num_image_tokens, cfg.text_config.hidden_size)


def test_csr_alone_reaches_the_image_encoder(model, batch):
    model.train()
    model.zero_grad()
    try:
        out = model(**batch, loss_ntp_weight=0.0, loss_nip_weight=0.0, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
    finally:
        model.eval()
    assert out.loss_ntp is None and out.loss_nip is None and out.loss_csr is not None
    trunk_grads = [p.grad for p in model.image_encoder.backbone.trunk.parameters() if p.grad is not None]
    assert trunk_grads and any(g.abs().sum() > 0 for g in trunk_grads)
    assert model.image_encoder.perceiver.queries.grad.abs().sum() > 0
    # nothing of the text side received a gradient from CSR
    assert model.lm_head.new_tokens.weight.grad is None or model.lm_head.new_tokens.weight.grad.abs().sum() == 0
    model.zero_grad()


def test_csr_and_nip_share_one_unet_pass_and_a_zero_weight_skips_it(model, batch):
    """CSR (every image) and NIP (images with a context) run as one UNet call over both branches' images; a zero
    weight drops that branch's images from it; both zero: no call."""
    from deem import DiffusionDraws

    n, lat = batch["pixel_values"].shape[0], model.config.diffusion_config.latent_size
    g = torch.Generator().manual_seed(7)

    def draws():
        return DiffusionDraws(
            latent_noise=torch.randn(n, 4, lat, lat, generator=g),
            noise=torch.randn(n, 4, lat, lat, generator=g),
            timesteps=torch.randint(0, 1000, (n,), generator=g),
            null_condition=torch.tensor([False, True, False][:n]),
        )

    csr, nip = draws(), draws()
    sizes, outs = {}, {}
    for name, weights in (
        ("both", {}),
        ("nip", {"loss_csr_weight": 0.0}),
        ("csr", {"loss_nip_weight": 0.0}),
        ("none", {"loss_csr_weight": 0.0, "loss_nip_weight": 0.0}),
    ):
        calls, handle = count_unet_passes(model)
        try:
            model.train()
            with torch.no_grad():
                outs[name] = model(**batch, **weights, csr_draws=csr, nip_draws=nip)
        finally:
            handle.remove()
            model.eval()
        sizes[name] = calls
        assert (outs[name].loss_csr is None) == ("loss_csr_weight" in weights)
        assert (outs[name].loss_nip is None) == ("loss_nip_weight" in weights)
    assert sizes["csr"] == [n]
    assert len(sizes["nip"]) == 1 and 0 < sizes["nip"][0] < n  # the batch has an image with no context
    assert sizes["both"] == [n + sizes["nip"][0]]
    assert sizes["none"] == []
    # batched, each branch's loss is what it is alone
    torch.testing.assert_close(outs["both"].loss_csr, outs["csr"].loss_csr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs["both"].loss_nip, outs["nip"].loss_nip, rtol=1e-5, atol=1e-6)


def test_nip_only_for_images_with_context(model, batch):
    """Row 1's image follows <s> directly: only the two images of row 0 are denoised for NIP, and row 0's
    first image has context [<s> t t <soi>] (4 > 2), so the NIP UNet pass has batch 2."""
    calls, handle = count_unet_passes(model)
    try:
        with torch.no_grad():
            model(**batch, loss_csr_weight=0.0, return_loss=True, generator=torch.Generator().manual_seed(3))
    finally:
        handle.remove()
    assert calls == [2]


def test_given_draws_make_losses_deterministic(model, batch):
    from deem import DiffusionDraws

    n, lat = 3, model.config.diffusion_config.latent_size
    g = torch.Generator().manual_seed(5)
    draws = lambda: DiffusionDraws(  # noqa: E731
        latent_noise=torch.randn(n, 4, lat, lat, generator=g),
        noise=torch.randn(n, 4, lat, lat, generator=g),
        timesteps=torch.randint(0, 1000, (n,), generator=g),
        null_condition=torch.zeros(n, dtype=torch.bool),
    )
    csr, nip = draws(), draws()
    with torch.no_grad():
        a = model(**batch, return_loss=True, csr_draws=csr, nip_draws=nip, generator=torch.Generator().manual_seed(0))
        b = model(**batch, return_loss=True, csr_draws=csr, nip_draws=nip, generator=torch.Generator().manual_seed(99))
        nip_null = DiffusionDraws(**{**nip.__dict__, "null_condition": torch.ones(n, dtype=torch.bool)})
        c = model(**batch, return_loss=True, csr_draws=csr, nip_draws=nip_null)
    assert a.loss_csr == b.loss_csr and a.loss_nip == b.loss_nip
    assert c.loss_csr == a.loss_csr and c.loss_nip != a.loss_nip


def test_csr_timestep_remap(model):
    t = torch.tensor([0, 37, 250, 500, 999])
    assert model.csr_timesteps(t).tolist() == [200, 222, 350, 500, 799]


def test_cross_attention_visibility_is_exact(model):
    """Perturbing an image leaves every token before its first placeholder, and every token of an earlier
    document, bit-identical; tokens after it change."""
    cfg = model.config
    q, soi, img, bos = cfg.num_image_tokens, cfg.soi_token_id, cfg.image_token_id, cfg.bos_token_id
    # two packed documents in one row: doc A has image 0, doc B has image 1
    row = [bos, 5, 6, soi] + [img] * q + [7, 8, bos, 9, soi] + [img] * q + [10, 11]
    ids = torch.tensor([row])
    pixels = torch.rand(
        2, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        base = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True, return_loss=False)
        changed = pixels.clone()
        changed[1] = torch.rand_like(changed[1])
        other = model(input_ids=ids, pixel_values=changed, output_hidden_states=True, return_loss=False)
    first_placeholder_img1 = row.index(img, row.index(bos, 1))
    for h0, h1 in zip(base.hidden_states, other.hidden_states):
        assert torch.equal(h0[:, :first_placeholder_img1], h1[:, :first_placeholder_img1])
    assert not torch.allclose(base.hidden_states[-1][:, -1], other.hidden_states[-1][:, -1])
    # perturbing image 0 leaves everything before its first placeholder unchanged as well
    changed = pixels.clone()
    changed[0] = torch.rand_like(changed[0])
    with torch.no_grad():
        third = model(input_ids=ids, pixel_values=changed, output_hidden_states=True, return_loss=False)
    for h0, h1 in zip(base.hidden_states, third.hidden_states):
        assert torch.equal(h0[:, :4], h1[:, :4])
    doc_b = row.index(bos, 1)
    from deem.modeling.modeling_deem import cross_attention_visibility as vis

    starts = torch.tensor([[4, row.index(img, doc_b)]])
    mask = vis(ids, starts, bos)[0]
    assert not mask[:4].any() and mask[4:doc_b, 0].all() and not mask[doc_b:, 0].any()
    assert not mask[: starts[0, 1], 1].any() and mask[starts[0, 1] :, 1].all()


def test_default_labels_follow_the_original_rules(model, batch):
    from deem.modeling.modeling_deem import default_labels

    cfg = model.config
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = default_labels(ids, mask, cfg)
    assert (labels[ids == cfg.image_token_id] == -100).all()
    assert (labels[ids == cfg.bos_token_id] == -100).all()
    assert (labels[mask == 0] == -100).all()
    # row 0: soi after text is supervised; row 1: soi right after <s> is not
    soi0 = (ids[0] == cfg.soi_token_id).nonzero()[0, 0]
    soi1 = (ids[1] == cfg.soi_token_id).nonzero()[0, 0]
    assert labels[0, soi0] == cfg.soi_token_id and labels[1, soi1] == -100
    text = (ids != cfg.image_token_id) & (ids != cfg.bos_token_id) & (mask == 1) & (ids != cfg.soi_token_id)
    assert torch.equal(labels[text], ids[text])


def test_labels_given_equal_derived(model, batch):
    from deem.modeling.modeling_deem import default_labels

    with torch.no_grad():
        a = model(**batch, loss_nip_weight=0.0, loss_csr_weight=0.0, return_loss=True)
        b = model(
            **batch,
            labels=default_labels(batch["input_ids"], batch["attention_mask"], model.config),
            loss_nip_weight=0.0,
            loss_csr_weight=0.0,
        )
    assert a.loss_ntp == b.loss_ntp and a.loss == a.loss_ntp


def test_left_and_right_padding_agree(model):
    cfg = model.config
    right = tiny_batch(cfg, seed=3, pad_side="right")
    left = tiny_batch(cfg, seed=3, pad_side="left")
    with torch.no_grad():
        r = model(**right, return_loss=False).logits
        lft = model(**left, return_loss=False).logits
    n_pad = int((right["attention_mask"][1] == 0).sum())
    torch.testing.assert_close(r[0], lft[0])
    torch.testing.assert_close(r[1, : r.shape[1] - n_pad], lft[1, n_pad:], atol=1e-5, rtol=1e-5)


def test_stage_presets_trainable_counts():
    model = tiny_model()
    counts = {}
    for stage in (1, 2, 3):
        model.set_training_stage(stage)
        table = {r["component"]: r for r in model.parameter_table()}
        assert table == {r["component"]: r for r in model.parameter_table(stage)}
        counts[stage] = table
    t1, t2, t3 = counts[1], counts[2], counts[3]
    cfg = model.config
    h, v = cfg.text_config.hidden_size, cfg.vocab_size
    assert t1["text head (base)"]["total"] == h * v + v and t1["text head (base)"]["trainable"] == 0
    assert t1["text head (new tokens)"]["trainable"] == (v - cfg.original_vocab_size) * (h + 1)
    for stage_table in (t1, t2, t3):
        assert stage_table["UNet"]["trainable"] == 0 and stage_table["VAE"]["trainable"] == 0
    assert t1["LLM"]["trainable"] == 0 and t2["LLM"]["trainable"] == t2["LLM"]["total"] > 0
    assert (
        t1["image encoder"]["trainable"] == t1["image encoder"]["total"] > 0 and t2["image encoder"]["trainable"] == 0
    )
    assert t1["UNet side network"]["trainable"] > 0 and t3["UNet side network"]["trainable"] == 0
    assert t1["cross-attention"]["trainable"] == t1["cross-attention"]["total"] > 0
    # frozen exactly as set on the parameters, and the totals add up
    assert t1["total"]["trainable"] == sum(
        p.numel() for p in model.set_training_stage(1).parameters() if p.requires_grad
    )
    assert t1["total"]["total"] == sum(p.numel() for p in model.parameters())
    # hand counts from the config
    text, xa = cfg.text_config, cfg.cross_attention_config
    e, i = cfg.image_embed_dim, text.intermediate_size
    layer = 4 * h * h + 3 * h * i + 2 * h
    assert t1["LLM"]["total"] == v * h + text.num_hidden_layers * layer + h
    levels, heads, points = len(xa.feature_levels), xa.num_heads, xa.num_points
    block = (
        h
        + e
        + (h + 1) * heads * points * 2
        + (h + 1) * h
        + (h + 1) * heads * levels * (points + 1)
        + (e + 1) * e
        + (e + 1) * h
        + xa.max_num_images * h
        + 1
    )
    n_blocks = len(range(0, text.num_hidden_layers, xa.frequency))
    assert t1["cross-attention"]["total"] == n_blocks * block
    assert t1["soi embedding"]["trainable"] == h and t3["soi embedding"]["trainable"] == h
    assert (
        t1["image decoder"]["total"]
        == h * h + h + cfg.decoder_perceiver_config.num_queries * cfg.diffusion_config.unet["cross_attention_dim"]
    )
    assert t3["image decoder"]["trainable"] == 0 and t3["decoder perceiver"]["trainable"] == 0
    frozen_1 = t1["LLM"]["total"] + t1["text head (base)"]["total"] + t1["UNet"]["total"] + t1["VAE"]["total"]
    assert t1["total"]["trainable"] == t1["total"]["total"] - frozen_1
    frozen_2 = t1["image encoder"]["total"] + t1["text head (base)"]["total"] + t1["UNet"]["total"] + t1["VAE"]["total"]
    assert t2["total"]["trainable"] == t1["total"]["total"] - frozen_2
    unused_3 = t1["decoder perceiver"]["total"] + t1["image decoder"]["total"] + t1["UNet side network"]["total"]
    assert t3["total"]["trainable"] == t2["total"]["trainable"] - unused_3
    # regression guard: the tiny preset's exact counts (consistent with the hand counts above)
    assert {s: counts[s]["total"]["trainable"] for s in (1, 2, 3)} == {1: 112920, 2: 132504, 3: 94984}


def test_bad_inputs_name_the_problem(model, batch):
    cfg = model.config
    bad = dict(batch, pixel_values=batch["pixel_values"][:2], pixel_values_decoder=batch["pixel_values_decoder"][:2])
    with pytest.raises(ValueError, match="3 image.*2 image"):
        model(**bad)
    with pytest.raises(ValueError, match="num_images"):
        model(**dict(batch, num_images=torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="labels shape"):
        model(**batch, labels=batch["input_ids"][:, :-1])
    ids = batch["input_ids"].clone()
    ids[0, 4] = 7  # break a placeholder run
    with pytest.raises(ValueError, match="placeholder run"):
        model(**dict(batch, input_ids=ids))
    too_long = torch.ones(1, cfg.text_config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the model's maximum"):
        model(input_ids=too_long)
    with pytest.raises(ValueError, match="4-D|rank|dim"):
        model(**dict(batch, pixel_values=batch["pixel_values"][0]))
    with pytest.raises(ValueError, match="channel"):
        model(**dict(batch, pixel_values=batch["pixel_values"][:, :1]))
    with pytest.raises(TypeError, match="float|dtype"):
        model(**dict(batch, pixel_values=(batch["pixel_values"] * 255).to(torch.uint8)))
    with pytest.raises(ValueError, match="mask"):
        model(**batch, image_masks=torch.ones(3, 1, 8, 8))
    with pytest.raises(ValueError, match="pixel_values_decoder"):
        model(**dict(batch, pixel_values_decoder=batch["pixel_values_decoder"][..., :16, :16]))


def test_text_only_training_without_diffusion_weights():
    model = tiny_model(use_diffusion=False).train()
    batch = tiny_batch(model.config)
    with pytest.raises(ValueError, match="diffusion"):
        model(**batch)
    out = model(**batch, loss_nip_weight=0.0, loss_csr_weight=0.0)
    assert out.loss_nip is None and out.loss_csr is None and torch.isfinite(out.loss)
    assert model.unet is None and not any(k.startswith(("unet", "vae")) for k in model.state_dict())


def test_bfloat16_forward(batch):
    model = tiny_model().to(torch.bfloat16)
    assert model.vae.dtype == torch.bfloat16 or model.vae.dtype == torch.float32
    bf = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch.items()}
    with torch.no_grad():
        out = model(**bf, return_loss=True, generator=torch.Generator().manual_seed(0))
    assert out.logits.dtype == torch.bfloat16
    assert all(torch.isfinite(getattr(out, n)) for n in ("loss_ntp", "loss_nip", "loss_csr"))


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=4).set_training_stage(1).train()
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.language_model.layers)
            assert model.unet.down_blocks[0].gradient_checkpointing
        out = model(**batch, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_full_7b_config_builds_on_meta_quickly():
    from deem import DeemConfig, DeemForInterleavedGeneration

    start = time.perf_counter()
    with torch.device("meta"):
        model = DeemForInterleavedGeneration(DeemConfig())
    elapsed = time.perf_counter() - start
    assert elapsed < 60, elapsed
    table = {r["component"]: r for r in model.parameter_table(1)}
    assert 6.6e9 < table["LLM"]["total"] < 6.8e9  # Vicuna-7B body with the 32006-row embedding
    assert 8.6e8 < table["UNet"]["total"] < 8.7e8  # SD-2.1 UNet 865.9M
    assert 8.3e7 < table["VAE"]["total"] < 8.4e7
    assert 8.7e7 < table["image encoder"]["total"] < 8.9e7  # ConvNeXt-B trunk
    assert len([layer for layer in model.language_model.layers if layer.cross_attn is not None]) == 8
    assert 4.8e8 < table["total"]["trainable"] < 5.0e8  # paper: 494.9M trainable in stage 1


def test_fresh_model_has_the_original_init():
    """§2.6, §2.7, §2.11: gates 0, new-token logits -5 (bias -100 + 95), sampling-offset weights 0, LLM
    weights normal(initializer_range), soi vector 0."""
    from deem import DeemForInterleavedGeneration

    torch.manual_seed(0)
    config = tiny_config()
    model = DeemForInterleavedGeneration(config)
    head = model.lm_head
    v0 = config.original_vocab_size
    assert torch.all(head.base.bias[v0:] == -100) and torch.all(head.base.bias[:v0] == 0)
    assert torch.all(head.base.weight[v0:] == 0)
    assert torch.all(head.new_tokens.weight == 0) and torch.all(head.new_tokens.bias == 95)
    std = config.text_config.initializer_range
    assert abs(model.language_model.embed_tokens.weight.std().item() - std) < 0.2 * std
    assert abs(model.language_model.layers[1].self_attn.q_proj.weight.std().item() - std) < 0.2 * std
    assert torch.all(model.soi_embedding == 0)
    for layer in model.language_model.layers:
        if layer.cross_attn is not None:
            assert layer.cross_attn.gate.item() == 0
            assert torch.all(layer.cross_attn.attn.sampling_offsets.weight == 0)
            assert (
                layer.cross_attn.attn.sampling_offsets.bias.abs().max()
                <= config.cross_attention_config.offset_init_magnitude
            )
    ids = torch.tensor([[config.bos_token_id, 5, 6, 7]])
    with torch.no_grad():
        logits = model(input_ids=ids, return_loss=False).logits
    torch.testing.assert_close(logits[..., v0:], torch.full_like(logits[..., v0:], -5.0))


def test_denoise_joins_branches_of_different_condition_lengths(model):
    """Branches whose conditions differ in length (CSR's image tokens, NIP's decoder queries) share one UNet call,
    the shorter condition padded and masked, with the results and condition gradients each has alone."""
    from deem.modeling.image_decoder_deem import DenoisingBranch

    dec = model.image_decoder
    cfg = model.config
    lat, dim = cfg.diffusion_config.latent_size, model.unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        pixels = torch.rand(3, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g)
        maps = model.model.image_encoder(pixels).region_features

    def branch(rows, q):
        n = len(rows)
        return DenoisingBranch(
            torch.randn(n, 4, lat, lat, generator=g),
            torch.tensor([10, 500, 900][:n]),
            torch.randn(n, 4, lat, lat, generator=g),
            torch.randn(n, q, dim, generator=g).requires_grad_(True),
            [m[rows, None] for m in maps],
            torch.ones(n, 1),
        )

    a, b = branch([0, 1], 5), branch([2], 7)
    calls, handle = count_unet_passes(model)
    try:
        together = dec.denoise([a, b])
        grads_together = torch.autograd.grad(sum(m.sum() for m in together), [a.condition, b.condition])
        alone = [dec.denoise([a])[0], dec.denoise([b])[0]]
        grads_alone = torch.autograd.grad(sum(m.sum() for m in alone), [a.condition, b.condition])
    finally:
        handle.remove()
    assert calls == [3, 2, 1]
    for x, y in zip(together, alone):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    for x, y in zip(grads_together, grads_alone):
        assert x.abs().sum() > 0
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
