"""DeemImageProcessor, DeemProcessor, prompt templates: layouts, geometry, errors, save/load (reference §3, §6.1)."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizer_utils import build_test_tokenizer
from transformers import LlamaTokenizer
from transformers.testing_utils import CaptureLogger

from deem.modeling import processing_deem
from deem.modeling.image_processing_deem import DeemImageProcessor
from deem.modeling.processing_deem import DEEM_SPECIAL_TOKENS, DeemProcessor, prepare_tokenizer
from deem.modeling.prompts import PROMPT_KINDS, format_prompt, format_visdial, sft_target

Q = 4  # placeholders per image in these tests
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture
def tokenizer():
    return prepare_tokenizer(build_test_tokenizer())


@pytest.fixture
def processor(tokenizer):
    return DeemProcessor(DeemImageProcessor(size=32, decoder_size=64), tokenizer, num_image_tokens=Q)


def solid(color, size=(40, 30)):
    return PIL.Image.new("RGB", size, color)


def pieces(tokenizer, *texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


# ---------------------------------------------------------------- tokenizer preparation


def test_test_tokenizer_is_llama_style():
    tok = build_test_tokenizer()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok("The answer is yes.")["input_ids"]
    assert ids[0] == 1 and tok.convert_ids_to_tokens(ids[1]).startswith("▁")
    assert tok.decode(tok("Ünïcode 中", add_special_tokens=False)["input_ids"]) == "Ünïcode 中"  # byte fallback


def test_prepare_tokenizer_adds_consecutive_ids_and_pad(tokenizer):
    base = tokenizer.vocab_size
    assert tokenizer.convert_tokens_to_ids(list(DEEM_SPECIAL_TOKENS)) == list(range(base, base + 6))
    assert tokenizer.pad_token_id == tokenizer.unk_token_id
    assert len(prepare_tokenizer(tokenizer)) == base + 6  # idempotent
    assert tokenizer("<ref>", add_special_tokens=False)["input_ids"] == [base + 2]


def test_prepare_tokenizer_vicuna_sized_vocab_uses_pad_31999():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"p{i}": i for i in range(3, 32000)}
    tok = prepare_tokenizer(LlamaTokenizer(vocab=vocab, merges=[]))
    assert tok.convert_tokens_to_ids(list(DEEM_SPECIAL_TOKENS)) == list(range(32000, 32006))
    assert tok.pad_token_id == 31999


def test_processor_requires_prepared_tokenizer():
    with pytest.raises(ValueError, match="prepare_tokenizer"):
        DeemProcessor(DeemImageProcessor(), build_test_tokenizer())


# ---------------------------------------------------------------- token layout


def test_interleaved_layout_is_exact(processor, tokenizer):
    out = processor("A cat <image> sits on <image>the mat.", images=[solid(RED), solid(BLUE)])
    soi, img = processor.soi_token_id, processor.image_token_id
    assert (soi, img) == tuple(tokenizer.convert_tokens_to_ids(["<|startofimage|>", "<|sniffer|>"]))
    a, b, c = pieces(tokenizer, "A cat", "sits on", "the mat.")
    expected = [tokenizer.bos_token_id] + a + [soi] + [img] * Q + b + [soi] + [img] * Q + c
    assert out["input_ids"].tolist() == [expected]
    assert out["attention_mask"].tolist() == [[1] * len(expected)]
    assert out["num_images"].tolist() == [2] and out["num_images"].dtype == torch.int64
    # whitespace next to a marker is dropped: same ids without the spaces
    same = processor("A cat<image>sits on <image> the mat.", images=[solid(RED), solid(BLUE)])
    assert same["input_ids"].tolist() == [expected]
    with_eos = processor("A cat <image> sits on <image>the mat.", images=[solid(RED), solid(BLUE)], add_eos=True)
    assert with_eos["input_ids"][0].tolist() == expected + [tokenizer.eos_token_id]
    no_bos = processor("<image>the mat.", images=[solid(RED)], add_special_tokens=False)
    assert no_bos["input_ids"][0].tolist() == [soi] + [img] * Q + c


def test_special_strings_in_text(processor, tokenizer):
    out = processor("<ref>a dog</ref> at <box>(1,2)</box> yes</s>", images=None)
    ref, ref_end, box, box_end = (tokenizer.convert_tokens_to_ids(t) for t in DEEM_SPECIAL_TOKENS[2:])
    dog, at, coords, yes = pieces(tokenizer, "a dog", "at", "(1,2)", " yes")
    expected = [1, ref] + dog + [ref_end] + at + [box] + coords + [box_end] + yes + [tokenizer.eos_token_id]
    assert out["input_ids"][0].tolist() == expected
    assert "pixel_values" not in out and out["num_images"].tolist() == [0]


def test_raw_image_tokens_in_text_are_rejected(processor):
    with pytest.raises(ValueError, match=r"raw token <\|sniffer\|>.*<image>"):
        processor("look <|sniffer|>", images=None)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_sides(processor, tokenizer, side):
    texts = ["<image>short", "a much longer caption here <image> and more words after it"]
    images = [[solid(RED)], [solid(BLUE)]]
    single = [processor(t, images=i)["input_ids"][0].tolist() for t, i in zip(texts, images, strict=True)]
    out = processor(texts, images=images, padding_side=side)
    length = max(map(len, single))
    pad = tokenizer.pad_token_id
    for row, ids, mask in zip(single, out["input_ids"].tolist(), out["attention_mask"].tolist(), strict=True):
        n_pad = length - len(row)
        if side == "right":
            assert ids == row + [pad] * n_pad and mask == [1] * len(row) + [0] * n_pad
        else:
            assert ids == [pad] * n_pad + row and mask == [0] * n_pad + [1] * len(row)
    fixed = processor(texts, images=images, padding="max_length", max_length=length + 3, padding_side=side)
    assert fixed["input_ids"].shape == (2, length + 3)
    with pytest.raises(ValueError, match="different lengths"):
        processor(texts, images=images, padding=False)
    assert [len(r) for r in processor(texts, images=images, padding=False, return_tensors=None)["input_ids"]] == [
        len(r) for r in single
    ]


# ---------------------------------------------------------------- pixels


def test_pixel_shapes_ranges_and_order(processor):
    images = [[solid(RED)], [solid(GREEN), solid(BLUE, (17, 50))]]
    out = processor(["<image>one", "two <image> and <image>"], images=images)
    assert out["pixel_values"].shape == (3, 3, 32, 32) and out["pixel_values"].dtype == torch.float32
    assert out["pixel_values_decoder"].shape == (3, 3, 64, 64)
    assert out["num_images"].tolist() == [1, 2]
    for view in ("pixel_values", "pixel_values_decoder"):  # [0, 1], not normalised, row-major order
        means = out[view].mean(dim=(2, 3))
        torch.testing.assert_close(means, torch.eye(3), atol=1e-6, rtol=0)
    flat = processor(["<image>one", "two <image> and <image>"], images=[im for row in images for im in row])
    assert torch.equal(flat["pixel_values"], out["pixel_values"])
    assert "pixel_values_decoder" not in processor("<image>", images=[solid(RED)], return_decoder_view=False)
    ip = processor.image_processor
    assert ip.image_mean == [0.48145466, 0.4578275, 0.40821073]
    assert ip.image_std == [0.26862954, 0.26130258, 0.27577711]


def test_array_inputs_match_pil():
    ip = DeemImageProcessor(size=16, decoder_size=24)
    array = np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    reference = ip(PIL.Image.fromarray(array))["pixel_values"]
    chw = torch.from_numpy(array).permute(2, 0, 1)
    for variant in (array, chw, array / 255.0, chw.float() / 255):
        torch.testing.assert_close(ip(variant)["pixel_values"], reference, atol=1 / 255, rtol=0)
    batch = torch.from_numpy(np.stack([array, array])).permute(0, 3, 1, 2)
    assert ip(batch)["pixel_values"].shape == (2, 3, 16, 16)


def striped(width=64, height=32):
    """Columns [0, w/4) red, [w/4, 3w/4) green, [3w/4, w) blue."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 4] = RED
    array[:, width // 4 : 3 * width // 4] = GREEN
    array[:, 3 * width // 4 :] = BLUE
    return PIL.Image.fromarray(array)


def test_square_resize_and_center_crop_geometry():
    image = striped()
    squashed = DeemImageProcessor(size=16, decoder_size=32)(image)["pixel_values"][0]
    assert squashed.shape == (3, 16, 16)
    assert (squashed[0, :, :3] > 0.9).all() and (squashed[2, :, -3:] > 0.9).all()  # aspect not kept
    # 64x32 -> BOX halving to 32x16 (short side 32 >= 2*16) -> centre crop columns 8..23 = the green band
    cropped = DeemImageProcessor(size=16, decoder_size=32, do_center_crop=True)(image)
    torch.testing.assert_close(cropped["pixel_values"][0].mean(dim=(1, 2)), torch.tensor([0.0, 1.0, 0.0]))
    # the decoder view (32): no halving (16 < 64), resize short side 32 -> 32, crop columns 16..47 = green too
    torch.testing.assert_close(cropped["pixel_values_decoder"][0].mean(dim=(1, 2)), torch.tensor([0.0, 1.0, 0.0]))


def rect_image_and_mask(width=96, height=64, box=(32, 16, 64, 48)):
    """Grey image with a red rectangle `box` = (left, top, right, bottom); the mask is the same rectangle."""
    array = np.full((height, width, 3), 128, dtype=np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    left, top, right, bottom = box
    array[top:bottom, left:right] = RED
    mask[top:bottom, left:right] = True
    return PIL.Image.fromarray(array), mask


@pytest.mark.parametrize("center_crop", [False, True])
def test_mask_follows_image_geometry(center_crop):
    image, mask = rect_image_and_mask()
    ip = DeemImageProcessor(size=32, decoder_size=64, do_center_crop=center_crop)
    out = ip([image, image], image_masks=[mask, None])
    masks = out["image_masks"]
    assert masks.shape == (2, 1, 32, 32) and masks.dtype == torch.float32
    assert torch.equal(masks[1], torch.ones(1, 32, 32))
    expected = torch.zeros(32, 32)
    if center_crop:  # 96x64 -> 48x32 (halved) -> crop columns 8..40: rectangle at rows 8..23, columns 8..23
        expected[8:24, 8:24] = 1
    else:  # 96x64 -> 32x32: columns scale by 1/3, rows by 1/2
        expected[8:24, 11:21] = 1
    assert torch.equal(masks[0, 0], expected)
    red = (out["pixel_values"][0, 0] > 0.9) & (out["pixel_values"][0, 1] < 0.1)
    assert torch.equal(red[expected.bool()], torch.ones(int(expected.sum()), dtype=torch.bool))


def test_flip_is_shared_by_all_views_and_mask_and_seeded():
    image, mask = rect_image_and_mask(box=(0, 0, 48, 64))  # left half red
    ip = DeemImageProcessor(size=32, decoder_size=64, do_flip=True)
    out = ip([image] * 16, image_masks=[mask] * 16, generator=123)
    enc_flipped = out["pixel_values"][:, 0, 16, -1] > 0.9
    dec_flipped = out["pixel_values_decoder"][:, 0, 32, -1] > 0.9
    mask_flipped = out["image_masks"][:, 0, 16, -1] > 0.5
    assert torch.equal(enc_flipped, dec_flipped) and torch.equal(enc_flipped, mask_flipped)
    assert 0 < int(enc_flipped.sum()) < 16
    again = ip([image] * 16, image_masks=[mask] * 16, generator=torch.Generator().manual_seed(123))
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert not DeemImageProcessor(size=32)(image)["pixel_values"][0, 0, 16, -1] > 0.9  # default: no flip


def test_processor_passes_masks_and_flip_options(processor):
    image, mask = rect_image_and_mask()
    texts, images, masks = ["<image> region <image>", "<image>"], [[image, image], [image]], [[None, mask], [mask]]
    out = processor(texts, images=images, image_masks=masks)
    assert out["image_masks"].shape == (3, 1, 32, 32)
    assert out["image_masks"][0].min() == 1 and out["image_masks"][1].sum() == out["image_masks"][2].sum() > 0
    flipped = processor("<image>" * 8, images=[image] * 8, do_flip=True, generator=0)["pixel_values"]
    assert torch.equal(flipped, processor("<image>" * 8, images=[image] * 8, do_flip=True, generator=0)["pixel_values"])


def test_postprocess():
    ip = DeemImageProcessor()
    images = torch.stack([torch.full((3, 4, 5), -1.0), torch.ones(3, 4, 5)])
    pil = ip.postprocess(images, do_denormalize=True)
    assert [im.size for im in pil] == [(5, 4), (5, 4)]
    assert np.asarray(pil[0]).max() == 0 and np.asarray(pil[1]).min() == 255
    assert ip.postprocess(torch.full((3, 2, 2), 0.5), output_type="np")[0, 0, 0].tolist() == [128, 128, 128]
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        ip.postprocess(torch.zeros(1, 4, 2, 2))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (np.zeros((8, 8, 4), dtype=np.uint8), ValueError, r"3 \(RGB\) channels.*\(8, 8, 4\)"),
        (torch.zeros(1, 8, 8), ValueError, r"3 \(RGB\) channels"),
        (np.zeros((8, 8), dtype=np.uint8), ValueError, r"3 dimensions.*\(8, 8\)"),
        (np.zeros((2, 8, 8, 3, 1)), ValueError, "3 dimensions"),
        (np.full((4, 4, 3), "a"), TypeError, "non-numeric dtype"),
        (np.zeros((4, 4, 3), dtype=bool), TypeError, "boolean dtype"),
        (np.full((4, 4, 3), 255.0), ValueError, r"float image 0 must lie in \[0, 1\]"),
        (np.full((4, 4, 3), 300), ValueError, r"\[0, 255\]"),
        (5, TypeError, "unsupported type int"),
    ],
)
def test_bad_images(bad, error, message):
    with pytest.raises(error, match=message):
        DeemImageProcessor(size=8)([bad])


def test_bad_masks():
    ip = DeemImageProcessor(size=8)
    image = solid(RED, (10, 6))
    with pytest.raises(ValueError, match=r"mask 0 has shape \(10, 6\) but its image is \(H, W\) = \(6, 10\)"):
        ip([image], image_masks=[np.ones((10, 6))])
    with pytest.raises(ValueError, match="got 1 image masks for 2 images"):
        ip([image, image], image_masks=[None])
    with pytest.raises(TypeError, match="mask 0 has non-numeric dtype"):
        ip([image], image_masks=[np.full((6, 10), "x")])
    with pytest.raises(ValueError, match=r"float mask 0 must lie in \[0, 1\]"):
        ip([image], image_masks=[np.full((6, 10), 2.0)])


def test_marker_and_image_count_errors(processor):
    image = solid(RED)
    with pytest.raises(ValueError, match=r"2 <image> markers in total.*\[1, 1\].*but 1 images"):
        processor(["<image>a", "b<image>"], images=[image])
    with pytest.raises(ValueError, match="1 <image> markers in total.*but 0 images"):
        processor("<image>", images=None)
    with pytest.raises(ValueError, match="row 1 has 1 <image> markers but 0 images"):
        processor(["<image>a", "b<image>"], images=[[image], []])
    with pytest.raises(ValueError, match="per row for 1 rows but there are 2 texts"):
        processor(["<image>a", "b"], images=[[image]])
    with pytest.raises(ValueError, match="row 0 has 2 <image> markers but 1 image masks"):
        processor(["<image><image>"], images=[[image, image]], image_masks=[[None]])
    with pytest.raises(ValueError, match="but 1 image masks were given"):
        processor("<image><image>", images=[image, image], image_masks=[None])
    with pytest.raises(TypeError, match="text must be"):
        processor([1, 2])


def test_max_length_and_truncation(processor, tokenizer):
    text, image = "some words <image> more words", solid(RED)
    full = processor(text, images=[image])["input_ids"][0].tolist()
    soi_at = full.index(processor.soi_token_id)
    with pytest.raises(ValueError, match=f"row 0 has {len(full)} tokens, more than max_length={len(full) - 1}"):
        processor(text, images=[image], max_length=len(full) - 1)
    # a cut inside the image's run moves before its <|startofimage|> and drops the image, with a warning
    with CaptureLogger(processing_deem.logger) as captured:
        cut = processor(text, images=[image], max_length=soi_at + 2, truncation=True)
    assert "drops 1 image(s)" in captured.out
    assert cut["input_ids"][0].tolist() == full[:soi_at]
    assert cut["num_images"].tolist() == [0] and "pixel_values" not in cut
    # a cut right after the image keeps it
    kept = processor(text, images=[image], max_length=soi_at + 1 + Q, truncation=True)
    assert kept["input_ids"][0].tolist() == full[: soi_at + 1 + Q] and kept["pixel_values"].shape[0] == 1
    # per row: only the image that does not fit is dropped, images stay in row-major order
    two = processor(
        ["<image>x", "<image> y <image> z"],
        images=[solid(RED), solid(GREEN), solid(BLUE)],
        max_length=1 + (1 + Q) + 2,
        truncation=True,
    )
    assert two["num_images"].tolist() == [1, 1]
    torch.testing.assert_close(two["pixel_values"].mean(dim=(2, 3)), torch.eye(3)[:2])


# ---------------------------------------------------------------- decoding


def test_decode_and_decode_interleaved(processor):
    texts = ["A photo <image> of a dog.</s>", "<image>hi <image> there"]
    out = processor(texts, images=[solid(RED)] * 3, padding_side="right")
    assert processor.batch_decode(out["input_ids"]) == ["A photo of a dog.", "hi there"]
    assert processor.decode(out["input_ids"][1]) == "hi there"
    raw = processor.decode(out["input_ids"][0], skip_special_tokens=False, keep_image_tokens=True)
    assert raw.count("<|sniffer|>") == Q and "<|startofimage|>" in raw and raw.startswith("<s>")
    assert processor.decode_interleaved(out["input_ids"]) == [
        ["A photo", "<image>", "of a dog."],
        ["<image>", "hi", "<image>", "there"],
    ]
    generated = processor("The answer", images=None)["input_ids"][0].tolist() + [processor.soi_token_id]
    assert processor.decode_interleaved(generated) == ["The answer", "<image>"]


# ---------------------------------------------------------------- chat template, save / load


CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
    {"role": "user", "content": "And the colour?"},
]


