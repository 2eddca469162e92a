"""Bad input to DeemProcessor / DeemImageProcessor is refused with our own clear error; unusual valid input gives the
right values (every PIL mode, 16-bit and float data, alpha, 1-px and extreme-aspect images, masks, options)."""

import copy
import io
import json
import re

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizer_utils import build_test_tokenizer
from transformers import LlamaTokenizer
from transformers.testing_utils import CaptureLogger
from transformers.tokenization_utils_base import TruncationStrategy
from transformers.utils import PaddingStrategy

from deem import DeemConfig
from deem.modeling import image_processing_deem, processing_deem
from deem.modeling.image_processing_deem import DeemImageProcessor
from deem.modeling.processing_deem import DeemProcessor, prepare_tokenizer
from deem.modeling.prompts import format_prompt, format_visdial, sft_target

Q = 3  # placeholders per image
S, D = 8, 8  # encoder / decoder view sizes
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
OUR_FILES = ("processing_deem.py", "image_processing_deem.py", "prompts.py")


@pytest.fixture(scope="module")
def tokenizer():
    return prepare_tokenizer(build_test_tokenizer())


@pytest.fixture(scope="module")
def P(tokenizer):
    return DeemProcessor(DeemImageProcessor(size=S, decoder_size=D), tokenizer, num_image_tokens=Q)


@pytest.fixture(scope="module")
def IP():
    return DeemImageProcessor(size=S, decoder_size=D)


def rgb(color=RED, size=(5, 4)):
    return PIL.Image.new("RGB", size, color)


def corrupt_png() -> PIL.Image.Image:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return PIL.Image.open(io.BytesIO(buffer.getvalue()[:200]))  # header intact, pixel data cut


def gray_f(values) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.asarray(values, dtype=np.float32))


def gray_i(values) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.asarray(values, dtype=np.int32))


def gray16(values, mode="I;16") -> PIL.Image.Image:
    """A 16-bit grayscale image of `values` [H, W] in mode "I;16" (little endian) or "I;16B" (big endian)."""
    values = np.asarray(values)
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return PIL.Image.frombytes(mode, (values.shape[1], values.shape[0]), values.astype(dtype).tobytes())


def sparse_image():
    return torch.zeros(3, 2, 2).to_sparse()


def tokenizer_with(tokenizer, **tokens):
    tok = copy.deepcopy(tokenizer)
    for name, value in tokens.items():
        setattr(tok, name, value)
    return tok


def degenerate_tokenizer():
    return prepare_tokenizer(LlamaTokenizer(vocab={"<unk>": 0, "<s>": 1, "</s>": 2}, merges=[]))


MASK = np.ones((4, 5), dtype=bool)  # the mask of rgb()


