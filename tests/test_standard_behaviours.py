"""What every transformers model does, checked on DEEM (in the style of transformers' ModelTesterMixin /
GenerationTesterMixin): the base model + heads split, config flags, return_dict=False, attentions, hidden states,
resizing, attention implementations per sub-model, image features, checkpointing, sub-configs, compile/export."""

import pytest
import torch
from conftest import tiny_batch, tiny_config, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=31)


@pytest.fixture(scope="module")
def batch(model):
    b = tiny_batch(model.config, seed=2, pad_side="left")
    b.pop("pixel_values_decoder")
    return b


def test_base_model_and_heads(model):
    from deem import DeemModel
    from deem.modeling.image_decoder_deem import DeemImageDecoder

    assert (
        type(model).base_model_prefix == "model"
        and isinstance(model.model, DeemModel)
        and model.base_model is model.model
    )
    assert isinstance(model.image_decoder, DeemImageDecoder)
    assert model.get_decoder() is model.model.language_model and model.get_output_embeddings() is model.lm_head.base
    assert model.get_input_embeddings() is model.model.language_model.embed_tokens
    # the shortcuts point at the parts
    assert model.unet is model.image_decoder.unet and model.image_encoder is model.model.image_encoder
    keys = model.state_dict().keys()
    assert all(k.startswith(("model.", "lm_head.", "image_decoder.")) for k in keys)


def test_base_model_alone_gives_the_hidden_states(model, batch, tmp_path):
    from deem import DeemModel

    with torch.no_grad():
        full = model(**batch, return_loss=False)
        base = model.model(**batch)
    torch.testing.assert_close(base.last_hidden_state, full.last_hidden_state, atol=0, rtol=0)
    model.save_pretrained(tmp_path)
    alone, info = DeemModel.from_pretrained(tmp_path, output_loading_info=True)  # base_model_prefix strips "model."
    alone.eval()
    assert not info["missing_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        torch.testing.assert_close(alone(**batch).last_hidden_state, base.last_hidden_state, atol=1e-6, rtol=1e-6)


def test_return_dict_false_and_config_flags(model, batch):
    with torch.no_grad():
        as_dict = model(**batch, return_loss=False)
        as_tuple = model(**batch, return_loss=False, return_dict=False)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], as_dict.logits)
        model.config.output_hidden_states = True
        model.config.return_dict = False
        try:
            flagged = model(**batch, return_loss=False)
        finally:
            model.config.output_hidden_states = False
            model.config.return_dict = True
    assert isinstance(flagged, tuple)
    hidden = [t for t in flagged if isinstance(t, tuple) and len(t) == model.config.text_config.num_hidden_layers + 1]
    assert hidden, "config.output_hidden_states gave no hidden states"


def test_use_cache_follows_the_config(model, batch):
    from deem.modeling.compat import CACHE_FIELD

    with torch.no_grad():
        assert getattr(model(**batch, return_loss=False), CACHE_FIELD) is not None  # eval: the config's use_cache
        model.config.text_config.use_cache = False
        try:
            assert getattr(model(**batch, return_loss=False), CACHE_FIELD) is None
        finally:
            model.config.text_config.use_cache = True


def test_output_attentions_needs_eager_and_returns_per_layer_weights(batch):
    cfg = tiny_config()
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    from deem import DeemForInterleavedGeneration

    eager = DeemForInterleavedGeneration(cfg).eval()
    with torch.no_grad():
        out = eager(**batch, output_attentions=True, return_loss=False)
    layers = cfg.text_config.num_hidden_layers
    heads = cfg.text_config.num_attention_heads
    length = batch["input_ids"].shape[1]
    assert len(out.attentions) == layers and out.attentions[0].shape == (2, heads, length, length)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, heads, length))  # rows are distributions
    # causal: nothing attends to the future (row 0 has no padding)
    assert torch.all(out.attentions[1][0].triu(1) == 0)
    # the gated cross-attention's sampling weights, one entry per cross-attention layer
    from deem.modeling.modeling_deem import _image_runs
    from deem.modeling.sequence_deem import _image_start_table, cross_attention_visibility

    xcfg = cfg.cross_attention_config
    n_cross = len([i for i in range(layers) if i % xcfg.frequency == 0])
    runs = _image_runs(batch["input_ids"], cfg.image_token_id)
    n_img = int(batch["num_images"].max())
    starts = _image_start_table(runs, 2, n_img, "cpu")
    visible = cross_attention_visibility(batch["input_ids"], starts, cfg.bos_token_id)  # [B, L, N]
    assert out.cross_attentions is not None and len(out.cross_attentions) == n_cross
    for weights in out.cross_attentions:
        assert weights.shape == (2, xcfg.num_heads, length, n_img, len(xcfg.feature_levels), xcfg.num_points)
        assert bool((weights >= 0).all()) and bool((weights.sum((-3, -2, -1)) <= 1 + 1e-5).all())
        hidden = ~visible[:, None, :, :, None, None].expand_as(weights)
        assert float(weights[hidden].abs().max()) < 1e-6  # an image a token may not see gets no weight
        assert float(weights[~hidden].sum()) > 0
    with torch.no_grad():
        assert eager(**batch, return_loss=False).cross_attentions is None
    gen = eager.generate(
        **batch,
        max_new_tokens=2,
        soi="suppress",
        output_attentions=True,
        return_dict_in_generate=True,
        pad_token_id=cfg.pad_token_id,
    )
    assert len(gen.attentions) == 2 and len(gen.attentions[0]) == layers


