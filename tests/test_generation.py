"""Text generation through the stock GenerationMixin: parity with a plain LLaMA, cached = uncached with images."""

import copy

import pytest
import torch
from conftest import tiny_batch, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=11)


def plain_llama(model):
    """A LlamaForCausalLM carrying the DEEM LLM weights and the base text head (original vocabulary only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    text = cfg.text_config.to_dict()
    text["vocab_size"] = cfg.original_vocab_size
    text.pop("architectures", None)
    llama = LlamaForCausalLM(LlamaConfig(**text)).eval()
    state = {k: v for k, v in model.language_model.state_dict().items() if ".cross_attn." not in k}
    state["embed_tokens.weight"] = state["embed_tokens.weight"][: cfg.original_vocab_size]
    missing, unexpected = llama.model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    with torch.no_grad():
        llama.lm_head.weight.copy_(model.lm_head.base.weight[: cfg.original_vocab_size])
        assert torch.all(model.lm_head.base.bias[: cfg.original_vocab_size] == 0)
    return llama


def test_text_only_greedy_equals_plain_llama(model):
    cfg = model.config
    llama = plain_llama(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat(
        [torch.full((3, 1), cfg.bos_token_id), torch.randint(3, cfg.original_vocab_size - 2, (3, 6), generator=g)], 1
    )
    ids[2, :2] = cfg.pad_token_id  # a left-padded row
    mask = torch.ones_like(ids)
    mask[2, :2] = 0
    ids[2, 2] = cfg.bos_token_id
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=cfg.pad_token_id)
    with torch.no_grad():
        ours = model.generate(input_ids=ids, attention_mask=mask, soi="suppress", eos_token_id=cfg.eos_token_id, **kw)
        ref = llama.generate(input_ids=ids, attention_mask=mask, eos_token_id=cfg.eos_token_id, **kw)
    assert ours.shape == ref.shape and torch.equal(ours, ref)


def test_cached_decoding_with_images_equals_uncached(model):
    cfg = model.config
    batch = tiny_batch(cfg, seed=5, pad_side="left")
    batch.pop("pixel_values_decoder")
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=6,
            do_sample=False,
            soi="suppress",
            eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        seq = out.sequences
        assert seq.shape[1] > batch["input_ids"].shape[1]
        full_mask = torch.cat(
            [
                batch["attention_mask"],
                torch.ones(seq.shape[0], seq.shape[1] - batch["input_ids"].shape[1], dtype=torch.long),
            ],
            1,
        )
        position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
        full = model(
            input_ids=seq,
            attention_mask=full_mask,
            pixel_values=batch["pixel_values"],
            position_ids=position_ids,
            return_loss=False,
        ).logits
    prompt = batch["input_ids"].shape[1]
    for step, scores in enumerate(out.scores):
        raw = full[:, prompt - 1 + step].clone()
        raw[:, [cfg.image_token_id, cfg.soi_token_id]] = -float("inf")
        finite = torch.isfinite(scores)
        torch.testing.assert_close(scores[finite], raw[finite], atol=1e-5, rtol=1e-5)


def test_soi_stops_or_is_suppressed(model):
    cfg = model.config
    ids = torch.tensor([[cfg.bos_token_id, 5, 6, 7]])

    class ForceSoi:
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[:, cfg.soi_token_id] = 1e4
            return scores

    from transformers import LogitsProcessorList

    with torch.no_grad():
        stopped = model.generate(
            input_ids=ids,
            max_new_tokens=5,
            do_sample=False,
            logits_processor=LogitsProcessorList([ForceSoi()]),
            pad_token_id=cfg.pad_token_id,
        )
        suppressed = model.generate(
            input_ids=ids,
            max_new_tokens=5,
            do_sample=False,
            soi="suppress",
            pad_token_id=cfg.pad_token_id,
            eos_token_id=cfg.eos_token_id,
        )
    assert stopped[0, -1] == cfg.soi_token_id and stopped.shape[1] == ids.shape[1] + 1
    assert cfg.soi_token_id not in suppressed[0, ids.shape[1] :].tolist()
    assert cfg.image_token_id not in suppressed[0].tolist()


def test_beam_search_with_images_runs(model):
    cfg = model.config
    batch = tiny_batch(cfg, seed=6, pad_side="left")
    batch.pop("pixel_values_decoder")
    with torch.no_grad():
        beams = model.generate(**batch, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=cfg.pad_token_id)
        greedy1 = model.generate(**batch, max_new_tokens=4, num_beams=1, do_sample=False, pad_token_id=cfg.pad_token_id)
    assert beams.shape[0] == 2 and greedy1.shape[0] == 2


def test_generation_bad_input(model):
    cfg = model.config
    batch = tiny_batch(cfg, seed=7, pad_side="left")
    with pytest.raises(ValueError, match="exceeds the model's maximum"):
        model.generate(**batch, max_new_tokens=cfg.text_config.max_position_embeddings)
    with pytest.raises(ValueError, match="image"):
        model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2)
    with pytest.raises(ValueError, match="soi"):
        model.generate(**batch, soi="paint")


class ForceSoiAt:
    """Force <|startofimage|> in given rows once they have generated ``after`` new tokens (per row)."""

    def __init__(self, soi, prompt_len, plan, skip=()):
        self.soi, self.prompt_len, self.plan, self.done, self.skip = (
            soi,
            prompt_len,
            plan,
            set(),
            torch.tensor(list(skip), dtype=torch.long),
        )

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for row, (rid, after) in enumerate(self.plan):
            if after is None or rid in self.done:
                continue
            real = int((~torch.isin(input_ids[row, self.prompt_len :], self.skip)).sum())  # text tokens only
            if real >= after:
                scores[row, self.soi] = 1e4
                self.done.add(rid)
        return scores


def _prompts(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        [cfg.bos_token_id] + torch.randint(3, cfg.original_vocab_size - 2, (n,), generator=g).tolist()
        for n in (5, 3, 4)
    ]


def _left_pad(rows, pad):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _real(seq, mask):
    return seq[mask.bool()].tolist()


def test_interleaved_batch_equals_rows_alone(model):
    """Rows 1 and 3 draw an image at different steps, row 2 none: each row equals generating it alone."""
    from transformers import LogitsProcessorList

    cfg = model.config
    rows = _prompts(cfg, 3)
    plan = [(0, 2), (1, None), (2, 4)]
    kw = dict(
        max_new_tokens=8, soi="draw", num_inference_steps=2, guidance_scale=2.0, eos_token_id=-5, max_new_images=1
    )
    ids, mask = _left_pad(rows, cfg.pad_token_id)
    batch = model.generate(
        input_ids=ids,
        attention_mask=mask,
        generator=[torch.Generator().manual_seed(10 + i) for i in range(3)],
        logits_processor=LogitsProcessorList(
            [ForceSoiAt(cfg.soi_token_id, ids.shape[1], plan, (cfg.pad_token_id, cfg.image_token_id))]
        ),
        **kw,
    )
    assert [len(x) for x in batch.images] == [1, 0, 1]
    for i, row in enumerate(rows):
        alone_ids = torch.tensor([row])
        alone = model.generate(
            input_ids=alone_ids,
            attention_mask=torch.ones_like(alone_ids),
            generator=[torch.Generator().manual_seed(10 + i)],
            logits_processor=LogitsProcessorList(
                [ForceSoiAt(cfg.soi_token_id, alone_ids.shape[1], [plan[i]], (cfg.pad_token_id, cfg.image_token_id))]
            ),
            **kw,
        )
        assert _real(batch.sequences[i], batch.attention_mask[i]) == _real(alone.sequences[0], alone.attention_mask[0])
        assert len(alone.images[0]) == len(batch.images[i])
        for a, b in zip(alone.images[0], batch.images[i]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    seq = batch.sequences[0][batch.attention_mask[0].bool()].tolist()
    soi_at = seq.index(cfg.soi_token_id)
    assert seq[soi_at + 1 : soi_at + 1 + cfg.num_image_tokens] == [cfg.image_token_id] * cfg.num_image_tokens


def test_interleaved_is_seeded_and_needs_diffusion(model):
    from transformers import LogitsProcessorList

    cfg = model.config
    ids = torch.tensor([_prompts(cfg, 4)[0]])
    kw = dict(max_new_tokens=4, soi="draw", num_inference_steps=2, eos_token_id=-5, do_sample=True)
    runs = []
    for seed in (1, 1, 2):
        force = LogitsProcessorList([ForceSoiAt(cfg.soi_token_id, ids.shape[1], [(0, 1)])])
        runs.append(
            model.generate(input_ids=ids, generator=torch.Generator().manual_seed(seed), logits_processor=force, **kw)
        )
    assert torch.equal(runs[0].sequences, runs[1].sequences) and torch.equal(runs[0].images[0][0], runs[1].images[0][0])
    assert not torch.equal(runs[0].images[0][0], runs[2].images[0][0])
    text_only = tiny_model(seed=11, use_diffusion=False)
    force = LogitsProcessorList([ForceSoiAt(cfg.soi_token_id, ids.shape[1], [(0, 0)])])
    with pytest.raises(ValueError, match="no diffusion weights"):
        text_only.generate(input_ids=ids, logits_processor=force, **kw)


def test_score_options_equals_manual_log_likelihood(model):
    cfg = model.config
    batch = tiny_batch(cfg, seed=8, pad_side="left")
    options = [[5, 6], [7], [8, 9, 10]]
    with torch.no_grad():
        scores = model.score_options(
            batch["input_ids"],
            options,
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            num_images=batch["num_images"],
        )
    assert scores.shape == (2, 3)
    # row 1, option 2 by hand: one forward on that row alone with its image
    row = batch["attention_mask"][1].bool()
    ids = torch.cat([batch["input_ids"][1][row], torch.tensor(options[2])])[None]
    with torch.no_grad():
        logits = (
            model(input_ids=ids, pixel_values=batch["pixel_values"][2:3], return_loss=False).logits[0].log_softmax(-1)
        )
    n = ids.shape[1]
    manual = sum(logits[n - 4 + i, tok] for i, tok in enumerate(options[2]))
    torch.testing.assert_close(scores[1, 2], manual, atol=1e-4, rtol=1e-4)


def test_perception_consistency_is_seeded_and_sees_corruption(model):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    size, dec = cfg.vision_config.image_size, cfg.diffusion_config.image_size
    # smooth images (a gradient) and the same images corrupted by heavy noise
    ramp = torch.linspace(0, 1, dec)[None, None, :].expand(2, 3, dec, dec).clone()
    ramp[1] = ramp[1].flip(-1)
    noisy = (ramp + torch.rand(ramp.shape, generator=g) * 2 - 1).clamp(0, 1)
    enc_view = lambda x: torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # noqa: E731
    a = model.perception_consistency(enc_view(ramp), ramp, seed=3)
    b = model.perception_consistency(enc_view(ramp), ramp, seed=3)
    c = model.perception_consistency(enc_view(noisy), noisy, seed=3)
    assert a.shape == (2,) and torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_test_time_adaptation_restores_weights_bitwise(model):
    cfg = model.config
    batch = tiny_batch(cfg, seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = batch["input_ids"][:1, : (batch["input_ids"][0] == cfg.image_token_id).nonzero()[-1, 0] + 2]
    n_img = int((ids[0] == cfg.soi_token_id).sum())
    pix, dec = batch["pixel_values"][:n_img], batch["pixel_values_decoder"][:n_img]
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=pix, return_loss=False).logits
    with model.test_time_adaptation(pix, dec, steps=2, lr=1e-2, samples=2):
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all(k.startswith("model.image_encoder.") for k in changed)
        with torch.no_grad():
            adapted = model(input_ids=ids, pixel_values=pix, return_loss=False).logits
    assert not torch.allclose(plain, adapted)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_generate_images_equals_the_standalone_pipeline(model):
    """Text-to-image through generate (prompt + <|startofimage|>) gives the image the pipeline draws from the
    same context with the same seed."""
    cfg = model.config
    ids = torch.tensor([_prompts(cfg, 12)[0]])
    kw = dict(num_inference_steps=3, guidance_scale=2.5)
    with torch.no_grad():
        via_generate = model.generate_images(ids, generator=[torch.Generator().manual_seed(7)], **kw)[0]
        with_soi = torch.cat([ids, torch.tensor([[cfg.soi_token_id]])], 1)
        hidden = model(input_ids=with_soi, return_loss=False).last_hidden_state
        n = with_soi.shape[1]
        zero = torch.zeros(1, dtype=torch.long)
        ctx, ctx_mask = model.image_decoder.context_features(hidden, zero, torch.tensor([n - 1]), zero)
        pipe = model.image_pipeline()
        assert pipe.unet is model.unet and pipe.vae is model.vae
        standalone = pipe(
            context_features=ctx,
            context_mask=ctx_mask,
            generator=[torch.Generator().manual_seed(7)],
            output_type="pt",
            **kw,
        ).images[0]
    torch.testing.assert_close(via_generate, standalone, atol=1e-5, rtol=1e-5)


def test_streamer_yields_text_and_images_in_order(model):
    import threading

    from tokenizer_utils import build_test_tokenizer
    from transformers import LogitsProcessorList

    from deem import DeemStreamer, prepare_tokenizer

    cfg = model.config
    tokenizer = prepare_tokenizer(build_test_tokenizer())
    streamer = DeemStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    ids = torch.tensor([_prompts(cfg, 13)[0]])
    force = LogitsProcessorList(
        [ForceSoiAt(cfg.soi_token_id, ids.shape[1], [(0, 2)], (cfg.pad_token_id, cfg.image_token_id))]
    )
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(
            out=model.generate(
                input_ids=ids,
                soi="draw",
                max_new_tokens=5,
                num_inference_steps=2,
                eos_token_id=-5,
                logits_processor=force,
                streamer=streamer,
            )
        )
    )
    thread.start()
    events = list(streamer)
    thread.join()
    kinds = [type(e).__name__ for e in events if not (isinstance(e, str) and e == "")]
    assert "Tensor" in kinds and kinds[0] == "str" and kinds[-1] == "str"
    image = next(e for e in events if isinstance(e, torch.Tensor))
    torch.testing.assert_close(image, result["out"].images[0][0])


class FailAfter:
    """A logits processor that raises after ``n`` calls: generation dies midway."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.n:
            raise RuntimeError("generation killed on purpose")
        return scores