# Each case: (id, call(P, IP, tokenizer), exception type, regex the message must match).
BAD = [
    # ---- pixel data
    ("nan-float-array", lambda P, IP, t: IP(np.full((4, 4, 3), np.nan)), ValueError, r"image 0 has 48 NaN"),
    ("inf-tensor", lambda P, IP, t: IP(torch.full((3, 2, 2), float("inf"))), ValueError, r"NaN or infinite"),
    (
        "neg-inf-float16",
        lambda P, IP, t: IP(np.full((2, 2, 3), -np.inf, np.float16)),
        ValueError,
        r"NaN or infinite",
    ),
    ("nan-in-mode-F", lambda P, IP, t: IP(gray_f([[0.5, np.nan]])), ValueError, r"float image 0 has 1 NaN"),
    ("nan-bfloat16", lambda P, IP, t: IP(torch.full((3, 2, 2), float("nan"), dtype=torch.bfloat16)), ValueError, "NaN"),
    ("empty-pil-0x0", lambda P, IP, t: IP(rgb(size=(0, 0))), ValueError, r"image 0 is empty: \(H, W\) = \(0, 0\)"),
    (
        "empty-pil-centre-crop",
        lambda P, IP, t: IP(rgb(size=(0, 7)), do_center_crop=True),
        ValueError,
        r"image 0 is empty: \(H, W\) = \(7, 0\)",
    ),
    ("empty-array-rows", lambda P, IP, t: IP(np.zeros((0, 5, 3), np.uint8)), ValueError, r"empty: \(H, W\) = \(0, 5\)"),
    ("empty-tensor-cols", lambda P, IP, t: IP(torch.zeros(3, 4, 0)), ValueError, r"empty: \(H, W\) = \(4, 0\)"),
    ("empty-mode-L", lambda P, IP, t: IP([rgb(), PIL.Image.new("L", (3, 0))]), ValueError, r"image 1 is empty"),
    ("float-0-255", lambda P, IP, t: IP(np.full((2, 2, 3), 200.0)), ValueError, r"\[0, 1\].*divide 0\.\.255"),
    ("float-negative", lambda P, IP, t: IP(np.full((2, 2, 3), -0.5)), ValueError, r"must lie in \[0, 1\].*-0\.5"),
    ("float-F-above-1", lambda P, IP, t: IP(gray_f([[0.0, 2.0]])), ValueError, r"float image 0 must lie in \[0, 1\]"),
    ("int16-above-255", lambda P, IP, t: IP(np.full((2, 2, 3), 300, np.int16)), ValueError, r"int16.*\[0, 255\]"),
    ("int32-negative", lambda P, IP, t: IP(np.full((2, 2, 3), -1, np.int32)), ValueError, r"\[0, 255\].*uint16"),
    ("mode-I-above-16-bit", lambda P, IP, t: IP(gray_i([[0, 70000]])), ValueError, r"16-bit.*\[0, 65535\].*70000"),
    ("mode-I-negative", lambda P, IP, t: IP(gray_i([[-5, 10]])), ValueError, r"\[0, 255\], got range \[-5, 10\]"),
    ("bool-array", lambda P, IP, t: IP(np.zeros((2, 2, 3), bool)), TypeError, "boolean dtype"),
    ("bool-tensor", lambda P, IP, t: IP(torch.zeros(3, 2, 2, dtype=torch.bool)), TypeError, "boolean dtype"),
    ("complex-array", lambda P, IP, t: IP(np.zeros((2, 2, 3), complex)), TypeError, "non-numeric dtype complex"),
    ("complex-tensor", lambda P, IP, t: IP(torch.zeros(3, 2, 2, dtype=torch.cfloat)), TypeError, "non-numeric"),
    ("string-array", lambda P, IP, t: IP(np.full((2, 2, 3), "a")), TypeError, "non-numeric dtype"),
    ("object-array", lambda P, IP, t: IP(np.full((2, 2, 3), None)), TypeError, "non-numeric dtype object"),
    ("sparse-tensor", lambda P, IP, t: IP(sparse_image()), TypeError, "sparse.*dense"),
    ("2d-array", lambda P, IP, t: IP(np.zeros((8, 8), np.uint8)), ValueError, r"3 dimensions.*\(8, 8\)"),
    ("5d-array", lambda P, IP, t: IP([np.zeros((1, 2, 2, 2, 3))]), ValueError, "3 dimensions"),
    ("4-channels", lambda P, IP, t: IP(np.zeros((8, 8, 4), np.uint8)), ValueError, r"3 \(RGB\) channels.*\(8, 8, 4\)"),
    ("1-channel-tensor", lambda P, IP, t: IP(torch.zeros(1, 8, 8)), ValueError, r"3 \(RGB\) channels"),
    ("int-image", lambda P, IP, t: IP([5]), TypeError, "image 0 has unsupported type int"),
    ("bytes-image", lambda P, IP, t: IP([b"\x89PNG"]), TypeError, "unsupported type bytes"),
    ("dict-image", lambda P, IP, t: IP([{"path": "x.png"}]), TypeError, "unsupported type dict"),
    ("nested-list-image", lambda P, IP, t: IP([[rgb()]]), TypeError, "image 0 has unsupported type list"),
    ("none-image-entry", lambda P, IP, t: IP([rgb(), None]), TypeError, "image 1 is None"),
    ("none-images", lambda P, IP, t: IP(None), TypeError, "images is None"),
    ("no-images", lambda P, IP, t: IP([]), ValueError, "no images to process"),
    ("missing-path", lambda P, IP, t: IP("/nonexistent/deem.png"), ValueError, r"image 0: could not load"),
    ("corrupt-file", lambda P, IP, t: IP(corrupt_png()), ValueError, "image 0 could not be decoded"),
    # ---- masks
    ("mask-nan", lambda P, IP, t: IP(rgb(), image_masks=[np.full((4, 5), np.nan)]), ValueError, "mask 0 has NaN"),
    (
        "mask-soft",
        lambda P, IP, t: IP(rgb(), image_masks=[np.full((4, 5), 0.5)]),
        ValueError,
        r"mask 0 must be binary.*0\.5.*mask > 0\.5",
    ),
    ("mask-above-1", lambda P, IP, t: IP(rgb(), image_masks=[np.full((4, 5), 2.0)]), ValueError, r"\[0, 1\]"),
    (
        "mask-int-labels",
        lambda P, IP, t: IP(rgb(), image_masks=[np.arange(20).reshape(4, 5) % 3]),
        ValueError,
        r"integer mask 0 must be binary.*0, 1, 2",
    ),
    (
        "mask-1-and-255",
        lambda P, IP, t: IP(rgb(), image_masks=[np.array([[0, 1, 255, 0, 0]] * 4)]),
        ValueError,
        r"must be binary.*0, 1, 255",
    ),
    (
        "mask-transposed",
        lambda P, IP, t: IP(rgb(), image_masks=[MASK.T]),
        ValueError,
        r"mask 0 has shape \(5, 4\) but its image is \(H, W\) = \(4, 5\)",
    ),
    (
        "mask-two-channels",
        lambda P, IP, t: IP(rgb(), image_masks=[np.ones((2, 4, 5), bool)]),
        ValueError,
        r"must have shape \(H, W\)",
    ),
    (
        "mask-rgb-pil",
        lambda P, IP, t: IP(rgb(), image_masks=[rgb()]),
        ValueError,
        "single-channel PIL image.*'RGB'",
    ),
    (
        "mask-wrong-size-pil",
        lambda P, IP, t: IP(rgb(), image_masks=[PIL.Image.new("L", (4, 4))]),
        ValueError,
        r"has shape \(4, 4\)",
    ),
    ("mask-int-type", lambda P, IP, t: IP(rgb(), image_masks=[3]), TypeError, "mask 0 has unsupported type int"),
    ("mask-str-dtype", lambda P, IP, t: IP(rgb(), image_masks=[np.full((4, 5), "x")]), TypeError, "non-numeric"),
    ("mask-count", lambda P, IP, t: IP([rgb(), rgb()], image_masks=[None]), ValueError, "1 image masks for 2 images"),
    # ---- image processor options
    ("size-zero", lambda P, IP, t: IP(rgb(), size=0), ValueError, "size must be a positive int, got 0"),
    ("size-negative", lambda P, IP, t: IP(rgb(), decoder_size=-4), ValueError, "decoder_size must be a positive"),
    ("size-str", lambda P, IP, t: IP(rgb(), size="8"), TypeError, "size must be a positive int, got str"),
    ("size-float", lambda P, IP, t: IP(rgb(), size=2.5), TypeError, "got float 2.5"),
    ("size-bool", lambda P, IP, t: IP(rgb(), decoder_size=True), TypeError, "got bool"),
    ("size-dict-rect", lambda P, IP, t: IP(rgb(), size={"height": 4, "width": 8}), ValueError, "square"),
    ("flip-prob-above-1", lambda P, IP, t: IP(rgb(), flip_prob=1.5), ValueError, r"flip_prob .*\[0, 1\], got 1\.5"),
    ("flip-prob-nan", lambda P, IP, t: IP(rgb(), flip_prob=float("nan")), ValueError, "flip_prob.*nan"),
    ("flip-prob-str", lambda P, IP, t: IP(rgb(), flip_prob="0.5"), TypeError, "flip_prob must be a float"),
    ("do-flip-str", lambda P, IP, t: IP(rgb(), do_flip="yes"), TypeError, "do_flip must be a bool, got str"),
    ("centre-crop-int", lambda P, IP, t: IP(rgb(), do_center_crop=1), TypeError, "do_center_crop must be a bool"),
    ("decoder-view-str", lambda P, IP, t: IP(rgb(), return_decoder_view="no"), TypeError, "return_decoder_view"),
    ("generator-str", lambda P, IP, t: IP(rgb(), generator="seed"), TypeError, "generator must be a torch.Generator"),
    ("generator-negative", lambda P, IP, t: IP(rgb(), generator=-1), ValueError, r"seed must lie in \[0, 2\*\*64\)"),
    ("generator-huge", lambda P, IP, t: IP(rgb(), generator=2**64), ValueError, r"\[0, 2\*\*64\)"),
    ("return-tensors-tf", lambda P, IP, t: IP(rgb(), return_tensors="tf"), ValueError, "return_tensors must be"),
    ("unknown-option", lambda P, IP, t: IP(rgb(), do_resize=True), TypeError, r"unknown .*option.*\['do_resize'\]"),
    ("init-size-zero", lambda P, IP, t: DeemImageProcessor(size=0), ValueError, "size must be a positive int"),
    ("init-std-zero", lambda P, IP, t: DeemImageProcessor(image_std=[0, 1, 1]), ValueError, "image_std must be pos"),
    ("init-mean-short", lambda P, IP, t: DeemImageProcessor(image_mean=[0.5]), ValueError, "image_mean must be 3"),
    ("init-flip-prob", lambda P, IP, t: DeemImageProcessor(flip_prob=-0.1), ValueError, "flip_prob"),
    ("postprocess-type", lambda P, IP, t: IP.postprocess(torch.zeros(3, 2, 2), output_type="jpg"), ValueError, "pil"),
    ("postprocess-nan", lambda P, IP, t: IP.postprocess(torch.full((3, 2, 2), float("nan"))), ValueError, "NaN"),
    ("postprocess-list", lambda P, IP, t: IP.postprocess([[0.5]]), TypeError, "tensor or numpy"),
    ("postprocess-shape", lambda P, IP, t: IP.postprocess(torch.zeros(1, 4, 2, 2)), ValueError, r"\[N, 3, H, W\]"),
    # ---- processor options
    ("max-length-zero", lambda P, IP, t: P("a", max_length=0, truncation=True), ValueError, "max_length must be a pos"),
    ("max-length-negative", lambda P, IP, t: P("a", max_length=-3), ValueError, "at least 1 token.*-3"),
    ("max-length-float", lambda P, IP, t: P("a", max_length=2.0), TypeError, "max_length must be a positive int"),
    ("max-length-bool", lambda P, IP, t: P("a", max_length=True), TypeError, "max_length.*bool"),
    ("max-length-str", lambda P, IP, t: P("a", max_length="10"), TypeError, "max_length.*str"),
    ("padding-bogus", lambda P, IP, t: P("a", padding="max"), ValueError, "padding must be True, 'longest'"),
    ("padding-int", lambda P, IP, t: P("a", padding=1), TypeError, "padding must be"),
    ("padding-needs-length", lambda P, IP, t: P("a", padding="max_length"), ValueError, "needs max_length"),
    ("padding-side", lambda P, IP, t: P("a", padding_side="center"), ValueError, "'left' or 'right', got 'center'"),
    ("truncation-str", lambda P, IP, t: P("a", truncation="yes"), ValueError, "truncation must be True or False"),
    ("truncation-int", lambda P, IP, t: P("a", truncation=1), TypeError, "truncation must be"),
    ("add-eos-str", lambda P, IP, t: P("a", add_eos="true"), TypeError, "add_eos must be a bool"),
    ("add-special-none", lambda P, IP, t: P("a", add_special_tokens=None), TypeError, "add_special_tokens must be"),
    ("processor-return-tf", lambda P, IP, t: P("a", return_tensors="tf"), ValueError, "return_tensors must be"),
    ("processor-unknown-kw", lambda P, IP, t: P("a", resample=3), TypeError, r"unknown .*\['resample'\]"),
    ("processor-size-zero", lambda P, IP, t: P("<image>", images=[rgb()], size=0), ValueError, "size must be a pos"),
    ("processor-generator", lambda P, IP, t: P("a", generator=1.5), TypeError, "generator must be"),
    ("videos", lambda P, IP, t: P("a", videos=[np.zeros((1, 2, 2, 3))]), ValueError, "text and images only"),
    (
        "row-too-long",
        lambda P, IP, t: P("some words here", max_length=2),
        ValueError,
        r"row 0 has \d+ tokens, more than max_length=2; pass truncation=True",
    ),
    (
        "truncation-empties-row",
        lambda P, IP, t: P("<image> x", images=[rgb()], add_special_tokens=False, max_length=2, truncation=True),
        ValueError,
        r"row 0: truncating to max_length=2 would leave no tokens.*4-token run",
    ),
    (
        "empty-row",
        lambda P, IP, t: P(["a", ""], add_special_tokens=False),
        ValueError,
        r"text 1 gives no tokens",
    ),
    ("no-pad-different-lengths", lambda P, IP, t: P(["a", "a b c d"], padding=False), ValueError, "different lengths"),
    (
        "no-eos-token",
        lambda P, IP, t: DeemProcessor(IP, tokenizer_with(t, eos_token=None))("a", add_eos=True),
        ValueError,
        "add_eos=True but the tokenizer has no eos token",
    ),
    # ---- markers vs images, structure, types
    (
        "too-few-images",
        lambda P, IP, t: P(["<image>a", "b<image>"], images=[rgb()]),
        ValueError,
        r"2 <image> markers in total \(per row: \[1, 1\]\) but 1 images",
    ),
    (
        "images-without-markers",
        lambda P, IP, t: P("no marker", images=[rgb()]),
        ValueError,
        r"0 <image> markers in total.*but 1 images",
    ),
    ("markers-without-images", lambda P, IP, t: P("<image>", images=None), ValueError, "1 <image> markers.*but 0"),
    (
        "per-row-count",
        lambda P, IP, t: P(["<image>a", "b<image>"], images=[[rgb()], []]),
        ValueError,
        "row 1 has 1 <image> markers but 0 images",
    ),
    (
        "per-row-rows",
        lambda P, IP, t: P(["<image>a", "b"], images=[[rgb()]]),
        ValueError,
        "per row for 1 rows but there are 2 texts",
    ),
    (
        "ragged-mixed",
        lambda P, IP, t: P(["<image>", "<image>"], images=[rgb(), [rgb()]]),
        TypeError,
        r"images mixes per-row lists \(entries \[1\]\) and single entries",
    ),
    (
        "nested-three-levels",
        lambda P, IP, t: P("<image>", images=[[[rgb()]]]),
        TypeError,
        r"images\[0\]\[0\] is a list.*two levels deep",
    ),
    ("none-image-for-marker", lambda P, IP, t: P("<image>", images=[None]), TypeError, "image 0 is None"),
    ("int-images", lambda P, IP, t: P("<image>", images=5), TypeError, "images must be one image.*got int"),
    ("dict-images", lambda P, IP, t: P("<image>", images={"image": rgb()}), TypeError, "got dict"),
    ("text-int", lambda P, IP, t: P(5), TypeError, "text must be a string.*got int"),
    ("text-list-of-ints", lambda P, IP, t: P([1, 2]), TypeError, r"text must be.*\(0, 'int'\)"),
    ("text-none-entry", lambda P, IP, t: P(["a", None]), TypeError, r"\(1, 'NoneType'\)"),
    ("text-bytes", lambda P, IP, t: P(b"a"), TypeError, "got bytes"),
    ("text-empty-list", lambda P, IP, t: P([]), ValueError, "got an empty list"),
    ("nothing", lambda P, IP, t: P(None, images=None), ValueError, "give text, images, or both"),
    ("raw-soi", lambda P, IP, t: P("look <|startofimage|>"), ValueError, r"text 0 contains the raw token <\|startof"),
    ("raw-sniffer-row-1", lambda P, IP, t: P(["a", "<|sniffer|>"]), ValueError, r"text 1 contains the raw token"),
    (
        "mask-rows",
        lambda P, IP, t: P(["<image><image>"], images=[[rgb(), rgb()]], image_masks=[[None]]),
        ValueError,
        "row 0 has 2 <image> markers but 1 image masks",
    ),
    (
        "mask-size-via-processor",
        lambda P, IP, t: P("<image>", images=[rgb()], image_masks=[np.ones((5, 5), bool)]),
        ValueError,
        r"mask 0 has shape \(5, 5\)",
    ),
    (
        "mask-nan-via-processor",
        lambda P, IP, t: P("<image>", images=[rgb()], image_masks=[np.full((4, 5), np.nan)]),
        ValueError,
        "mask 0 has NaN",
    ),
    (
        "image-only-mask-count",
        lambda P, IP, t: P(images=[rgb(), rgb()], image_masks=[None]),
        ValueError,
        "1 image masks for 2 images",
    ),
    (
        "bad-image-past-truncation",  # refused even though truncation would have dropped it
        lambda P, IP, t: P("a <image>", images=[np.full((2, 2, 3), np.nan)], max_length=2, truncation=True),
        ValueError,
        "NaN",
    ),
    # ---- decoding
    ("decode-labels", lambda P, IP, t: P.decode([1, -100, 5]), ValueError, r"must be >= 0; row 0 holds -100 at pos"),
    ("decode-floats", lambda P, IP, t: P.decode(torch.tensor([1.0, 2.0])), TypeError, "dtype torch.float32"),
    ("decode-str", lambda P, IP, t: P.decode("hello"), TypeError, "list or tensor of ints, got str"),
    ("batch-decode-1d", lambda P, IP, t: P.batch_decode(torch.tensor([1, 2])), ValueError, r"batch \[B, L\]"),
    ("interleaved-float", lambda P, IP, t: P.decode_interleaved([1, 2.5]), TypeError, "holds float 2.5 at position 1"),
    # ---- prompt templates
    (
        "prompt-misspelt-field",
        lambda P, IP, t: format_prompt("vqa", questoin="x"),
        ValueError,
        r"no field\(s\) \['questoin'\]; its fields are \['question'\]",
    ),
    ("prompt-missing-field", lambda P, IP, t: sft_target("vqa_sft"), ValueError, r"needs the field\(s\)"),
    (
        "prompt-extra-field",
        lambda P, IP, t: format_prompt("caption", question="x"),
        ValueError,
        r"'caption' has no field\(s\) \['question'\]",
    ),
    ("prompt-field-type", lambda P, IP, t: format_prompt("vqa", question=3), TypeError, r"\{'question': 'int'\}"),
    ("prompt-kind-type", lambda P, IP, t: sft_target(["vqa_sft"], answer="a"), TypeError, "kind must be a string"),
    ("visdial-history", lambda P, IP, t: format_visdial("c", [("q",)], "q"), TypeError, r"history\[0\] must be"),
    # ---- processor construction, tokenizer and model config
    ("tokens-zero", lambda P, IP, t: DeemProcessor(IP, t, num_image_tokens=0), ValueError, "num_image_tokens must be"),
    ("tokens-float", lambda P, IP, t: DeemProcessor(IP, t, num_image_tokens=2.5), TypeError, "num_image_tokens.*float"),
    ("tokens-bool", lambda P, IP, t: DeemProcessor(IP, t, num_image_tokens=True), TypeError, "num_image_tokens.*bool"),
    ("unprepared-tokenizer", lambda P, IP, t: DeemProcessor(IP, build_test_tokenizer()), ValueError, "prepare_token"),
    ("image-processor-none", lambda P, IP, t: DeemProcessor(None, t), TypeError, "image_processor must be a Deem"),
    ("tokenizer-str", lambda P, IP, t: DeemProcessor(IP, "llama"), TypeError, "tokenizer must be a transformers"),
    (
        "degenerate-tokenizer",
        lambda P, IP, t: DeemProcessor(IP, degenerate_tokenizer()),
        ValueError,
        r"no ordinary tokens: its 9 tokens are all special.*tokenizer\.json",
    ),
    (
        "pad-is-placeholder",
        lambda P, IP, t: DeemProcessor(IP, tokenizer_with(t, pad_token="<|sniffer|>")),
        ValueError,
        "special ids collide",
    ),
    (
        "config-ids",
        lambda P, IP, t: P.check_model_config(DeemConfig.tiny()),
        ValueError,
        r"soi_token_id: tokenizer \d+, config 122.*num_image_tokens: processor 3, config 4.*vocab_size is 128",
    ),
    (
        "config-small-tokenizer",
        lambda P, IP, t: P.check_model_config({"original_vocab_size": 32000, "num_image_tokens": Q}),
        ValueError,
        r"only \d+ tokens but the model has 32000 base tokens",
    ),
    ("config-type", lambda P, IP, t: P.check_model_config("deem"), TypeError, "config must be a DeemConfig"),
]