def test_chat_template(processor):
    text = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert text == (
        "You are a helpful assistant.\n\n ## USER: <image>What is this?\n ## ASSISTANT: A dog.</s>"
        " ## USER: And the colour?\n ## ASSISTANT:"
    )
    custom = processor.apply_chat_template([{"role": "system", "content": "Be brief."}] + CONVERSATION[:1])
    assert custom == "Be brief.\n\n ## USER: <image>What is this?\n"
    # same layout as the VQA SFT template when the turns carry its text
    sft = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Based on the image, please answer the question. "},
                {"type": "image"},
                {"type": "text", "text": "Why?"},
            ],
        },
        {"role": "assistant", "content": " The answer is because"},
    ]
    expected = format_prompt("vqa_sft", question="Why?") + sft_target("vqa_sft", answer="because")
    assert processor.apply_chat_template(sft) == expected


def test_chat_template_tokenized_with_images(processor):
    image = solid(RED)
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    out = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    direct = processor(processor.apply_chat_template(conversation, add_generation_prompt=True), images=[image])
    assert torch.equal(out["input_ids"], direct["input_ids"])
    assert torch.equal(out["pixel_values"], direct["pixel_values"])


def test_save_load_round_trip(processor, tmp_path):
    processor.image_processor.do_center_crop = True
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["num_image_tokens"] == Q and config["image_processor"]["decoder_size"] == 64
    loaded = DeemProcessor.from_pretrained(tmp_path)
    assert loaded.num_image_tokens == Q and loaded.chat_template == processor.chat_template
    ip = loaded.image_processor
    assert (ip.size, ip.decoder_size, ip.do_center_crop) == (32, 64, True)
    assert (loaded.soi_token_id, loaded.image_token_id, loaded.tokenizer.pad_token_id) == (
        processor.soi_token_id,
        processor.image_token_id,
        processor.tokenizer.pad_token_id,
    )
    args = (["<image> a <ref>b</ref>", "c <image> d"], [solid(RED), striped()])
    for key, value in processor(*args).items():
        assert torch.equal(value, loaded(*args)[key]), key
    # a sub-processor given as a keyword is used as it is, the other one is still loaded from the folder
    given = DeemProcessor.from_pretrained(tmp_path, tokenizer=processor.tokenizer)
    assert given.tokenizer is processor.tokenizer and given.image_processor.do_center_crop
    ip.save_pretrained(tmp_path / "ip")
    assert DeemImageProcessor.from_pretrained(tmp_path / "ip", size=48).size == 48