@pytest.mark.parametrize("soi", ["draw", "suppress"])
def test_streamer_raises_when_generation_fails_midway(model, soi):
    import threading
    import time

    from tokenizer_utils import build_test_tokenizer
    from transformers import LogitsProcessorList

    from deem import DeemStreamer, prepare_tokenizer

    cfg = model.config
    streamer = DeemStreamer(prepare_tokenizer(build_test_tokenizer()), skip_prompt=True)
    ids = torch.tensor([_prompts(cfg, 13)[0]])
    killer = FailAfter(3)
    failing = LogitsProcessorList([killer])
    errors = []

    def run():
        try:
            extra = {"num_inference_steps": 2} if soi == "draw" else {}
            model.generate(
                input_ids=ids, soi=soi, max_new_tokens=50, logits_processor=failing, streamer=streamer, **extra
            )
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    thread.start()
    received = []
    with pytest.raises(RuntimeError, match="killed on purpose"):
        for item in streamer:
            received.append(item)
    thread.join(timeout=30)
    assert time.monotonic() - start < 30
    assert killer.calls == 4 and len(errors) == 1 and not thread.is_alive()


def test_streamer_raises_when_the_producer_thread_dies_without_closing():
    import threading
    import time

    from tokenizer_utils import build_test_tokenizer

    from deem import DeemStreamer, prepare_tokenizer

    streamer = DeemStreamer(prepare_tokenizer(build_test_tokenizer()), poll_interval=0.05)
    thread = threading.Thread(target=lambda: streamer.put(torch.tensor([[5, 6]])))  # puts, then dies without end()
    thread.start()
    thread.join()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="ended without finishing"):
        list(streamer)
    assert time.monotonic() - start < 5