def test_bad_case_ids_are_distinct():
    ids = [case[0] for case in BAD]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


def _raised_in_our_code(excinfo) -> bool:
    return excinfo.traceback[-1].path.name in OUR_FILES


@pytest.mark.parametrize("call, error, message", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_is_refused_clearly(P, IP, tokenizer, call, error, message):
    with pytest.raises((ValueError, TypeError)) as excinfo:
        call(P, IP, tokenizer)
    assert excinfo.type is error, f"{excinfo.type.__name__}: {excinfo.value}"
    assert re.search(message, str(excinfo.value)), str(excinfo.value)
    assert _raised_in_our_code(excinfo), f"raised inside {excinfo.traceback[-1].path}"


def test_missing_tokenizer_json_is_named(P, tmp_path):
    P.save_pretrained(tmp_path)
    assert DeemProcessor.from_pretrained(tmp_path)("hello world")["input_ids"].shape[1] > 1
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"no tokenizer vocabulary: tokenizer\.json is missing"):
        DeemProcessor.from_pretrained(tmp_path)


def test_from_pretrained_warns_when_model_config_disagrees(P, tmp_path):
    P.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(DeemConfig.tiny().to_dict()))
    with CaptureLogger(processing_deem.logger) as captured:
        DeemProcessor.from_pretrained(tmp_path)
    assert "does not fit the model config" in captured.out and "soi_token_id" in captured.out


