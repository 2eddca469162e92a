"""The cache is really used and really right: for every decoding mode, generating with the cache equals generating
without it, and every step's logits equal one full forward pass over the final sequence.

This guards the silent failure of a cache that a model receives under a name it does not read (transformers 5.24
renamed ``past_key_values`` to ``cache``; a forward that swallowed the new name in ``**kwargs`` decoded without its
cache and gave other tokens, with no error)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_batch, tiny_model

NEW = 5


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=21)


def _prompt(cfg, images: bool):
    batch = tiny_batch(cfg, seed=3, pad_side="left")
    batch.pop("pixel_values_decoder")
    if not images:  # same rows with the images cut out
        rows = []
        for row in batch["input_ids"].tolist():
            rows.append([t for t in row if t not in (cfg.image_token_id, cfg.soi_token_id)])
        width = max(len(r) for r in rows)
        pad = cfg.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
        # rows were left padded before too: keep only the real tokens
        real = [
            [t for t, m in zip(r, mr) if m]
            for r, mr in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())
        ]
        rows = [[t for t in r if t not in (cfg.image_token_id, cfg.soi_token_id)] for r in real]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}
    return batch


def _full_logits(model, batch, sequences):
    """Raw logits of one full forward pass over ``sequences`` (prompt images included), positions from the mask."""
    cfg = model.config
    prompt = batch["input_ids"].shape[1]
    gen = sequences[:, prompt:]
    mask = torch.cat([batch["attention_mask"], torch.ones_like(gen)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(
            input_ids=sequences,
            attention_mask=mask,
            pixel_values=batch.get("pixel_values"),
            num_images=batch.get("num_images"),
            position_ids=position_ids,
            return_loss=False,
        )
    del cfg
    return out.logits


MODES = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True, "top_k": 20, "temperature": 0.9},
}


@pytest.mark.parametrize("images", [False, True], ids=["text", "images"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_text_modes_cache_on_equals_off_equals_full_forward(model, mode, images):
    cfg = model.config
    batch = _prompt(cfg, images)
    common = dict(
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        soi="suppress",
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id,
        output_logits=True,
        return_dict_in_generate=True,
        **MODES[mode],
    )
    outs = {}
    for use_cache in (True, False):
        torch.manual_seed(1234)
        outs[use_cache] = model.generate(**batch, use_cache=use_cache, **common)
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    full = _full_logits(model, batch, outs[True].sequences)
    prompt = batch["input_ids"].shape[1]
    assert len(outs[True].logits) == NEW
    for step in range(NEW):
        for use_cache in (True, False):
            torch.testing.assert_close(outs[use_cache].logits[step], full[:, prompt - 1 + step], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("images", [False, True], ids=["text", "images"])
def test_beam_search_cache_on_equals_off_equals_full_forward(model, images):
    cfg = model.config
    batch = _prompt(cfg, images)
    common = dict(
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        num_beams=3,
        num_return_sequences=2,
        length_penalty=0.0,
        do_sample=False,
        soi="suppress",
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    on = model.generate(**batch, use_cache=True, **common)
    off = model.generate(**batch, use_cache=False, **common)
    assert torch.equal(on.sequences, off.sequences)
    torch.testing.assert_close(on.sequences_scores, off.sequences_scores, atol=1e-5, rtol=1e-5)
    # each returned beam's score = sum of its tokens' log-probs (beam search normalises the raw logits, then the
    # processors mask), computed from one full forward over that beam
    expanded = {
        k: (
            v.repeat_interleave(2, 0)
            if k != "pixel_values"
            else torch.cat([g for g in v.split(batch["num_images"].tolist()) for _ in range(2)])
        )
        for k, v in batch.items()
    }
    full = _full_logits(model, expanded, on.sequences).float()
    prompt = batch["input_ids"].shape[1]
    logprobs = F.log_softmax(full[:, prompt - 1 : -1], -1)
    total = logprobs.gather(-1, on.sequences[:, prompt:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(on.sequences_scores, total, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_interleaved_draw_cache_on_equals_off_equals_full_forward(model, mode):
    from test_generation import ForceSoiAt
    from transformers import LogitsProcessorList

    cfg = model.config
    batch = _prompt(cfg, images=True)
    prompt = batch["input_ids"].shape[1]
    outs = {}
    for use_cache in (True, False):
        force = LogitsProcessorList(
            [ForceSoiAt(cfg.soi_token_id, prompt, [(0, 1), (1, None)], (cfg.pad_token_id, cfg.image_token_id))]
        )
        gens = [torch.Generator().manual_seed(5 + b) for b in range(2)]
        outs[use_cache] = model.generate(
            **batch,
            soi="draw",
            use_cache=use_cache,
            max_new_tokens=4,
            max_new_images=1,
            num_inference_steps=2,
            eos_token_id=-5,
            logits_processor=force,
            generator=gens,
            output_logits=True,
            **MODES[mode],
        )
    on, off = outs[True], outs[False]
    assert torch.equal(on.sequences, off.sequences) and torch.equal(on.attention_mask, off.attention_mask)
    assert len(on.images[0]) == 1 and not on.images[1]
    torch.testing.assert_close(on.images[0][0], off.images[0][0], atol=1e-5, rtol=1e-5)
    # one full forward over the final sequence, the drawn image read back as the loop reads it
    size = cfg.vision_config.image_size
    drawn = F.interpolate(
        on.images[0][0][None], size=(size, size), mode="bicubic", align_corners=False, antialias=True
    ).clamp(0, 1)
    groups = batch["pixel_values"].split(batch["num_images"].tolist())
    pixels = torch.cat([groups[0], drawn, groups[1]])
    mask = on.attention_mask
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(
            input_ids=on.sequences,
            attention_mask=mask,
            pixel_values=pixels,
            position_ids=position_ids,
            return_loss=False,
        ).logits
    # the generated text positions, per row: real (mask 1) tokens after the prompt that are not image placeholders
    for b in range(2):
        text_positions = [
            p for p in range(prompt, on.sequences.shape[1]) if mask[b, p] and on.sequences[b, p] != cfg.image_token_id
        ]
        assert len(text_positions) == len(on.logits)
        for step, p in enumerate(text_positions):
            source = max(
                q for q in range(p) if mask[b, q]
            )  # previous real position (skips another row's masked image chunk)
            for use_cache in (True, False):
                torch.testing.assert_close(
                    outs[use_cache].logits[step][b], full[b, source].float(), atol=1e-4, rtol=1e-4
                )