def test_post_process_interleaved_puts_drawn_images_in_place():
    from PIL import Image
    from tokenizer_utils import build_test_tokenizer

    from deem import DeemGenerateOutput, DeemImageProcessor, DeemProcessor, prepare_tokenizer

    tokenizer = prepare_tokenizer(build_test_tokenizer())
    processor = DeemProcessor(DeemImageProcessor(size=64, decoder_size=32), tokenizer, num_image_tokens=2)
    prompt = processor(text=["a photo <image> of"], images=[Image.new("RGB", (8, 8))], padding_side="left")["input_ids"]
    hello = tokenizer("hello there", add_special_tokens=False)["input_ids"]
    bye = tokenizer("bye", add_special_tokens=False)["input_ids"]
    image_run = [processor.soi_token_id] + [processor.image_token_id] * 2
    generated = hello + image_run + bye
    sequences = torch.cat([prompt, torch.tensor([generated + [tokenizer.pad_token_id] * 2])], 1)
    mask = torch.ones_like(sequences)
    mask[0, -2:] = 0
    drawn = torch.rand(3, 32, 32)
    out = DeemGenerateOutput(sequences=sequences, attention_mask=mask, images=[[drawn]])
    pieces = processor.post_process_interleaved(out, prompt_length=prompt.shape[1], output_type="pt")[0]
    assert pieces[0].strip() == "hello there" and torch.equal(pieces[1], drawn) and pieces[2].strip() == "bye"
    whole = processor.post_process_interleaved(out)[0]
    assert whole.count("<image>") == 1 and isinstance(whole[3], Image.Image)  # prompt image stays a marker