def test_check_model_config_passes_for_a_matching_config(IP, tokenizer):
    processor = DeemProcessor(IP, tokenizer, num_image_tokens=DeemConfig.tiny().num_image_tokens)
    ids = {f"{name}_token_id": getattr(processor, f"{name}_token_id") for name in processing_deem._DEEM_ID_NAMES}
    text = DeemConfig.tiny().text_config.to_dict() | {"vocab_size": len(tokenizer), "pad_token_id": 0}
    config = DeemConfig.tiny(text_config=text, original_vocab_size=tokenizer.vocab_size, pad_token_id=0, **ids)
    processor.check_model_config(config)
    processor.check_model_config(config.to_dict())
    assert processor.model_config_mismatches(config) == []
    with pytest.raises(ValueError, match=r"^the processor does not fit the model config: pad_token_id: tokenizer 0, "):
        processor.check_model_config(config.to_dict() | {"pad_token_id": 5})


# ---------------------------------------------------------------- valid but unusual: the values are right


def view(IP, image, **kwargs):
    """Mean colour per channel of the encoder view, as a tuple of floats."""
    return tuple(IP(image, **kwargs)["pixel_values"][0].mean(dim=(1, 2)).tolist())


def with_transparency(mode: str) -> PIL.Image.Image:
    """Red left half, black but transparent right half (via alpha, or a palette / colour-key transparency)."""
    array = np.zeros((4, 8, 4), dtype=np.uint8)
    array[:, :4] = (255, 0, 0, 255)
    rgba = PIL.Image.fromarray(array)
    if mode == "P":  # palette index 1 (black) is transparent
        image = PIL.Image.fromarray((array[..., 3] == 0).astype(np.uint8))
        image = image.convert("P")
        image.putpalette([255, 0, 0, 0, 0, 0])
        image.info["transparency"] = 1
        return image
    if mode == "RGB":  # colour key: black is transparent
        image = rgba.convert("RGB")
        image.info["transparency"] = (0, 0, 0)
        return image
    return rgba.convert(mode)