def test_output_attentions_with_sdpa_is_refused_clearly(model, batch):
    if model.config.text_config._attn_implementation == "eager":
        pytest.skip("this tiny model runs eager attention")
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        model(**batch, output_attentions=True)


def test_attn_implementation_per_sub_model(tmp_path, model):
    from deem import DeemForInterleavedGeneration

    model.save_pretrained(tmp_path)
    mixed = DeemForInterleavedGeneration.from_pretrained(
        tmp_path, attn_implementation={"text_config": "eager", "": "sdpa"}
    )
    assert mixed.config.text_config._attn_implementation == "eager"
    assert mixed.config._attn_implementation == "sdpa"
    assert mixed.model.language_model.layers[0].self_attn.config._attn_implementation == "eager"


def test_resize_token_embeddings_keeps_the_deem_head(tmp_path):
    from deem import DeemForInterleavedGeneration

    model = tiny_model(seed=3).set_training_stage(1)
    cfg = model.config
    old_vocab = cfg.text_config.vocab_size
    ids = torch.tensor([[cfg.bos_token_id, 5, 6, 7]])
    with torch.no_grad():
        before = model(input_ids=ids, return_loss=False).logits
    model.resize_token_embeddings(old_vocab + 3)
    assert (
        cfg.text_config.vocab_size == old_vocab + 3
        and model.lm_head.new_tokens.out_features == old_vocab + 3 - cfg.original_vocab_size
    )
    assert not model.lm_head.base.weight.requires_grad and model.lm_head.new_tokens.weight.requires_grad  # split kept
    with torch.no_grad():
        after = model(input_ids=ids, return_loss=False).logits
    torch.testing.assert_close(after[..., :old_vocab], before, atol=1e-6, rtol=1e-6)  # old ids unchanged
    torch.testing.assert_close(
        after[..., old_vocab:], torch.full_like(after[..., old_vocab:], cfg.new_token_logit_init), atol=1e-4, rtol=0
    )
    assert after[0, -1, cfg.soi_token_id] > -50  # <|startofimage|> can still be generated
    model.save_pretrained(tmp_path)
    again = DeemForInterleavedGeneration.from_pretrained(tmp_path, strict=True)
    assert again.config.text_config.vocab_size == old_vocab + 3


def test_get_image_features_follows_the_transformers_5_convention(model, batch):
    with torch.no_grad():
        out = model.get_image_features(batch["pixel_values"], output_hidden_states=True)
        as_tuple = model.get_image_features(batch["pixel_values"], return_dict=False)
    n, q, h = batch["pixel_values"].shape[0], model.config.num_image_tokens, model.config.text_config.hidden_size
    assert out.last_hidden_state.shape == (n, q, h) and len(out.hidden_states) == 4
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)
    with torch.no_grad():
        full = model(**batch, return_loss=False)
    torch.testing.assert_close(full.image_embeds, out.last_hidden_state)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_checkpointing_same_gradients(reentrant, stage):
    batch = tiny_batch(tiny_config(), seed=4)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=4).set_training_stage(stage).train()
        if checkpointing:
            kwargs = {"use_reentrant": reentrant}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            assert all(stage_.grad_checkpointing for stage_ in model.image_encoder.backbone.trunk.stages)
            assert all(layer.gradient_checkpointing for layer in model.language_model.layers)
        out = model(**batch, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_each_sub_config_saves_and_loads_on_its_own(tmp_path):
    from deem import DeemConfig

    config = DeemConfig.tiny()
    config.save_pretrained(tmp_path)
    for key, cls in config.sub_configs.items():
        sub = getattr(config, key)
        if sub is None or not hasattr(cls, "from_pretrained") or getattr(cls, "base_config_key", None) != key:
            continue
        loaded = cls.from_pretrained(tmp_path)
        assert loaded.to_diff_dict() == sub.to_diff_dict() or loaded.to_dict() == sub.to_dict(), key
    from deem.modeling.configuration_deem import DeemDecoderPerceiverConfig

    assert (
        DeemDecoderPerceiverConfig.from_pretrained(tmp_path).hidden_size == config.decoder_perceiver_config.hidden_size
    )
    seven_b = DeemConfig()
    seven_b.save_pretrained(tmp_path / "7b")
    assert DeemDecoderPerceiverConfig.from_pretrained(tmp_path / "7b").hidden_size == 1024


def test_auto_model_for_image_text_to_text(tmp_path, model):
    import json

    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert (
        auto_map["AutoModelForImageTextToText"] == auto_map["AutoModel"] == "modeling_deem.DeemForInterleavedGeneration"
    )


def test_generate_from_inputs_embeds_text_only(model):
    cfg = model.config
    ids = torch.tensor([[cfg.bos_token_id, 5, 6, 7]])
    embeds = model.get_input_embeddings()(ids)
    common = dict(
        max_new_tokens=4, do_sample=False, soi="suppress", pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id
    )
    from_ids = model.generate(input_ids=ids, **common)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), **common)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1] :])
    with pytest.raises(ValueError, match="text only"):
        model.generate(inputs_embeds=embeds, soi="draw")