def test_projected_vision_states_give_the_same_logits(model):
    cfg = model.config
    batch = tiny_batch(cfg, seed=14)
    with torch.no_grad():
        full = model(**batch, return_loss=False)
        enc = model.image_encoder(batch["pixel_values"])
        from deem.modeling.modeling_deem import _image_runs

        runs = _image_runs(batch["input_ids"], cfg.image_token_id)
        memory = model.model.image_memory(enc, runs, batch["num_images"], 2)
        from deem.modeling.sequence_deem import DeemImageMemory, pad_per_row

        assert isinstance(memory, DeemImageMemory) and memory.projected is None
        assert torch.equal(memory.image_embeds, pad_per_row(enc.llm_embeds, batch["num_images"]))  # [B, N, Q, H]
        projected = model.project_image_memory(memory)
        assert projected.projected.shape[:2] == (
            2,
            len(range(0, cfg.text_config.num_hidden_layers, cfg.cross_attention_config.frequency)),
        )
        assert projected.projected_by == id(model.model)
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], return_loss=False)
        for given in (memory, projected):  # raw states projected by each layer, or the projection made once
            again = model(**kw, image_memory=given)
            torch.testing.assert_close(again.logits, full.logits, atol=1e-5, rtol=1e-5)
        # another model (an assistant) never reads this model's projection
        other = copy.deepcopy(model)
        with torch.no_grad():
            for layer in other.model.language_model.layers:
                if layer.cross_attn is not None:
                    layer.cross_attn.gate.fill_(0.5)
        assert projected.states_for(other.model)[1] is False
        torch.testing.assert_close(
            other(**kw, image_memory=projected).logits, other(**kw, image_memory=memory).logits, atol=1e-6, rtol=1e-6
        )
        # one object, checked before any work
        with pytest.raises(ValueError, match="not both"):
            model(**kw, pixel_values=batch["pixel_values"], image_memory=memory)
        with pytest.raises(ValueError, match="holds 1 rows"):
            model(**kw, image_memory=memory.select(torch.tensor([0])))
        with pytest.raises(ValueError, match="DeemImageMemory"):
            model(**kw, image_memory=(memory.vision_states,))
        assert memory.repeat_interleave(3).image_embeds.shape[0] == 6