PINK = (1.0, 128 / 255, 128 / 255)  # red at alpha 128 over white
UNUSUAL = [
    ("P-red", lambda: rgb(RED).convert("P"), (1, 0, 0)),
    ("P-adaptive-blue", lambda: rgb(BLUE).convert("P", palette=PIL.Image.Palette.ADAPTIVE), (0, 0, 1)),
    ("PA-green", lambda: rgb(GREEN).convert("PA"), (0, 1, 0)),
    ("L-grey", lambda: PIL.Image.new("L", (3, 3), 51), (0.2, 0.2, 0.2)),
    ("1-white", lambda: PIL.Image.new("1", (3, 3), 1), (1, 1, 1)),
    ("1-black", lambda: PIL.Image.new("1", (3, 3), 0), (0, 0, 0)),
    ("CMYK-red", lambda: rgb(RED).convert("CMYK"), (1, 0, 0)),
    ("YCbCr-blue", lambda: rgb(BLUE).convert("YCbCr"), (0, 0, 1)),
    ("HSV-green", lambda: rgb(GREEN).convert("HSV"), (0, 1, 0)),
    ("LAB-white", lambda: rgb(WHITE).convert("LAB"), (1, 1, 1)),
    ("RGBX-blue", lambda: rgb(BLUE).convert("RGBX"), (0, 0, 1)),
    ("RGBA-opaque-red", lambda: rgb(RED).convert("RGBA"), (1, 0, 0)),
    ("RGBA-transparent-black", lambda: PIL.Image.new("RGBA", (3, 3), (0, 0, 0, 0)), (1, 1, 1)),
    ("RGBA-half-red", lambda: PIL.Image.new("RGBA", (3, 3), (255, 0, 0, 128)), PINK),
    ("RGBa-half-red", lambda: PIL.Image.new("RGBA", (3, 3), (255, 0, 0, 128)).convert("RGBa"), PINK),
    ("LA-half-black", lambda: PIL.Image.new("LA", (3, 3), (0, 128)), (127 / 255,) * 3),
    ("La-opaque-grey", lambda: PIL.Image.new("LA", (3, 3), (102, 255)).convert("La"), (0.4, 0.4, 0.4)),
    ("RGB-colour-key", lambda: with_transparency("RGB"), (1, 0.5, 0.5)),
    ("P-transparency", lambda: with_transparency("P"), (1, 0.5, 0.5)),
    ("RGBA-half-transparent", lambda: with_transparency("RGBA"), (1, 0.5, 0.5)),
    ("LA-from-RGBA", lambda: with_transparency("LA"), ((0.299 * 255 + 255) / 2 / 255,) * 3),
    ("I16-mid", lambda: gray16(np.full((3, 3), 32768)), (128 / 255,) * 3),
    ("I16B-max", lambda: gray16(np.full((3, 3), 65535), "I;16B"), (1, 1, 1)),
    ("I16B-fifth", lambda: gray16(np.full((3, 3), 13107), "I;16B"), (0.2, 0.2, 0.2)),
    ("I-8-bit", lambda: gray_i(np.full((3, 3), 204)), (0.8, 0.8, 0.8)),
    ("I-16-bit", lambda: gray_i(np.full((3, 3), 65535 // 5)), (0.2, 0.2, 0.2)),
    ("F-unit", lambda: gray_f(np.full((3, 3), 0.6)), (0.6, 0.6, 0.6)),
    ("uint16-array", lambda: np.full((3, 3, 3), [65535, 0, 13107], np.uint16), (1, 0, 0.2)),
    ("float16-array", lambda: np.full((3, 3, 3), [0.0, 1.0, 0.4], np.float16), (0, 1, 0.4)),
    ("bfloat16-tensor", lambda: torch.tensor([1.0, 0.5, 0.0]).view(3, 1, 1).expand(3, 2, 2).bfloat16(), (1, 0.5, 0)),
    ("float64-overshoot", lambda: np.full((2, 2, 3), [1.0004, -0.0004, 0.5]), (1, 0, 128 / 255)),
    ("int64-array", lambda: np.full((2, 2, 3), [255, 0, 51]), (1, 0, 0.2)),
    ("uint8-chw-tensor", lambda: torch.tensor([0, 0, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2), (0, 0, 1)),
    ("1-px", lambda: rgb(GREEN, (1, 1)), (0, 1, 0)),
    ("1-px-array", lambda: np.full((1, 1, 3), 255, np.uint8), (1, 1, 1)),
    ("1-px-wide-row", lambda: rgb(BLUE, (40, 1)), (0, 0, 1)),
]


@pytest.mark.parametrize("center_crop", [False, True])
@pytest.mark.parametrize("build, expected", [c[1:] for c in UNUSUAL], ids=[c[0] for c in UNUSUAL])
def test_unusual_images_give_the_right_colours(IP, build, expected, center_crop):
    out = IP(build(), do_center_crop=center_crop)
    for key in ("pixel_values", "pixel_values_decoder"):
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]).all()
        assert out[key].min() >= 0 and out[key].max() <= 1
    got = out["pixel_values"][0].mean(dim=(1, 2))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), atol=0.02, rtol=0)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_high_depth_gradients_span_the_range(IP, mode):
    """A left-to-right ramp over the whole range of the mode: neither all black nor all white, and monotone."""
    ramp = np.tile(np.linspace(0, 65535, 32).round(), (4, 1))
    if mode == "F":
        image = gray_f(ramp / 65535)
    elif mode == "I":
        image = gray_i(ramp)
    else:
        image = gray16(ramp, mode)
    assert image.mode == mode
    row = DeemImageProcessor(size=32, decoder_size=8)(image)["pixel_values"][0, 0, 2]
    assert row[0] < 0.02 and row[-1] > 0.98
    assert (row[1:] >= row[:-1] - 1e-6).all() and len(set(row.tolist())) > 16


