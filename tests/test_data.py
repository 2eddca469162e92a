"""deem.trainers.data: readers for the real formats (fixtures written here), sampling rules (reference §6),
labels, shared flips, masks, packing, mixing, sharding and every bad-input path."""

import io
import json
import logging
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizer_utils import build_test_tokenizer
from torch.utils.data import DataLoader

from deem import DeemImageProcessor, DeemProcessor, prepare_tokenizer
from deem.modeling.prompts import format_prompt, sft_target
from deem.trainers.data import (
    DataError,
    DeemDataCollator,
    MixedDataset,
    PackedDataset,
    SampleList,
    decode_rle,
    encode_rle,
    make_sample,
    pack_samples,
    polygons_to_mask,
    read_llava,
    read_mmc4,
    read_pairs,
    read_referring,
    rle_counts_from_string,
    rle_counts_to_string,
    sample_text,
    tokenize_text,
)

Q = 4  # placeholders per image
MARK = "<image>"


@pytest.fixture(scope="module")
def processor():
    tok = prepare_tokenizer(build_test_tokenizer())
    return DeemProcessor(DeemImageProcessor(size=32, decoder_size=32), tok, num_image_tokens=Q)


def image_bytes(width=32, height=32, color=(200, 30, 30), fmt="JPEG"):
    buf = io.BytesIO()
    PIL.Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def add_bytes(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------- MMC4 (§6.2)


def mmc4_doc(n_sentences, images):
    """images: (name, sentence index, sim) triples; sentence k reads 'sentence k here.'"""
    return {
        "url": "http://example.com",
        "text_list": [f"sentence {k} here." for k in range(n_sentences)],
        "image_info": [
            {"image_name": name, "raw_url": "http://x/" + name, "matched_text_index": i, "matched_sim": sim}
            for name, i, sim in images
        ],
    }


def width_of(image):
    return image.width - 32  # fixture images encode their index in the width


def test_mmc4_threshold_max_images_order_and_placement(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for k in range(10):
        (images / f"img{k:02d}.jpg").write_bytes(image_bytes(32 + k))
    docs = [
        mmc4_doc(3, [("img00.jpg", 0, 0.30), ("img01.jpg", 1, 0.10), ("img02.jpg", 2, 0.24)]),  # threshold
        mmc4_doc(10, [(f"img{k:02d}.jpg", k, 0.5) for k in range(10)]),  # at most 6
        mmc4_doc(2, []),  # no images
        mmc4_doc(2, [("img03.jpg", 0, 0.2)]),  # none above the threshold
    ]
    ds = read_mmc4(write_jsonl(tmp_path / "docs.jsonl", docs), images, shuffle=False, seed=1)
    samples = list(ds)
    assert len(samples) == 2 and ds.dropped["no_images"] == 2 and not ds.skipped
    first, second = samples
    assert [width_of(im) for im in first["images"]] == [0, 2]  # sim 0.10 < 0.24 dropped, 0.24 kept
    assert len(second["images"]) == 6
    order = [width_of(im) for im in second["images"]]
    assert order == sorted(order)  # back in sentence order after the random subset
    for sample in samples:
        assert len(sample["segments"]) == 1 and sample["segments"][0]["supervise"]
        text = sample_text(sample)
        assert text.endswith("</s>") and text.count(MARK) == len(sample["images"]) and sample["source"] == "mmc4"
        assert " " + MARK not in text and MARK + " " not in text
        for im in sample["images"]:  # each image sits right before or right after its own sentence
            k = width_of(im)
            sentence = f"sentence {k} here."
            assert MARK + sentence in text or sentence + MARK in text


def test_mmc4_single_image_drop_rate_and_placement_rate(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "one.jpg").write_bytes(image_bytes())
    docs = [mmc4_doc(2, [("one.jpg", 1, 0.9)]) for _ in range(400)]
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    kept = list(read_mmc4(path, images, shuffle=False, seed=3))
    assert 150 <= len(kept) <= 250  # p = 0.5 of 400
    ds = read_mmc4(path, images, shuffle=False, seed=3)
    assert len(list(ds)) == len(kept) and ds.dropped["single_image"] == 400 - len(kept)  # deterministic
    before = sum(sample_text(s).startswith("sentence 0 here." + MARK) for s in kept)
    after = sum(sample_text(s).endswith("sentence 1 here." + MARK + "</s>") for s in kept)
    assert before + after == len(kept) and 0.35 < before / len(kept) < 0.65
    other = list(read_mmc4(path, images, shuffle=False, seed=4))
    assert [sample_text(s) for s in other] != [sample_text(s) for s in kept]


def test_mmc4_file_names_zip_and_tar_images(tmp_path):
    long_name = "abcdefghijklmnopqrstuv_extra.png"  # the original's convention: first 12 chars + ".jpg"
    doc = mmc4_doc(2, [(long_name, 0, 0.5), ("exact_name.webp", 1, 0.5)])
    with zipfile.ZipFile(tmp_path / "docs_shard_0_v3.jsonl.zip", "w") as archive:
        archive.writestr("docs_shard_0_v3.jsonl", json.dumps(doc) + "\n")
    with tarfile.open(tmp_path / "images.tar", "w") as tar:
        add_bytes(tar, "shard0/abcdefghijkl.jpg", image_bytes(33))
        add_bytes(tar, "shard0/exact_name.webp", image_bytes(34, fmt="WEBP"))
    samples = list(read_mmc4(tmp_path / "docs_shard_0_v3.jsonl.zip", tmp_path / "images.tar", shuffle=False))
    assert len(samples) == 1 and sorted(width_of(im) for im in samples[0]["images"]) == [1, 2]


# ---------------------------------------------------------------- pairs (§6.3)


def write_pair_tars(root, n_shards, per_shard, caption_fmt="A Caption Number {k}"):
    paths, k = [], 0
    for s in range(n_shards):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(per_shard):
                key = f"{s:05d}{k:04d}"
                add_bytes(tar, f"{key}.jpg", image_bytes(32, 32, (k % 256, 0, 0)))
                if k % 2:
                    add_bytes(tar, f"{key}.json", json.dumps({"caption": caption_fmt.format(k=k)}).encode())
                else:
                    add_bytes(tar, f"{key}.txt", caption_fmt.format(k=k).encode())
                    add_bytes(tar, f"{key}.json", json.dumps({"url": "x"}).encode())
                k += 1
        paths.append(str(path))
    return paths


def test_pairs_webdataset_tars_lowercase_placement_and_text_drop(tmp_path):
    tars = write_pair_tars(tmp_path, 2, 200)
    samples = list(read_pairs(tars, shuffle=False, seed=0))
    assert len(samples) == 400
    texts = [sample_text(s) for s in samples]
    assert texts[1] in ("a caption number 1" + MARK + "</s>", MARK + "a caption number 1</s>", MARK + "</s>")
    dropped = sum(t == MARK + "</s>" for t in texts)
    first = sum(t.startswith(MARK + "a caption") for t in texts)
    assert 20 <= dropped <= 65  # 10 % text drop (classifier-free guidance)
    assert 0.4 < first / (400 - dropped) < 0.6  # image first with p = 0.5
    assert all(len(s["images"]) == 1 and s["images"][0].mode == "RGB" for s in samples)
    assert all(s["segments"][0]["supervise"] for s in samples)
    no_drop = list(read_pairs(tars[0], shuffle=False, text_drop_prob=0.0, image_first_prob=1.0))
    assert sample_text(no_drop[3]) == MARK + "a caption number 3</s>"


def test_pairs_jsonl_and_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "imgs" / "b.png").write_bytes(image_bytes(fmt="PNG"))
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"image": "a.jpg", "caption": "Hello World"}, {"file_name": "b.png", "text": ["Two", "Parts"]}],
    )
    samples = list(read_pairs(path, tmp_path / "imgs", shuffle=False, text_drop_prob=0, image_first_prob=0))
    assert [sample_text(s) for s in samples] == ["hello world" + MARK + "</s>", "two parts" + MARK + "</s>"]
    (tmp_path / "shards").mkdir()
    path.rename(tmp_path / "shards" / "part-0.jsonl")
    assert len(list(read_pairs(tmp_path / "shards", tmp_path / "imgs"))) == 2  # a folder of jsonl + images