def test_too_many_images_for_the_cross_attention_is_refused_before_work(model):
    cfg = model.config
    ids = torch.tensor([_prompts(cfg, 15)[0]])
    with pytest.raises(ValueError, match="at most .* images"):
        model.generate(
            input_ids=ids, soi="draw", max_new_images=cfg.cross_attention_config.max_num_images + 1, max_new_tokens=2
        )


def test_interleaved_image_size_is_set_by_the_call(model):
    cfg = model.config
    ids = torch.tensor([_prompts(cfg, 16)[0]])
    images = model.generate_images(
        ids, num_inference_steps=2, height=48, width=48, generator=[torch.Generator().manual_seed(0)]
    )
    assert images[0].shape == (3, 48, 48) and 0 <= float(images[0].min()) and float(images[0].max()) <= 1


def test_default_soi_draws_when_the_images_can_be_returned(model, caplog):
    """soi=None: a plain call returns token ids (``<|startofimage|>`` ends the row, as soi='stop'); with
    return_dict_in_generate=True the model draws (as soi='draw'); beam search falls back to 'stop' with a warning;
    a model without diffusion weights never draws."""
    from transformers import LogitsProcessorList
    from transformers.utils import logging as hf_logging

    from deem.modeling.generation_deem import DeemGenerateOutput

    cfg = model.config
    ids = torch.tensor([_prompts(cfg, 21)[0]])
    kw = dict(input_ids=ids, max_new_tokens=5, eos_token_id=-5, do_sample=False)

    def force():
        return LogitsProcessorList([ForceSoiAt(cfg.soi_token_id, ids.shape[1], [(0, 1)])])

    plain = model.generate(**kw, logits_processor=force())
    stop = model.generate(**kw, logits_processor=force(), soi="stop")
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, stop)
    assert plain[0, -1].item() == cfg.soi_token_id and plain.shape[1] == ids.shape[1] + 2  # the row ended there

    seeded = dict(num_inference_steps=2)  # drawing noise from the global generator, seeded before each call
    torch.manual_seed(0)
    drawn = model.generate(**kw, logits_processor=force(), return_dict_in_generate=True, **seeded)
    torch.manual_seed(0)
    explicit = model.generate(**kw, logits_processor=force(), soi="draw", **seeded)
    # an argument only drawing reads says "draw" too, and then the images come back
    torch.manual_seed(0)
    asked = model.generate(**kw, logits_processor=force(), **seeded)
    assert isinstance(asked, DeemGenerateOutput) and torch.equal(asked.images[0][0], explicit.images[0][0])
    assert isinstance(drawn, DeemGenerateOutput) and len(drawn.images[0]) == 1
    assert torch.equal(drawn.sequences, explicit.sequences) and torch.equal(drawn.images[0][0], explicit.images[0][0])
    assert drawn.sequences.shape[1] == ids.shape[1] + 5 + cfg.num_image_tokens  # text goes on after the image

    hf_logging.get_logger("transformers_modules")  # the warning goes through transformers' logging
    with caplog.at_level("WARNING"):
        bare = model.generate(
            **kw, logits_processor=force(), soi="draw", return_dict_in_generate=False, num_inference_steps=2
        )
    assert torch.equal(bare, drawn.sequences) and "dropped" in caplog.text

    beams = model.generate(**kw, logits_processor=force(), num_beams=2, return_dict_in_generate=True)
    beams_stop = model.generate(**kw, logits_processor=force(), num_beams=2, return_dict_in_generate=True, soi="stop")
    assert not isinstance(beams, DeemGenerateOutput) and torch.equal(beams.sequences, beams_stop.sequences)

    text_only = tiny_model(seed=11, use_diffusion=False)
    out = text_only.generate(**kw, logits_processor=force(), return_dict_in_generate=True)
    assert not isinstance(out, DeemGenerateOutput) and out.sequences[0, -1].item() == cfg.soi_token_id