def test_16_bit_matches_its_8_bit_version(IP):
    values = np.random.default_rng(1).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    reference = IP(values)["pixel_values"]
    torch.testing.assert_close(IP(values.astype(np.uint16) * 257)["pixel_values"], reference, atol=0, rtol=0)
    gray = values[..., 0]
    as_i16 = gray16(gray.astype(np.uint16) * 257)
    torch.testing.assert_close(IP(as_i16)["pixel_values"], IP(PIL.Image.fromarray(gray))["pixel_values"])


def test_extreme_aspect_centre_crop_is_the_centre_and_cheap(IP):
    """A 1 x 5000 strip, centre-cropped: no 8 x 40000 intermediate; the crop shows the strip's middle colour."""
    strip = np.zeros((1, 5000, 3), dtype=np.uint8)
    strip[:, :2400] = RED
    strip[:, 2400:2600] = GREEN
    strip[:, 2600:] = BLUE
    out = IP(PIL.Image.fromarray(strip), do_center_crop=True)
    torch.testing.assert_close(out["pixel_values"][0].mean(dim=(1, 2)), torch.tensor([0.0, 1.0, 0.0]))


def test_direct_crop_window_matches_the_two_step_path(monkeypatch):
    """Beyond MAX_CROP_ASPECT the window is resampled at once; it is the same window as resize-then-crop."""
    ramp = np.tile(np.linspace(0, 255, 90), (5, 1)).astype(np.uint8)
    image = PIL.Image.fromarray(np.stack([ramp, ramp[:, ::-1], ramp], -1))
    ip = DeemImageProcessor(size=16, decoder_size=16, do_center_crop=True)
    two_step = ip(image)["pixel_values"]
    monkeypatch.setattr(image_processing_deem, "MAX_CROP_ASPECT", 1)
    direct = ip(image)["pixel_values"]
    torch.testing.assert_close(direct, two_step, atol=3 / 255, rtol=0)