# ---------------------------------------------------------------- LLaVA (§6.5)


def llava_fixture(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "1.jpg").write_bytes(image_bytes())
    records = [
        {
            "id": "a",
            "image": "coco/1.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is the man holding?"},
                {"from": "gpt", "value": "A cup."},
                {"from": "human", "value": "Where is the red car parked?"},
                {"from": "gpt", "value": "On the street."},
            ],
        },
        {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return path


def test_llava_split_turns_vqa_template(tmp_path):
    ds = read_llava(llava_fixture(tmp_path), tmp_path, cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 2 and ds.dropped["text_only"] == 1
    first, second = ds[0], ds[1]
    assert first["segments"] == [
        {"text": format_prompt("vqa_sft", question="What is the man holding?"), "supervise": False},
        {"text": sft_target("vqa_sft", answer="A cup."), "supervise": True},
    ]
    assert sample_text(first).startswith("You are a helpful assistant.\n\n ## USER: Based on the image, please answer")
    assert sample_text(first).endswith(MARK + "What is the man holding?\n ## ASSISTANT:  The answer is A cup.</s>")
    assert MARK in second["segments"][0]["text"] and second["segments"][1]["text"] == " On the street.</s>"
    assert len(first["images"]) == 1 and first["source"] == "llava"


def test_llava_keep_multi_turn_chat_layout(tmp_path, processor):
    ds = read_llava(llava_fixture(tmp_path), tmp_path, multi_turn="keep", use_datasets=False)
    assert len(ds) == 1
    sample = ds[0]
    assert [s["supervise"] for s in sample["segments"]] == [False, True, False, True]
    messages = [
        {"role": "user", "content": "<image>\nWhat is the man holding?"},
        {"role": "assistant", "content": "A cup."},
        {"role": "user", "content": "Where is the red car parked?"},
        {"role": "assistant", "content": "On the street."},
    ]
    assert sample_text(sample) == processor.apply_chat_template(messages, tokenize=False)


# ---------------------------------------------------------------- masks: RLE and polygons


def test_rle_decoding_hand_checked():
    # 3 x 4 mask, column-major runs: 2 zeros ((0,0), (1,0)), 3 ones ((2,0), (0,1), (1,1)), 7 zeros
    mask = decode_rle({"size": [3, 4], "counts": [2, 3, 7]})
    expected = np.array([[0, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(decode_rle({"size": [3, 4], "counts": "237"}), expected)  # one char each
    # from the 4th count on, the difference to the count two places back is stored
    assert rle_counts_from_string("2371") == [2, 3, 7, 4]  # 4 - 3 = 1 -> '1'
    assert rle_counts_from_string("561L") == [5, 6, 1, 2]  # 2 - 6 = -4 -> 28 (sign bit 0x10) + 48 -> 'L'
    assert rle_counts_from_string("X1") == [40]  # 40 = 8 + 1 * 32: 8 | 0x20 (more) -> 'X', then 1 -> '1'
    np.testing.assert_array_equal(
        decode_rle({"size": [4, 4], "counts": "2371"}),
        np.array([[0, 1, 0, 1], [0, 0, 0, 1], [1, 0, 0, 1], [1, 0, 0, 1]], dtype=bool),  # runs 2, 3, 7, 4 down columns
    )
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((7, 9)) < 0.4
        for compressed in (True, False):
            np.testing.assert_array_equal(decode_rle(encode_rle(m, compressed)), m)
    assert rle_counts_to_string([2, 3, 7, 4]) == "2371" and rle_counts_to_string([5, 6, 1, 2]) == "561L"
    with pytest.raises(ValueError, match="sum to"):
        decode_rle({"size": [3, 4], "counts": [2, 3]})


def test_polygon_rasterisation_hand_checked():
    rect = polygons_to_mask([[1, 1, 5, 1, 5, 3, 1, 3]], 5, 7)  # pixels x 1..4, y 1..2: area 8 as the polygon
    expected = np.zeros((5, 7), dtype=bool)
    expected[1:3, 1:5] = True
    np.testing.assert_array_equal(rect, expected)
    tri = polygons_to_mask([[0, 0, 4, 0, 0, 4]], 4, 4)  # right triangle: centres with x + y < 4
    np.testing.assert_array_equal(tri, np.add.outer(np.arange(4) + 0.5, np.arange(4) + 0.5) < 4)
    two = polygons_to_mask([[0, 0, 1, 0, 1, 1, 0, 1], [3, 3, 4, 3, 4, 4, 3, 4]], 4, 4)  # union
    assert two.sum() == 2 and two[0, 0] and two[3, 3]


# ---------------------------------------------------------------- referring (§3.4 mask SFT, §6.5)


def write_coco(tmp_path, width=8, height=6, entry_size=None, rle_size=None):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    (tmp_path / "imgs" / "a.png").write_bytes(image_bytes(width, height, fmt="PNG"))
    region = np.zeros((height, width), dtype=bool)
    region[2:4, 5:7] = True
    ew, eh = entry_size or (width, height)
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "width": ew, "height": eh}, {"id": 8, "file_name": "b.png"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 2, "segmentation": encode_rle(region, True), "iscrowd": 1},
            {
                "id": 3,
                "image_id": 7,
                "category_id": 2,
                "segmentation": encode_rle(region, False),
                "caption": "The right box",
            },
        ],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "box"}],
    }
    if rle_size is not None:
        coco["annotations"][1]["segmentation"]["size"] = rle_size
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return path, region