# ---------------------------------------------------------------- prompt templates


def test_prompt_templates_exact_strings():
    assert format_prompt("vqa", question="What is it?") == (
        "You are a helpful assistant.\n\n ## USER: Based on the image, please answer the question. <image>What is it?"
        " Please provide an accurate answer within one word.\n ## ASSISTANT: The answer is"
    )
    assert format_prompt("vqa_sft", question="Q") + sft_target("vqa_sft", answer="A") == (
        "You are a helpful assistant.\n\n ## USER: Based on the image, please answer the question. <image>Q\n"
        " ## ASSISTANT:  The answer is A</s>"
    )
    assert format_prompt("vizwiz", question="Q").endswith(
        "<image>Q When the provided information is insufficient, respond with 'Unanswerable'. Please provide an"
        " accurate answer within one word.\n ## ASSISTANT: The answer is"
    )
    assert format_prompt("caption") == (
        "You are a helpful assistant. \n\n ## USER: <image> Could you provide a short description of the image? \n"
        " ## ASSISTANT: A photo of"
    )
    assert format_prompt("image2paragraph").endswith(
        "## USER: <image> Please describe the image in detail. \n ## ASSISTANT: The image depicts"
    )
    assert format_prompt("caption_sft", instruction="Describe.") + sft_target("caption_sft", caption="a cat") == (
        "You are a helpful assistant.\n\n ## USER: <image>Describe. \n ## ASSISTANT:  A photo of a cat</s>"
    )
    assert format_prompt("text2image_sft", instruction="Draw: ", caption="a cat") + sft_target("text2image_sft") == (
        "You are a helpful assistant.\n\n ## USER: Draw: a cat \n ## ASSISTANT: <image></s>"
    )
    assert format_prompt("text2image", caption="a cat") == (
        "You are a helpful assistant. \n\n ## USER: please reconstruct the complete image from the description and"
        " the image to be filled in a cat \n ## ASSISTANT:"
    )
    assert format_prompt("robustvqa", label="goldfish") == (
        "You are a helpful assistant.\n\n ## USER: Based on the image, please answer the question. <image>Is goldfish"
        " the main object in this image? Please anwser yes or no \n ## ASSISTANT: The answer is"
    )
    assert format_prompt("pope", question="Is there a dog in the image?").endswith(
        "<image>Is there a dog in the image? Please anwser yes or no \n ## ASSISTANT: The answer is"
    )
    assert format_prompt("referring", question="<image> What is in <image>?") == (
        "You are a helpful assistant.\n\n ## user: <image> What is in <image>?\n ## asistant:"
    )
    rounds = [("what is it", "a dog"), ("is it big", "yes")]
    assert format_visdial("a dog on grass", rounds, "what colour") == (
        "You are a helpful assistant.\n\n  ## USER: <image> caption: a dog on grass. question: what is it? answer:"
        " a dog. question: is it big? answer: yes. question: what colour? \n ## ASSISTANT: the answer is"
    )
    assert "is it big" not in format_visdial("c", rounds, "q", skip_previous_round=True)
    assert len(PROMPT_KINDS) == 11


def test_prompt_errors():
    with pytest.raises(ValueError, match="unknown prompt kind 'nope'"):
        format_prompt("nope")
    with pytest.raises(ValueError, match=r"needs the field\(s\) \['question'\]"):
        format_prompt("vqa")
    with pytest.raises(ValueError, match="no SFT target"):
        sft_target("vqa", answer="x")


def test_prompt_tokenizes_like_original_segments(processor, tokenizer):
    """The caption prompt's "<image> Could" gives the ids of its two sides tokenised alone."""
    prompt = format_prompt("caption")
    ids = processor(prompt, images=[solid(RED)])["input_ids"][0].tolist()
    before, after = prompt.split("<image>")
    expected = [1] + pieces(tokenizer, before.rstrip())[0] + [processor.soi_token_id] + [processor.image_token_id] * Q
    assert ids == expected + pieces(tokenizer, after.lstrip())[0]