MASKS = [
    ("bool", lambda m: m),
    ("uint8-0-1", lambda m: m.astype(np.uint8)),
    ("uint8-0-255", lambda m: m.astype(np.uint8) * 255),
    ("float-0-1", lambda m: m.astype(np.float32)),
    ("torch-bool", lambda m: torch.from_numpy(m)),
    ("chw", lambda m: m[None]),
    ("hwc", lambda m: m[..., None]),
    ("pil-1", lambda m: PIL.Image.fromarray(m)),
    ("pil-L", lambda m: PIL.Image.fromarray(m.astype(np.uint8) * 255)),
    ("pil-F", lambda m: PIL.Image.fromarray(m.astype(np.float32))),
    ("uint16-0-65535", lambda m: m.astype(np.uint16) * 65535),
]


@pytest.mark.parametrize("convert", [c[1] for c in MASKS], ids=[c[0] for c in MASKS])
def test_mask_formats_give_the_same_binary_mask(IP, convert):
    mask = np.zeros((6, 10), dtype=bool)
    mask[1:4, 2:7] = True
    image = rgb(RED, (10, 6))
    out = IP([image, image], image_masks=[convert(mask), None])["image_masks"]
    reference = IP([image], image_masks=[mask])["image_masks"][0]
    assert torch.equal(out[0], reference) and torch.equal(out[1], torch.ones(1, S, S))
    assert set(out.unique().tolist()) == {0.0, 1.0} and 0 < reference.sum() < S * S


