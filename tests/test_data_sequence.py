"""Tokenise once (tokenizer calls counted from reader to batch), the "no image, no loss" rule on a packed row, and
the row-start NIP context on a packed row (spans and the model's NIP loss)."""

import io
import tarfile

import PIL.Image
import pytest
import torch
from tokenizer_utils import build_test_tokenizer
from torch.utils.data import DataLoader

from deem import DeemImageProcessor, DeemProcessor, prepare_tokenizer
from deem.modeling.sequence_deem import _image_context_spans, _image_runs, image_conditioned
from deem.trainers.data import (
    DeemDataCollator,
    PackedDataset,
    make_sample,
    pack_samples,
    read_pairs,
    sample_text,
    tokenize_text,
)

Q = 4
MARK = "<image>"


@pytest.fixture(scope="module")
def processor():
    tok = prepare_tokenizer(build_test_tokenizer())
    return DeemProcessor(DeemImageProcessor(size=32, decoder_size=32), tok, num_image_tokens=Q)


def write_tars(root, n_shards, per_shard):
    paths, k = [], 0
    for s in range(n_shards):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(per_shard):
                buf = io.BytesIO()
                PIL.Image.new("RGB", (16, 16), (k % 256, 0, 0)).save(buf, format="PNG")
                for name, data in ((f"{k:06d}.png", buf.getvalue()), (f"{k:06d}.txt", f"the cat number {k}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
        paths.append(str(path))
    return paths


def test_each_sample_is_tokenised_once_reader_to_batch(tmp_path, processor, monkeypatch):
    tars = write_tars(tmp_path, 2, 20)
    calls, texts = [], []
    tok_cls = type(processor.tokenizer)
    original = tok_cls.__call__

    def counting(self, text=None, *args, **kwargs):
        calls.append(1)
        texts.extend([text] if isinstance(text, str) else list(text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(tok_cls, "__call__", counting)
    packed = PackedDataset(read_pairs(tars, shuffle=False, seed=0), processor, 64, encode_batch=16)
    collator = DeemDataCollator(processor, 64, seed=0)
    loader = DataLoader(packed, batch_size=3, num_workers=0, collate_fn=collator)
    batches = list(loader)
    assert sum(int(b["num_images"].sum()) for b in batches) == 40
    # 40 pairs, one caption piece each (or none after the 10 % text drop): each piece tokenised exactly once, in
    # ceil(40 / 16) = 3 batched calls; the collator adds no call for packed rows
    assert len(calls) == 3
    captions = [t for t in texts if t.startswith("the cat number")]
    assert len(captions) == len(texts) and len(set(captions)) == len(captions) and 30 <= len(captions) <= 40
    monkeypatch.setattr(tok_cls, "__call__", original)
    # the ids the packer produced are exactly the processor's for the row's text
    rows = list(PackedDataset(read_pairs(tars, shuffle=False, seed=0), processor, 64))
    for row in rows:
        assert row["input_ids"] == tokenize_text(processor, sample_text(row))
    # samples without ids: the collator encodes the whole batch in one call
    image = PIL.Image.new("RGB", (8, 8))
    loose = [make_sample(f"the dog {k}{MARK}</s>", [image]) for k in range(5)]
    calls.clear()
    monkeypatch.setattr(tok_cls, "__call__", counting)
    batch = DeemDataCollator(processor, 64)(loose)
    assert len(calls) == 1 and batch["input_ids"].shape[0] == 5


def test_no_image_no_loss_rule_on_a_packed_row(processor):
    image = PIL.Image.new("RGB", (8, 8))
    docs = [
        make_sample("a red bus" + MARK + "</s>", [image], source="laion_en"),  # caption before its image
        make_sample(MARK + "the cat</s>", [image], source="laion_en"),  # caption after its image
    ]
    (row,) = list(pack_samples(docs, processor, 64))
    assert sample_text(row) == "a red bus" + MARK + "</s><s>" + MARK + "the cat</s>"
    ids = row["input_ids"]
    tok = processor.tokenizer
    bus = tok("a red bus", add_special_tokens=False)["input_ids"]
    cat = tok("the cat", add_special_tokens=False)["input_ids"]
    soi = [p for p, t in enumerate(ids) if t == processor.soi_token_id]
    second_bos = ids.index(tok.bos_token_id, 1)

    def supervised(collator):
        labels = collator([row])["labels"][0].tolist()
        return [p for p, t in enumerate(labels) if t != -100]

    ruled = supervised(DeemDataCollator(processor, 64, train_transforms=False))  # laion_en is on the default list
    plain = supervised(DeemDataCollator(processor, 64, train_transforms=False, no_image_no_loss_sources=()))
    caption_1 = list(range(1, 1 + len(bus)))
    caption_2 = list(range(soi[1] + 1 + Q, soi[1] + 1 + Q + len(cat)))
    eos = [p for p, t in enumerate(ids) if t == tok.eos_token_id]
    # without the rule: both captions, the first soi (after text) and both </s>
    assert plain == sorted(caption_1 + [soi[0]] + [eos[0]] + caption_2 + [eos[1]])
    # with it: the first caption has no image before it in its document -> no loss; the rest is unchanged
    assert ruled == sorted([soi[0], eos[0]] + caption_2 + [eos[1]])
    # the rule is per document: the second document's <s> resets it (its soi follows <s>: never predicted)
    cond = image_conditioned(torch.tensor([ids]), tok.bos_token_id, processor.soi_token_id)[0]
    assert not cond[: soi[0]].any() and cond[soi[0] : second_bos].all() and not cond[second_bos]
    # sources not on the list (mmc4, pairs: the original's DEEM sources, B3) keep every loss by default
    other = dict(row, source="pairs")
    labels = DeemDataCollator(processor, 64, train_transforms=False)([other])["labels"][0].tolist()
    assert [p for p, t in enumerate(labels) if t != -100] == plain


def test_row_start_nip_context_on_a_packed_row(processor):
    from conftest import tiny_model

    from deem import DeemConfig

    with pytest.raises(ValueError, match="nip_context_start"):
        DeemConfig.tiny(nip_context_start="document")
    model = tiny_model(seed=0).train()
    cfg = model.config
    q, soi, img, bos, eos = cfg.num_image_tokens, cfg.soi_token_id, cfg.image_token_id, cfg.bos_token_id, 2
    g = torch.Generator().manual_seed(0)

    def text(n):
        return torch.randint(3, cfg.original_vocab_size - 2, (n,), generator=g).tolist()

    # one packed row, two documents: the second document's image sees context from its own <s> or the row start
    doc1 = [bos] + text(3) + [soi] + [img] * q + text(2) + [eos]
    doc2 = [bos] + text(2) + [soi] + [img] * q + text(2) + [soi] + [img] * q + text(1) + [eos]
    ids = torch.tensor([doc1 + doc2])
    mask = torch.ones_like(ids)
    runs = _image_runs(ids, img)
    _, soi_pos, near = _image_context_spans(runs, ids, mask, bos)
    _, _, start = _image_context_spans(runs, ids, mask, bos, "row_start")
    assert near.tolist() == [0, len(doc1), len(doc1)] and start.tolist() == [0, 0, 0]
    assert soi_pos.tolist() == [4, len(doc1) + 3, len(doc1) + 3 + q + 3]

    vis, dec = cfg.vision_config.image_size, cfg.diffusion_config.image_size
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.rand(3, 3, vis, vis, generator=g),
        "pixel_values_decoder": torch.rand(3, 3, dec, dec, generator=g),
    }

    def nip(context_start, inputs):
        model.config.nip_context_start = context_start
        with torch.no_grad():
            out = model(**inputs, loss_csr_weight=0.0, generator=torch.Generator().manual_seed(5))
        return float(out.loss_nip)

    try:
        assert nip("row_start", batch) != pytest.approx(nip("nearest_bos", batch), rel=1e-6)
        single = {  # one document per row: the two rules agree
            "input_ids": torch.tensor([doc2]),
            "attention_mask": torch.ones(1, len(doc2), dtype=torch.long),
            "pixel_values": batch["pixel_values"][1:],
            "pixel_values_decoder": batch["pixel_values_decoder"][1:],
        }
        assert nip("row_start", single) == pytest.approx(nip("nearest_bos", single), rel=1e-6)
    finally:
        model.config.nip_context_start = "nearest_bos"