def test_referring_masks_and_conversation(tmp_path):
    path, region = write_coco(tmp_path)
    ds = read_referring(path, tmp_path / "imgs")
    assert len(ds) == 1 and ds.dropped["no_regions"] == 1  # image 8 has no annotations
    sample = ds[0]
    assert len(sample["images"]) == 4 and sample_text(sample).count(MARK) == 4
    masks = sample["image_masks"]
    assert masks[0].all() and masks[0].shape == (6, 8)  # the whole image first
    rect = np.zeros((6, 8), dtype=bool)
    rect[1:3, 1:4] = True
    np.testing.assert_array_equal(masks[1], rect)
    np.testing.assert_array_equal(masks[2], region)
    np.testing.assert_array_equal(masks[3], region)
    segs = sample["segments"]
    assert [s["supervise"] for s in segs] == [False, True] * 3
    assert segs[0]["text"].startswith("You are a helpful assistant.\n\n ## user: " + MARK + "\nIn the image there are")
    assert segs[0]["text"].endswith("What is region1?\n ## asistant:")
    assert [s["text"] for s in segs[1::2]] == [" dog</s>", " box</s>", " The right box</s>"]
    assert segs[4]["text"] == " ## user: Please describe region3.\n ## asistant:"


def test_referring_mask_mismatch_skip_and_raise(tmp_path, caplog):
    path, _ = write_coco(tmp_path, entry_size=(10, 6))  # the annotation says 10 wide, the file is 8 wide
    ds = read_referring(path, tmp_path / "imgs")
    with pytest.raises(DataError, match="none of the 1 records"):
        ds[0]
    assert ds.skipped["mask_mismatch"] == 1
    with pytest.raises(DataError, match=r"image id 7 \(a\.png\): .*a\.png is 6x8 \(HxW\) but the annotation says 6x10"):
        read_referring(path, tmp_path / "imgs", on_error="raise")[0]
    path, _ = write_coco(tmp_path, rle_size=[6, 9])
    with pytest.raises(DataError, match=r"annotation 2: .*size"):
        read_referring(path, tmp_path / "imgs", on_error="raise")[0]
    with caplog.at_level(logging.WARNING, logger="deem.trainers.data"):
        assert list(read_referring(path, tmp_path / "imgs", streaming=True)) == []
    assert "mask_mismatch" in caplog.text and "1 skipped for this reason" in caplog.text


# ---------------------------------------------------------------- collator: labels, flips, masks


def test_collator_labels_follow_segments_and_section_4_1(processor):
    image = PIL.Image.new("RGB", (40, 30), (255, 0, 0))
    sft = {
        "segments": [
            {"text": format_prompt("vqa_sft", question="What is it?"), "supervise": False},
            {"text": sft_target("vqa_sft", answer="yes"), "supervise": True},
        ],
        "images": [image],
        "image_masks": None,
        "source": "llava",
    }
    doc = make_sample(MARK + "the cat" + MARK + "a dog</s>", [image, image])
    batch = DeemDataCollator(processor, seed=0)([sft, doc])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "num_images", "pixel_values", "pixel_values_decoder"}
    assert batch["num_images"].tolist() == [1, 2] and batch["pixel_values"].shape == (3, 3, 32, 32)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    tok = processor.tokenizer
    supervised = [t for t in labels[0].tolist() if t != -100]
    assert tok.decode(supervised) == "yes</s>" or tok.convert_ids_to_tokens(supervised) == ["▁yes", "</s>"]
    row = ids[1][mask[1] == 1].tolist()
    lab = labels[1][mask[1] == 1].tolist()
    assert row[1] == processor.soi_token_id and lab[1] == -100  # an image opening the document: no loss
    second_soi = [p for p, t in enumerate(row) if t == processor.soi_token_id][1]
    assert lab[second_soi] == processor.soi_token_id  # a soi after text is predicted
    assert all(lab[p] == -100 for p, t in enumerate(row) if t in (processor.image_token_id, tok.bos_token_id))
    assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == tok.pad_token_id).all()
    # pretraining rows: exactly the model's default_labels
    from types import SimpleNamespace

    from deem.modeling.modeling_deem import default_labels

    cfg = SimpleNamespace(
        image_token_id=processor.image_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        soi_token_id=processor.soi_token_id,
    )
    assert torch.equal(default_labels(ids[1:], mask[1:], cfg), labels[1:])
    left = DeemDataCollator(processor, padding_side="left", train_transforms=False)([sft, doc])
    assert (left["input_ids"][:, -1] == tok.eos_token_id).all() and left["attention_mask"][:, -1].all()
    assert torch.equal(left["attention_mask"].sum(1), mask.sum(1)) and not left["attention_mask"][:, 0].all()