def test_right_padding_gives_each_row_what_it_gives_alone(model):
    from test_generation import ForceSoiAt
    from transformers import LogitsProcessorList

    cfg = model.config
    g = torch.Generator().manual_seed(8)
    rows = [
        [cfg.bos_token_id] + torch.randint(3, cfg.original_vocab_size - 2, (n,), generator=g).tolist() for n in (5, 2)
    ]
    width = max(map(len, rows))
    ids = torch.tensor([r + [cfg.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    common = dict(max_new_tokens=4, do_sample=False, pad_token_id=cfg.pad_token_id, eos_token_id=-5)
    for soi in ("suppress", "draw"):
        extra = {"num_inference_steps": 2, "max_new_images": 1} if soi == "draw" else {}
        plan = [(0, 1), (1, 2)]
        force = (
            LogitsProcessorList([ForceSoiAt(cfg.soi_token_id, width, plan, (cfg.pad_token_id, cfg.image_token_id))])
            if soi == "draw"
            else None
        )
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            soi=soi,
            logits_processor=force,
            generator=[torch.Generator().manual_seed(b) for b in range(2)] if soi == "draw" else None,
            **common,
            **extra,
        )
        seqs = out.sequences if soi == "draw" else out
        out_mask = out.attention_mask if soi == "draw" else None
        for b, row in enumerate(rows):
            force_b = (
                LogitsProcessorList(
                    [ForceSoiAt(cfg.soi_token_id, len(row), [plan[b]], (cfg.pad_token_id, cfg.image_token_id))]
                )
                if soi == "draw"
                else None
            )
            alone = model.generate(
                input_ids=torch.tensor([row]),
                soi=soi,
                logits_processor=force_b,
                generator=[torch.Generator().manual_seed(b)] if soi == "draw" else None,
                **common,
                **extra,
            )
            alone_seq = alone.sequences[0] if soi == "draw" else alone[0]
            got = seqs[b][out_mask[b].bool()] if out_mask is not None else seqs[b][seqs[b] != cfg.pad_token_id]
            assert got.tolist() == alone_seq.tolist(), (soi, b)


def test_text_path_compiles_fullgraph_and_exports(model):
    cfg = model.config
    ids = torch.tensor([[cfg.bos_token_id, 5, 6, 7, 8]])
    mask = torch.ones_like(ids)

    class TextOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_loss=False
            ).logits

    wrapped = TextOnly(model).eval()
    with torch.no_grad():
        eager = wrapped(ids, mask)
        compiled = torch.compile(wrapped, fullgraph=True, backend="eager")(ids, mask)
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
        exported = torch.export.export(wrapped, (ids, mask))
        torch.testing.assert_close(exported.module()(ids, mask), eager, atol=1e-5, rtol=1e-5)


def test_draw_mode_resolves_the_generation_config_and_its_processors(model):
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    cfg = model.config
    ids = torch.tensor([[cfg.bos_token_id, 5, 6, 7]])
    out = model.generate(
        input_ids=ids,
        soi="draw",
        generation_config=GenerationConfig(max_new_tokens=3, eos_token_id=-5, do_sample=False),
        num_inference_steps=2,
    )
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert out.sequences.shape[1] - ids.shape[1] in (3, 3 + cfg.num_image_tokens)  # a passed config is not ignored

    class StopAfter(StoppingCriteria):
        def __init__(self, n):
            self.n = n

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + self.n, dtype=torch.bool)

    stopped = model.generate(
        input_ids=ids,
        soi="draw",
        max_new_tokens=10,
        eos_token_id=-5,
        suppress_tokens=[cfg.soi_token_id],
        stopping_criteria=StoppingCriteriaList([StopAfter(2)]),
        num_inference_steps=2,
        max_new_images=0,
    )
    assert stopped.sequences.shape[1] == ids.shape[1] + 2
    # a processor from the config: repetition_penalty changes the scores like the library's processor does
    two = dict(
        input_ids=ids,
        soi="draw",
        max_new_tokens=2,
        eos_token_id=-5,
        output_scores=True,
        output_logits=True,
        max_new_images=0,
    )
    plain = model.generate(**two)
    penal = model.generate(**two, repetition_penalty=5.0)
    torch.testing.assert_close(plain.logits[0], penal.logits[0])
    assert not torch.allclose(plain.scores[0], penal.scores[0])
    # num_return_sequences repeats each row
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)]
    twice = model.generate(
        input_ids=ids,
        soi="draw",
        max_new_tokens=2,
        eos_token_id=-5,
        do_sample=True,
        num_return_sequences=2,
        max_new_images=0,
        generator=gens,
    )
    assert twice.sequences.shape[0] == 2 and torch.equal(twice.sequences[0], twice.sequences[1])
    with pytest.raises(ValueError, match="beam search"):
        model.generate(input_ids=ids, soi="draw", num_beams=2)
    with pytest.raises(TypeError, match="unexpected arguments"):
        model.generate(input_ids=ids, soi="draw", not_an_option=1)


