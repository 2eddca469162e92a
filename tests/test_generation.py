"""Text generation through the stock GenerationMixin: parity with a plain LLaMA, cached = uncached with images."""

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
    state = {k[len("language_model.") :]: v for k, v in model.state_dict().items() if k.startswith("language_model.") and ".cross_attn." not in k}
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
    ids = torch.cat([torch.full((3, 1), cfg.bos_token_id), torch.randint(3, cfg.original_vocab_size - 2, (3, 6), generator=g)], 1)
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
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, soi="suppress", eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, output_scores=True, return_dict_in_generate=True)
        seq = out.sequences
        assert seq.shape[1] > batch["input_ids"].shape[1]
        full_mask = torch.cat([batch["attention_mask"], torch.ones(seq.shape[0], seq.shape[1] - batch["input_ids"].shape[1], dtype=torch.long)], 1)
        position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
        full = model(input_ids=seq, attention_mask=full_mask, pixel_values=batch["pixel_values"], position_ids=position_ids, return_loss=False).logits
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
        stopped = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, logits_processor=LogitsProcessorList([ForceSoi()]), pad_token_id=cfg.pad_token_id)
        suppressed = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, soi="suppress", pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id)
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
        model.generate(**batch, soi="draw")