def test_collator_same_flip_for_both_views_and_mask(processor):
    left_red = np.zeros((32, 32, 3), dtype=np.uint8)
    left_red[:, :16] = (255, 0, 0)
    left_red[:, 16:] = (0, 0, 255)
    image = PIL.Image.fromarray(left_red)
    mask = np.zeros((32, 32), dtype=bool)
    mask[:, :16] = True
    samples = [make_sample(MARK + "a dog</s>", [image], [mask]) for _ in range(16)]
    batch = DeemDataCollator(processor, seed=0)(samples)
    enc, dec, masks = batch["pixel_values"], batch["pixel_values_decoder"], batch["image_masks"]
    enc_left_red = enc[:, 0, :, :16].mean((1, 2)) > 0.5
    dec_left_red = dec[:, 0, :, :16].mean((1, 2)) > 0.5
    mask_left = masks[:, 0, :, :16].mean((1, 2)) > 0.5
    assert torch.equal(enc_left_red, dec_left_red) and torch.equal(enc_left_red, mask_left)
    assert 0 < int(enc_left_red.sum()) < 16  # both orientations occur
    again = DeemDataCollator(processor, seed=0)(samples)["pixel_values"]
    assert torch.equal(again, enc)  # seeded
    plain = DeemDataCollator(processor, train_transforms=False)(samples)
    assert bool((plain["pixel_values"][:, 0, :, :16].mean((1, 2)) > 0.5).all())


def test_collator_center_crop_option(processor):
    wide = np.zeros((32, 64, 3), dtype=np.uint8)
    wide[:, :16] = (255, 0, 0)  # red only in the left quarter: cropped away by the centre crop
    sample = make_sample(MARK + "a dog</s>", [PIL.Image.fromarray(wide)])
    squashed = DeemDataCollator(processor, train_transforms=False)([sample])["pixel_values"]
    cropped = DeemDataCollator(processor, train_transforms=False, center_crop=True)([sample])["pixel_values"]
    assert squashed[0, 0, :, :4].mean() > 0.9 and cropped[0, 0].max() < 0.1


def test_collator_masks_only_when_given(processor):
    image = PIL.Image.new("RGB", (8, 6))
    with_mask = make_sample(MARK + "a dog</s>", [image], [np.ones((6, 8), dtype=bool)])
    without = make_sample(MARK + "a cat</s>", [image])
    batch = DeemDataCollator(processor, train_transforms=False)([with_mask, without])
    assert batch["image_masks"].shape == (2, 1, 32, 32) and bool((batch["image_masks"] == 1).all())
    assert "image_masks" not in DeemDataCollator(processor)([without])


# ---------------------------------------------------------------- packing (§6.4)


def check_rows(rows, processor, max_length):
    for row in rows:
        ids = tokenize_text(processor, sample_text(row))
        assert len(ids) <= max_length
        soi = [p for p, t in enumerate(ids) if t == processor.soi_token_id]
        assert len(soi) == len(row["images"])
        for p in soi:  # every image complete: its Q placeholders follow
            assert ids[p + 1 : p + 1 + Q] == [processor.image_token_id] * Q
        assert ids.count(processor.image_token_id) == Q * len(soi)


def test_packing_respects_max_length_and_never_splits_an_image(processor):
    rng = np.random.default_rng(0)
    words = ["the cat", "a dog", "the river", "two people", "a red bus", "the green field"]
    docs = []
    for d in range(30):
        parts = []
        for _ in range(int(rng.integers(1, 7))):
            parts.append(" ".join(rng.choice(words, int(rng.integers(1, 4)))))
            parts.append(MARK)
        text = "".join(parts[: int(rng.integers(1, len(parts) + 1))]) + "</s>"
        docs.append(make_sample(text, [PIL.Image.new("RGB", (8, 8))] * text.count(MARK), source="mmc4"))
    docs.append(make_sample("only text here</s>", []))
    for split_to_fill in (True, False):
        rows = list(pack_samples(docs, processor, 40, split_to_fill=split_to_fill, drop_text_only=False))
        check_rows(rows, processor, 40)
        flat = lambda s: "".join(s.split())  # noqa: E731
        assert flat("".join(sample_text(r).replace("<s>", "") for r in rows)) == flat(
            "".join(sample_text(d) for d in docs)
        )
        assert sum(len(r["images"]) for r in rows) == sum(len(d["images"]) for d in docs)
        assert all(r["segments"][0]["supervise"] for r in rows)
        if split_to_fill:  # rows are filled: all but the last leave less room than the next atom needs
            assert len(rows) < len(docs)
    rows = list(pack_samples(docs, processor, 40, max_images=2))
    assert all(1 <= len(r["images"]) <= 2 for r in rows)  # text-only rows dropped for pretraining
    # a document split over rows continues in a row that starts with its image (cut before the soi)
    long_doc = make_sample("the cat" + (MARK + "a dog and the cat") * 6 + "</s>", [PIL.Image.new("RGB", (8, 8))] * 6)
    rows = list(pack_samples([long_doc], processor, 30))
    assert len(rows) > 1 and all(sample_text(r).startswith(MARK) for r in rows[1:])
    check_rows(rows, processor, 30)


def test_packed_dataset_over_a_reader(tmp_path, processor):
    tars = write_pair_tars(tmp_path, 1, 12)
    packed = PackedDataset(read_pairs(tars, shuffle=False), processor, 48)
    rows = list(packed)
    check_rows(rows, processor, 48)
    assert sum(len(r["images"]) for r in rows) == 12 and len(rows) < 12
    assert all(r["source"] == "pairs" for r in rows)
    assert sample_text(rows[1]).count("<s>") >= 1  # documents after the first start with <s>
    batch = DeemDataCollator(processor, max_length=48)(rows)
    assert batch["input_ids"].shape[1] <= 48 and batch["num_images"].sum() == 12