def test_draw_mode_dict_output_matches_the_library_without_images(model):
    """With no <|startofimage|> emitted, the interleaved loop returns what GenerationMixin returns: the same
    sequences, scores, logits, per-step attentions / hidden states and a cache of the same length."""
    from deem.modeling.compat import CACHE_FIELD

    cfg = model.config
    eager = tiny_model(seed=11, attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    rows = _prompts(cfg, 22)[:2]
    ids, mask = _left_pad(rows, cfg.pad_token_id)
    kw = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=4,
        eos_token_id=-5,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        output_attentions=True,
        output_hidden_states=True,
        suppress_tokens=[cfg.soi_token_id],
    )
    lib = eager.generate(**kw, soi="suppress")
    ours = eager.generate(**kw, soi="draw", max_new_images=0)
    assert torch.equal(ours.sequences, lib.sequences) and ours.images == [[], []]
    for field in ("scores", "logits"):
        assert len(getattr(ours, field)) == len(getattr(lib, field)) == 4
        for a, b in zip(getattr(ours, field), getattr(lib, field)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for field in ("attentions", "hidden_states"):
        assert len(getattr(ours, field)) == len(getattr(lib, field))
        for step_ours, step_lib in zip(getattr(ours, field), getattr(lib, field)):
            assert len(step_ours) == len(step_lib)
            for a, b in zip(step_ours, step_lib):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert getattr(ours, CACHE_FIELD).get_seq_length() == getattr(lib, CACHE_FIELD).get_seq_length()


def test_token_suppression_bias_equals_the_library_processor():
    """The fixed-bias suppression text generation uses gives the library's SuppressTokensLogitsProcessor scores
    (and rebuilds its bias when the vocabulary size or dtype changes)."""
    from transformers import SuppressTokensLogitsProcessor

    from deem.modeling.generation_deem import TokenSuppression

    ours, lib = TokenSuppression([5, 3, 5]), SuppressTokensLogitsProcessor([3, 5])
    ids = torch.zeros(2, 1, dtype=torch.long)
    for vocab, dtype in ((16, torch.float32), (16, torch.float32), (9, torch.bfloat16)):
        scores = torch.randn(2, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
        got = ours(ids, scores)
        assert got.dtype == dtype and torch.equal(got, lib(ids, scores))
        assert torch.isinf(got[:, [3, 5]]).all() and torch.equal(got[:, :3], scores[:, :3])


def test_logits_processors_run_every_step_and_missing_arguments_still_fail(model):
    """Our processor list reads each processor's signature once per call: every processor still runs at every step
    with the step's scores, and one that needs a keyword the loop does not give fails as the library's does."""
    from transformers import LogitsProcessor, LogitsProcessorList

    cfg = model.config

    class Count(LogitsProcessor):
        def __init__(self):
            self.lengths = []

        def __call__(self, input_ids, scores):
            self.lengths.append(input_ids.shape[1])
            return scores

    class NeedsExtra(LogitsProcessor):
        def __call__(self, input_ids, scores, extra):
            return scores

    ids = torch.tensor([[cfg.bos_token_id, 5, 6, 7]])
    count = Count()
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=cfg.pad_token_id, soi="suppress")
    with torch.no_grad():
        out = model.generate(input_ids=ids, logits_processor=LogitsProcessorList([count]), **kw)
        assert out.shape[1] == 9 and count.lengths == [4, 5, 6, 7, 8]
        with pytest.raises(ValueError, match="required parameters.*extra"):
            model.generate(input_ids=ids, logits_processor=LogitsProcessorList([NeedsExtra()]), **kw)


def test_decoding_after_trailing_pads_counts_real_tokens(model):
    """right_padding='continue' (the original's way with a right-padded batch): the prompt's pads sit at position 1
    as in the original's cascade wrapper, and every new token goes on from the row's real tokens (the library alone
    would restart after the last pad's position)."""
    cfg = model.config
    ids = torch.tensor(
        [[cfg.bos_token_id, 5, 6, 7, cfg.pad_token_id, cfg.pad_token_id], [cfg.bos_token_id, 5, 6, 7, 8, 9]]
    )
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].tolist()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                right_padding="continue",
                max_new_tokens=3,
                min_new_tokens=3,
                do_sample=False,
                pad_token_id=cfg.pad_token_id,
                soi="suppress",
            )
    finally:
        hook.remove()
    assert seen == [[[0, 1, 2, 3, 1, 1], [0, 1, 2, 3, 4, 5]], [[4], [6]], [[5], [7]]]