def test_tensor_parallel_plan_names_the_llm_projections(model):
    import re

    plan = getattr(model, "tp_plan", None) or model._tp_plan
    assert plan.get("model.language_model.layers.*.self_attn.q_proj") == "colwise"
    assert plan.get("model.language_model.layers.*.mlp.down_proj") == "rowwise"
    names = [n for n, _ in model.named_modules()]
    for pattern in plan:
        regex = re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")
        assert any(regex.match(n) for n in names), pattern


@pytest.mark.parametrize("mode", ["static_cache", "prompt_lookup", "assisted", "continue_from_cache"])
def test_decoding_variants_with_images_equal_plain_greedy(model, mode):
    from deem.modeling.compat import CACHE_FIELD

    cfg = model.config
    b = tiny_batch(cfg, seed=2, pad_side="left")
    one = {
        "input_ids": b["input_ids"][:1],
        "attention_mask": b["attention_mask"][:1],
        "pixel_values": b["pixel_values"][:2],
        "num_images": b["num_images"][:1],
    }
    common = dict(do_sample=False, soi="suppress", pad_token_id=cfg.pad_token_id, eos_token_id=-5)
    ref = model.generate(**one, max_new_tokens=6, **common)
    if mode == "continue_from_cache":
        first = model.generate(**one, max_new_tokens=3, return_dict_in_generate=True, **common)
        mask = torch.cat([one["attention_mask"], torch.ones(1, 3, dtype=torch.long)], 1)
        out = model.generate(
            input_ids=first.sequences,
            attention_mask=mask,
            pixel_values=one["pixel_values"],
            num_images=one["num_images"],
            max_new_tokens=3,
            **common,
            **{CACHE_FIELD: getattr(first, CACHE_FIELD)},
        )
    else:
        extra = {
            "static_cache": {"cache_implementation": "static"},
            "prompt_lookup": {"prompt_lookup_num_tokens": 3},
            "assisted": {"assistant_model": tiny_model(seed=31)},
        }[mode]
        out = model.generate(**one, max_new_tokens=6, **common, **extra)
    assert torch.equal(out, ref)


def test_dtype_per_sub_model(tmp_path, model):
    from deem import DeemForInterleavedGeneration

    model.save_pretrained(tmp_path)
    mixed = DeemForInterleavedGeneration.from_pretrained(
        tmp_path, dtype={"text_config": torch.bfloat16, "": torch.float32}
    )
    assert mixed.language_model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16
    assert mixed.language_model.layers[0].cross_attn.gate.dtype == torch.float32  # cross_attention_config: the rest
    assert (
        mixed.image_encoder.perceiver.queries.dtype == torch.float32
        and mixed.vae.encoder.conv_in.weight.dtype == torch.float32
    )
    half_side = DeemForInterleavedGeneration.from_pretrained(
        tmp_path, dtype={"diffusion_config": torch.bfloat16, "perceiver_config": torch.bfloat16}
    )
    assert (
        half_side.unet.conv_in.weight.dtype == torch.bfloat16
        and half_side.vae.encoder.conv_in.weight.dtype == torch.float32
    )
    assert (
        half_side.image_encoder.perceiver.queries.dtype == torch.bfloat16
        and half_side.image_encoder.clip_mean.dtype == torch.float32
    )
    with pytest.raises(ValueError, match="not sub-configs"):
        DeemForInterleavedGeneration.from_pretrained(tmp_path, dtype={"llm": torch.bfloat16})