def test_one_pixel_mask_and_image(IP):
    out = IP(rgb(RED, (1, 1)), image_masks=[np.ones((1, 1), bool)], do_center_crop=True)
    assert torch.equal(out["image_masks"], torch.ones(1, 1, S, S))


def test_unusual_processor_options_are_accepted(P, tokenizer):
    text, image = "a photo <image> of a cat", rgb()
    base = P(text, images=[image])
    n = base["input_ids"].shape[1]
    assert torch.equal(P(text, images=[image], padding=PaddingStrategy.LONGEST)["input_ids"], base["input_ids"])
    assert torch.equal(P(text, images=[image], max_length=np.int64(n))["input_ids"], base["input_ids"])
    assert torch.equal(P((text,), images=(image,))["input_ids"], base["input_ids"])
    assert torch.equal(P(text, images=image)["input_ids"], base["input_ids"])  # one image, not a list
    truncated = P(text, images=[image], max_length=n - 1, truncation=TruncationStrategy.LONGEST_FIRST)
    assert truncated["input_ids"].shape[1] == n - 1 and truncated["num_images"].tolist() == [1]
    assert (
        P(text, images=[image], max_length=n, padding="do_not_pad", truncation="do_not_truncate")["input_ids"].shape[1]
        == n
    )
    short = len(P("x")["input_ids"][0])
    np_out = P([text, "x"], images=[image], return_tensors="np", padding_side="right")
    assert isinstance(np_out["input_ids"], np.ndarray) and np_out["input_ids"].dtype == np.int64
    assert np_out["attention_mask"][1].tolist() == [1] * short + [0] * (n - short)
    as_lists = P([text, "x"], images=[[image], []], return_tensors=None, padding=False)
    assert [len(r) for r in as_lists["input_ids"]] == [n, short]
    # a cut landing exactly after an image run keeps the image; one token less drops it (never a partial run)
    soi = base["input_ids"][0].tolist().index(P.soi_token_id)
    assert P(text, images=[image], max_length=soi + 1 + Q, truncation=True)["num_images"].tolist() == [1]
    with CaptureLogger(processing_deem.logger):
        cut = P(text, images=[image], max_length=soi + Q, truncation=True)
    assert cut["num_images"].tolist() == [0] and cut["input_ids"][0].tolist() == base["input_ids"][0, :soi].tolist()
    # text that only looks like a marker stays text; a marker between two halves of a raw token is fine
    assert P("<ima ge> <|sniff<image>er|>", images=[image])["num_images"].tolist() == [1]
    # images-only call, with per-row lists flattened
    only = P(images=[[image], [image, image]], image_masks=[[None], [None, np.ones((4, 5), bool)]])
    assert only["pixel_values"].shape == (3, 3, S, S) and only["image_masks"][2].min() == 1
    # a mode-'P' image through the processor keeps its colour
    red = P("<image>", images=[rgb(RED).convert("P")])["pixel_values"][0].mean(dim=(1, 2))
    torch.testing.assert_close(red, torch.tensor([1.0, 0.0, 0.0]))