# ---------------------------------------------------------------- mixing and sharding


def text_samples(name, n):
    return [make_sample(f"{name} {k}</s>", [], source=name) for k in range(n)]


def test_mixing_ratio_determinism_and_epochs():
    sources = {"mmc4": SampleList(text_samples("mmc4", 3000)), "pairs": SampleList(text_samples("pairs", 3000))}
    mixed = MixedDataset(sources, seed=0)  # default weights mmc4 : pairs = 2 : 1
    draws = [s["source"] for _, s in zip(range(1500), mixed)]
    assert 0.62 < draws.count("mmc4") / len(draws) < 0.72
    again = [s["source"] for _, s in zip(range(1500), MixedDataset(sources, seed=0))]
    assert again == draws
    mixed.set_epoch(1)
    assert [s["source"] for _, s in zip(range(1500), mixed)] != draws
    batched = [s["source"] for _, s in zip(range(400), MixedDataset(sources, {"mmc4": 1, "pairs": 1}, per_batch=4))]
    assert all(len(set(batched[i : i + 4])) == 1 for i in range(0, 400, 4))
    small = {"a": SampleList(text_samples("a", 5)), "b": SampleList(text_samples("b", 50))}
    assert len(list(MixedDataset(small, {"a": 1, "b": 1}))) == 55  # longest: every sample once
    assert len(list(MixedDataset(small, {"a": 1, "b": 1}, stopping="shortest"))) < 55
    cycled = [s["source"] for _, s in zip(range(200), MixedDataset(small, {"a": 1, "b": 1}, stopping="cycle"))]
    assert len(cycled) == 200 and cycled.count("a") > 50


def read_keys(dataset):
    loader = DataLoader(dataset, batch_size=None, num_workers=2, collate_fn=lambda s: s)
    return [sample_text(s) for s in loader]


@pytest.mark.parametrize("n_shards,split", [(6, "auto"), (3, "auto"), (6, "record")])
def test_sharding_two_ranks_two_workers_disjoint_and_complete(tmp_path, n_shards, split):
    tars = write_pair_tars(tmp_path, n_shards, 4)
    common = dict(text_drop_prob=0.0, seed=5, split=split, world_size=2)
    per_rank = [read_keys(read_pairs(tars, rank=r, **common)) for r in range(2)]
    everything = {sample_text(s) for s in read_pairs(tars, text_drop_prob=0.0, seed=5)}
    assert len(everything) == 4 * n_shards
    assert all(len(keys) == len(set(keys)) for keys in per_rank)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == everything
    assert per_rank[0] and per_rank[1]
    # deterministic: the same seed and epoch give the same stream
    assert read_keys(read_pairs(tars, rank=0, **common)) == per_rank[0]


def test_sharding_map_style_streaming_view_and_mixture(tmp_path):
    path, _ = write_coco(tmp_path)
    llava = read_llava(llava_fixture(tmp_path), tmp_path, use_datasets=False)
    views = [llava.streaming(rank=r, world_size=2, chunk_size=1) for r in range(2)]
    texts = [read_keys(v) for v in views]
    assert sorted(texts[0] + texts[1]) == sorted(sample_text(llava[i]) for i in range(len(llava)))
    assert not set(texts[0]) & set(texts[1])
    tars = write_pair_tars(tmp_path, 4, 3)
    mixed = [
        MixedDataset({"pairs": read_pairs(tars, rank=r, world_size=2, text_drop_prob=0), "llava": views[r]}, seed=1)
        for r in range(2)
    ]
    got = [read_keys(m) for m in mixed]
    assert not set(got[0]) & set(got[1]) and len(got[0]) + len(got[1]) == 12 + 2


def _distributed_reader(rank, tars, out_dir, init_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        keys = read_keys(read_pairs(tars, text_drop_prob=0.0, seed=3))
        (out_dir / f"rank{rank}.json").write_text(json.dumps(keys))
    finally:
        torch.distributed.destroy_process_group()


def test_sharding_reads_the_torch_distributed_rank(tmp_path):
    tars = write_pair_tars(tmp_path, 5, 2)
    torch.multiprocessing.start_processes(
        _distributed_reader, args=(tars, tmp_path, tmp_path / "init"), nprocs=2, start_method="fork"
    )
    keys = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert keys[0] and keys[1] and not set(keys[0]) & set(keys[1]) and len(keys[0]) + len(keys[1]) == 10


def test_streaming_data_is_a_datasets_iterable_dataset_sharded_by_its_units(tmp_path, processor):
    import datasets
    from datasets.distributed import split_dataset_by_node

    tars = write_pair_tars(tmp_path, 6, 2)
    pairs = read_pairs(tars, text_drop_prob=0.0, seed=1)
    packed = PackedDataset(read_pairs(tars, seed=1), processor, 64)
    mixed = MixedDataset({"pairs": pairs, "text": SampleList(text_samples("text", 4), chunk_size=1)}, seed=0)
    for ds, shards in ((pairs, 6), (packed, 6), (mixed, 4)):  # a mixture has its smallest source's shard count
        assert isinstance(ds, datasets.IterableDataset) and ds.n_shards == shards
    everything = sorted(sample_text(s) for s in pairs)
    assert len(everything) == 12
    # datasets' own split by node: disjoint, complete, and the same as the readers' rank / world_size arguments
    for strategy, world in (("auto", 2), ("auto", 4), ("examples", 2)):  # 6 shards over 4 ranks: by examples
        parts = [[sample_text(s) for s in split_dataset_by_node(pairs, r, world, strategy)] for r in range(world)]
        assert sorted(sum(parts, [])) == everything and all(parts), (strategy, world)
    by_rank = [read_pairs(tars, text_drop_prob=0.0, seed=1, rank=r, world_size=3) for r in range(3)]
    assert [ds.node_split for ds in by_rank] == [(0, 3), (1, 3), (2, 3)] and by_rank[0].n_shards == 2
    assert sorted(sample_text(s) for ds in by_rank for s in ds) == everything
    unsplit = by_rank[1].without_node_split()
    assert type(unsplit) is type(pairs) and unsplit.node_split is None
    assert sorted(sample_text(s) for s in unsplit) == everything
    with pytest.raises(ValueError, match="split by node differently"):
        MixedDataset({"a": by_rank[0], "b": SampleList(text_samples("b", 3))})
    with pytest.raises(TypeError, match="MixedDataset source 'a' needs a deem.trainers.data streaming source"):
        MixedDataset({"a": iter(text_samples("a", 3))})


def test_set_epoch_reshuffles_through_datasets_deterministically(tmp_path):
    tars = write_pair_tars(tmp_path, 4, 5)

    def order(epoch, **kw):
        ds = read_pairs(tars, text_drop_prob=0.0, seed=2, shuffle_buffer=8, **kw)
        ds.set_epoch(epoch)
        return [sample_text(s).replace(MARK, "").removesuffix("</s>") for s in ds]  # the captions, in order

    first = order(0)
    assert sorted(first) == sorted(order(0, shuffle=False)) and first != order(0, shuffle=False)
    assert order(0) == first and order(1) == order(1) and order(1) != first
    assert order(1, shuffle=False) == order(0, shuffle=False)  # no shuffling: the same order in every epoch
    # a never-ending mixture ("cycle") reshuffles each pass of its source
    cycled = MixedDataset({"a": SampleList(text_samples("a", 10), chunk_size=2)}, stopping="cycle", seed=0)
    passes = [[sample_text(s) for _, s in zip(range(10), it)] for it in [iter(cycled)] for _ in range(3)]
    assert all(sorted(p) == sorted(sample_text(s) for s in text_samples("a", 10)) for p in passes)
    assert len({tuple(p) for p in passes}) == 3


def test_accelerate_shards_the_stream_per_process(tmp_path):
    """What the Trainer's loader does with 2 processes and no dispatch: `shard(2, rank)` on our dataset (type
    kept, so `set_epoch` reaches the reader), and `IterableDatasetShard` when there are fewer shards than ranks."""
    from accelerate.data_loader import prepare_data_loader

    for n_shards, sharded in ((4, True), (1, False)):
        (tmp_path / str(n_shards)).mkdir()
        tars = write_pair_tars(tmp_path / str(n_shards), n_shards, 8 // n_shards)
        seen = []
        for rank in range(2):
            dataset = read_pairs(tars, text_drop_prob=0.0, seed=0)
            loader = DataLoader(dataset, batch_size=2, collate_fn=lambda s: s)
            loader = prepare_data_loader(
                loader, num_processes=2, process_index=rank, put_on_device=False, dispatch_batches=False
            )
            assert (type(loader.dataset) is type(dataset)) == sharded
            seen.append([sample_text(s) for batch in loader for s in batch])
        assert len(seen[0]) == len(seen[1]) == 4 and not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(sample_text(s) for s in read_pairs(tars, text_drop_prob=0.0))


# ---------------------------------------------------------------- bad input: skip counts and raise messages


def test_bad_images_mmc4_missing_and_corrupt(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good1.jpg").write_bytes(image_bytes())
    (images / "good2.jpg").write_bytes(image_bytes())
    (images / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    (images / "truncated.jpg").write_bytes(image_bytes(64, 64)[:200])
    doc = mmc4_doc(4, [("good1.jpg", 0, 0.5), ("gone.jpg", 1, 0.5), ("corrupt.jpg", 2, 0.5), ("good2.jpg", 3, 0.5)])
    path = write_jsonl(tmp_path / "docs.jsonl", [doc, mmc4_doc(2, [("truncated.jpg", 0, 0.5)]), "{broken json"])
    path.write_text(path.read_text().replace('"{broken json"', "{broken json"))
    with caplog.at_level(logging.WARNING, logger="deem.trainers.data"):
        ds = read_mmc4(path, images, shuffle=False)
        samples = list(ds)
    assert len(samples) == 1 and len(samples[0]["images"]) == 2  # the bad images are left out of the document
    assert ds.skipped == {"missing_image": 1, "corrupt_image": 2, "bad_record": 1}
    assert "gone.jpg" in caplog.text and "corrupt_image" in caplog.text and "docs.jsonl:3" in caplog.text
    with pytest.raises(DataError, match=r"docs\.jsonl:1.*gone\.jpg.*not found"):
        list(read_mmc4(path, images, shuffle=False, on_error="raise"))
    (tmp_path / "broken.jsonl.zip").write_bytes(b"PK\x03\x04 not really a zip")
    broken = read_mmc4(tmp_path / "broken.jsonl.zip", images)
    assert list(broken) == [] and broken.skipped["bad_record"] == 1
    with pytest.raises(DataError, match=r"broken\.jsonl\.zip: cannot read past line 0"):
        list(read_mmc4(tmp_path / "broken.jsonl.zip", images, on_error="raise"))
    only_corrupt = write_jsonl(tmp_path / "c.jsonl", [mmc4_doc(1, [("corrupt.jpg", 0, 0.5)])])
    with pytest.raises(DataError, match=r"corrupt\.jpg"):
        list(read_mmc4(only_corrupt, images, on_error="raise"))


def test_bad_too_many_images(tmp_path, processor):
    images = tmp_path / "images"
    images.mkdir()
    for k in range(8):
        (images / f"i{k}.jpg").write_bytes(image_bytes())
    path = write_jsonl(tmp_path / "d.jsonl", [mmc4_doc(8, [(f"i{k}.jpg", k, 0.5) for k in range(8)])])
    ds = read_mmc4(path, images, subsample_images=False)
    assert list(ds) == [] and ds.skipped["too_many_images"] == 1
    with pytest.raises(DataError, match=r"d\.jsonl:1: 8 usable images, more than max_images=6"):
        list(read_mmc4(path, images, subsample_images=False, on_error="raise"))
    image = PIL.Image.new("RGB", (8, 8))
    crowded = make_sample(MARK * 3 + "x</s>", [image] * 3)
    collator = DeemDataCollator(processor, max_images=2)
    batch = collator([crowded, make_sample(MARK + "y</s>", [image])])
    assert batch["input_ids"].shape[0] == 1 and collator.skipped["too_many_images"] == 1
    with pytest.raises(DataError, match="3 images, more than the limit of 2"):
        DeemDataCollator(processor, max_images=2, on_error="raise")([crowded])
    rec = [
        {
            "id": 1,
            "image": "x.jpg",
            "conversations": [{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}],
        }
    ]
    (tmp_path / "l.json").write_text(json.dumps(rec))
    with pytest.raises(DataError, match=r"l\.json: record 0 turn 0: 2 <image> markers for 1 image"):
        read_llava(tmp_path / "l.json", images, on_error="raise", use_datasets=False)[0]


def test_bad_too_long_text(tmp_path, processor):
    image = PIL.Image.new("RGB", (8, 8))
    long_text = make_sample("the cat " * 30 + MARK + "</s>", [image], source="pairs")
    short = make_sample(MARK + "a dog</s>", [image])
    collator = DeemDataCollator(processor, max_length=20)
    assert collator([long_text, short])["input_ids"].shape[0] == 1 and collator.skipped["too_long"] == 1
    with pytest.raises(DataError, match=r"collator: batch 1, sample 0 \(source pairs\): \d+ tokens, more than"):
        DeemDataCollator(processor, max_length=20, on_error="raise")([long_text])
    with pytest.raises(DataError, match="every sample of batch"):
        collator([long_text])
    packer_rows = list(pack_samples([long_text, short], processor, 20))
    assert len(packer_rows) == 1
    with pytest.raises(DataError, match="between two image boundaries"):
        list(pack_samples([long_text], processor, 20, on_error="raise"))
    tars = write_pair_tars(tmp_path, 1, 3, caption_fmt="the cat sits near the river number {k} " * 5)
    ds = read_pairs(tars, processor=processor, max_length=20)
    assert list(ds) == [] and ds.skipped["too_long"] == 3


def test_bad_masks_and_records_in_collator(processor):
    image = PIL.Image.new("RGB", (8, 6))
    wrong = make_sample(MARK + "a dog</s>", [image], [np.ones((5, 5), dtype=bool)])
    mismatch = make_sample(MARK + MARK + "a dog</s>", [image])
    good = make_sample(MARK + "a dog</s>", [image], [np.ones((6, 8), dtype=bool)])
    raw_token = make_sample("a <|sniffer|> dog</s>", [])
    collator = DeemDataCollator(processor)
    batch = collator([wrong, mismatch, good, None, raw_token])
    assert batch["input_ids"].shape[0] == 1 and collator.skipped == {"mask_mismatch": 1, "bad_record": 2}
    with pytest.raises(DataError, match=r"mask 0 has shape \(5, 5\) but its image is \(H, W\) = \(6, 8\)"):
        DeemDataCollator(processor, on_error="raise")([wrong])
    with pytest.raises(DataError, match="2 <image> markers but 1 images"):
        DeemDataCollator(processor, on_error="raise")([mismatch])
    with pytest.raises(ValueError, match="on_error"):
        DeemDataCollator(processor, on_error="ignore")


def test_bad_pairs_records(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        add_bytes(tar, "k1.jpg", image_bytes())
        add_bytes(tar, "k1.json", b'{"caption": "Fine"}')
        add_bytes(tar, "k2.json", b'{"caption": "no image"}')
        add_bytes(tar, "k3.jpg", b"garbage")
        add_bytes(tar, "k3.txt", b"corrupt image")
        add_bytes(tar, "k4.jpg", image_bytes())
    ds = read_pairs(path, shuffle=False)
    assert len(list(ds)) == 1
    assert ds.skipped == {"missing_image": 1, "corrupt_image": 1, "bad_record": 1}
    with pytest.raises(DataError, match=r"bad\.tar:k2: sample k2 has no image member"):
        list(read_pairs(path, shuffle=False, on_error="raise"))
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 40)
    junk = read_pairs([path, tmp_path / "junk.tar"], shuffle=False)
    assert len(list(junk)) == 1 and junk.skipped["bad_record"] == 2  # k4 has no caption; junk.tar is unreadable
    (tmp_path / "imgs").mkdir()
    jl = write_jsonl(tmp_path / "p.jsonl", [{"image": "nope.jpg", "caption": "x"}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: image file 'nope\.jpg' not found"):
        list(read_pairs(jl, tmp_path / "imgs", on_error="raise"))


def test_bad_llava_missing_image_is_replaced_by_next(tmp_path):
    path = llava_fixture(tmp_path)
    records = json.loads(path.read_text())
    records.insert(0, dict(records[0], id="gone", image="coco/missing.jpg"))
    path.write_text(json.dumps(records))
    ds = read_llava(path, tmp_path, use_datasets=False)
    assert len(ds) == 4 and sample_text(ds[0]) == sample_text(ds[2])  # the next usable item stands in
    assert ds.skipped["missing_image"] == 2  # both turns of the bad record were tried
    with pytest.raises(DataError, match=r"record 0 turn 0: image file 'coco/missing\.jpg' not found"):
        read_llava(path, tmp_path, use_datasets=False, on_error="raise")[0]


# ---------------------------------------------------------------- end to end: readers -> packing -> mixing -> model


def test_batches_run_through_the_model(tmp_path):
    from conftest import tiny_config

    from deem import DeemForInterleavedGeneration

    tok = prepare_tokenizer(build_test_tokenizer())
    text = tiny_config().text_config.to_dict()
    keep = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
    )
    names = {
        "soi": "<|startofimage|>",
        "image": "<|sniffer|>",
        "ref_start": "<ref>",
        "ref_end": "</ref>",
        "box_start": "<box>",
        "box_end": "</box>",
    }
    config = tiny_config(
        text_config={k: text[k] for k in keep} | {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id},
        original_vocab_size=tok.vocab_size,
        pad_token_id=tok.pad_token_id,
        **{f"{k}_token_id": tok.convert_tokens_to_ids(v) for k, v in names.items()},
    )
    torch.manual_seed(0)
    model = DeemForInterleavedGeneration(config).train().requires_grad_(False)  # forward only: a data check
    image_processor = DeemImageProcessor(size=64, decoder_size=32)
    processor = DeemProcessor(image_processor, tok, num_image_tokens=config.num_image_tokens)

    images = tmp_path / "images"
    images.mkdir()
    for k in range(3):
        (images / f"img{k:02d}.jpg").write_bytes(image_bytes(32 + k))
    docs = [mmc4_doc(3, [(f"img{k:02d}.jpg", k, 0.5) for k in range(3)]) for _ in range(4)]
    mmc4 = PackedDataset(read_mmc4(write_jsonl(tmp_path / "d.jsonl", docs), images), processor, 96, max_images=4)
    pairs = PackedDataset(read_pairs(write_pair_tars(tmp_path, 2, 3)), processor, 96, max_images=4)
    mixed = MixedDataset({"mmc4": mmc4, "pairs": pairs}, seed=0)
    loader = DataLoader(mixed, batch_size=2, num_workers=0, collate_fn=DeemDataCollator(processor, 96, seed=0))
    batch = next(iter(loader))
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss_ntp is not None and out.loss_csr is not None

    path, _ = write_coco(tmp_path)
    referring = read_referring(path, tmp_path / "imgs")
    batch = DeemDataCollator(processor, 256, train_transforms=False)([referring[0]])
    assert batch["image_masks"].shape == (4, 1, 64, 64)
    out = model(**batch, loss_nip_weight=0.0, loss_csr_weight=0.0)
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------- the readers read through kept libraries


def test_mmc4_compressed_and_zipped_jsonl_read_equal_to_plain(tmp_path):
    import bz2
    import gzip
    import lzma

    images = tmp_path / "images"
    images.mkdir()
    for k in range(4):
        (images / f"img{k:02d}.jpg").write_bytes(image_bytes(32 + k))
    docs = [mmc4_doc(3, [(f"img{(d + j) % 4:02d}.jpg", j, 0.5) for j in range(2)]) for d in range(6)]
    plain = write_jsonl(tmp_path / "docs.jsonl", docs)
    raw = plain.read_bytes()
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "docs.jsonl.bz2").write_bytes(bz2.compress(raw))  # fsspec's compression inference
    (tmp_path / "docs.jsonl.xz").write_bytes(lzma.compress(raw))
    lines = raw.decode().splitlines(keepends=True)
    with zipfile.ZipFile(tmp_path / "docs.zip", "w") as archive:  # two members, read in name order
        archive.writestr("part_b.jsonl", "".join(lines[3:]))
        archive.writestr("part_a.jsonl", "".join(lines[:3]))

    def read(name):
        return [(sample_text(s), [width_of(im) for im in s["images"]]) for s in read_mmc4(tmp_path / name, images)]

    expected = read("docs.jsonl")
    assert len(expected) == 6
    for name in ("docs.jsonl.gz", "docs.jsonl.bz2", "docs.jsonl.xz", "docs.zip"):
        assert read(name) == expected, name
    bad = raw.decode().replace(json.dumps(docs[1]), "{broken json", 1).encode()
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(bad))
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:2: not valid JSON"):
        list(read_mmc4(tmp_path / "bad.jsonl.gz", images, shuffle=False, on_error="raise"))


def test_pairs_tars_read_through_webdataset(tmp_path, monkeypatch):
    import webdataset.tariterators as wds_tar

    calls = []
    real = wds_tar.group_by_keys
    monkeypatch.setattr(wds_tar, "group_by_keys", lambda *a, **k: calls.append(1) or real(*a, **k))
    (path,) = write_pair_tars(tmp_path, 1, 12)
    with open(path, "rb") as src, tarfile.open(tmp_path / "00000.tar.gz", "w:gz") as dst:
        with tarfile.open(fileobj=src) as tar:
            for member in tar:
                dst.addfile(member, tar.extractfile(member))
    texts = [sample_text(s) for s in read_pairs(path, shuffle=False)]
    assert len(texts) == 12 and [sample_text(s) for s in read_pairs(tmp_path / "00000.tar.gz", shuffle=False)] == texts
    assert len(calls) == 2  # each shard grouped by webdataset, not by a loop of ours
    data = open(path, "rb").read()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])  # truncated inside a member
    cut = read_pairs(tmp_path / "cut.tar", shuffle=False)
    got = [sample_text(s) for s in cut]
    assert 0 < len(got) < 12 and got == texts[: len(got)] and cut.skipped == {"bad_record": 1}
    with pytest.raises(DataError, match=r"cut\.tar: tar shard is corrupt after \d+ samples"):
        list(read_pairs(tmp_path / "cut.tar", shuffle=False, on_error="raise"))


def test_llava_and_coco_json_read_through_datasets_and_fsspec(tmp_path, monkeypatch):
    import gzip

    import datasets

    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    path = llava_fixture(tmp_path)
    gz = tmp_path / "llava.json.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    plain = read_llava(path, tmp_path, cache_dir=str(tmp_path / "cache"))
    assert calls == ["json"] and not isinstance(plain.records, list)  # Arrow rows from datasets' json loader
    for ds in (
        read_llava(gz, tmp_path, cache_dir=str(tmp_path / "cache")),
        read_llava(gz, tmp_path, use_datasets=False),
    ):
        assert len(ds) == len(plain) and [ds[i]["segments"] for i in range(len(ds))] == [
            plain[i]["segments"] for i in range(len(plain))
        ]
    coco, region = write_coco(tmp_path)
    (tmp_path / "instances.json.gz").write_bytes(gzip.compress(coco.read_bytes()))
    a, b = (
        read_referring(coco, tmp_path / "imgs")[0],
        read_referring(tmp_path / "instances.json.gz", tmp_path / "imgs")[0],
    )
    assert a["segments"] == b["segments"] and all((x == y).all() for x, y in zip(a["image_masks"], b["image_masks"]))
