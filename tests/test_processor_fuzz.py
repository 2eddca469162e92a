"""Hypothesis fuzz of DeemProcessor: random interleavings of text and `<image>` markers, images of every PIL mode and
size (0 and 1 px included), numpy / torch pixel data, masks, padding, truncation and batch shapes.

Every call either returns output that passes the invariant checks (ids in the vocabulary, one whole placeholder run
of `num_image_tokens` per kept image, per-row image counts matching `pixel_values`, finite pixels in [0, 1], binary
masks, attention_mask consistent with the padding side, truncation a maximal prefix that never splits a run) or
raises our own ValueError / TypeError. Inputs built with a known fault must raise; fault-free inputs may only raise
the few errors a valid request can meet (row longer than max_length without truncation, ...).

Profiles (DEEM_FUZZ_PROFILE): "ci" (default, 2000 seeded examples) and "slow" (20000 random examples).
"""

import os
import re
import traceback

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tokenizer_utils import build_test_tokenizer
from transformers.utils import logging

from deem.modeling import processing_deem
from deem.modeling.image_processing_deem import DeemImageProcessor
from deem.modeling.processing_deem import DeemProcessor, prepare_tokenizer

_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("deem-fuzz-ci", max_examples=2000, derandomize=True, **_COMMON)
settings.register_profile("deem-fuzz-slow", max_examples=20000, derandomize=False, **_COMMON)
PROFILE = os.environ.get("DEEM_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "slow"):
    raise ValueError(f"DEEM_FUZZ_PROFILE must be 'ci' or 'slow', got {PROFILE!r}")
FUZZ_SETTINGS = settings.get_profile(f"deem-fuzz-{PROFILE}")
TIMEOUT = 300 if PROFILE == "ci" else 3600

S, D = 4, 4  # encoder / decoder view sizes: tiny on purpose
TOKENIZER = prepare_tokenizer(build_test_tokenizer())
PROCESSORS = {
    q: DeemProcessor(DeemImageProcessor(size=S, decoder_size=D), TOKENIZER, num_image_tokens=q) for q in (1, 2)
}
OUR_FILES = ("processing_deem.py", "image_processing_deem.py")
# errors a fault-free request can still meet
ALLOWED_FOR_VALID = ("more than max_length", "different lengths", "gives no tokens", "would leave no tokens")

PIL_MODES = ["RGB", "RGBA", "RGBa", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"]
HIGH_DEPTH_MODES = ["I", "I;16", "I;16B", "F"]
WORDS = ["a", "cat", "the image", "中", " ", "\n", "<s>", "</s>", "<unk>", "<ref>", "</ref>", "<box>", "</box>", "x y"]


# ---------------------------------------------------------------- strategies
# A request holds at most one deliberate fault (FAULTS), drawn for about 40 % of the requests; everything else in it
# is valid. A fault that does not apply to the drawn request (e.g. an image fault without images) is dropped.

# fault -> the error it must raise (it is the first thing wrong: options, text, counts, images are checked in turn)
FAULTS = {
    "raw-token": r"contains the raw token",
    "image-junk": r"image \d+ (is None|has unsupported type|has boolean|has non-numeric|must have 3)",
    "image-empty": r"image \d+ is empty",
    "image-values": r"image \d+ (\(\w+\) )?(has \d+ NaN|must lie in)",
    "mask": r"mask \d+ (must be|has NaN|has shape|must have shape)",
    "too-few-images": r"markers in total .* but \d+ images",
    "too-many-images": r"markers in total .* but \d+ images",
    "ragged-images": r"images mixes per-row lists",
    "no-images": r"markers in total .* but 0 images",
    "padding": r"padding must be",
    "padding-side": r"padding_side must be",
    "max-length": r"max_length must be a positive int",
    "max-length-missing": r"padding='max_length' needs max_length",
}
FAULT_WEIGHTS = [name for name in FAULTS for _ in range(2 if name.startswith(("image", "mask")) else 1)]


@st.composite
def image_sizes(draw, empty: bool = False):
    """(width, height): 1..4 px, sometimes a long 1-px strip (the centre crop's direct-window path)."""
    if empty:
        return draw(st.sampled_from([(0, 0), (0, 3), (2, 0)]))
    if draw(st.integers(0, 9)) == 0:
        long = draw(st.integers(17, 40))
        return (long, 1) if draw(st.booleans()) else (1, long)
    return draw(st.integers(1, 4)), draw(st.integers(1, 4))


def _high_depth(mode, rng, width, height, bad_values):
    if mode == "F":
        values = rng.random((height, width)).astype(np.float32)
        if bad_values:
            values.flat[0] = np.nan if rng.random() < 0.5 else 3.0
        return PIL.Image.fromarray(values)
    if mode == "I":
        high = 255 if rng.random() < 0.5 else 65535
        values = rng.integers(0, high + 1, (height, width)).astype(np.int32)
        if bad_values:
            values.flat[0] = -1 if rng.random() < 0.5 else 70000
        return PIL.Image.fromarray(values)
    values = rng.integers(0, 65536, (height, width))
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return PIL.Image.frombytes(mode, (width, height), values.astype(dtype).tobytes())


JUNK = {
    "none": lambda: None,
    "int": lambda: 3,
    "2d": lambda: np.zeros((2, 2), np.uint8),
    "4ch": lambda: np.zeros((2, 2, 4), np.uint8),
    "bool": lambda: np.zeros((2, 2, 3), bool),
    "str-dtype": lambda: np.full((2, 2, 3), "a"),
    "complex": lambda: torch.zeros(3, 2, 2, dtype=torch.cfloat),
}


@st.composite
def images(draw, fault: str | None = None):
    """One image; `fault` "image-junk" / "image-empty" / "image-values" makes it bad input."""
    if fault == "image-junk":
        return JUNK[draw(st.sampled_from(sorted(JUNK)))]()
    kinds = ["pil", "pil", "pil", "high", "uint8", "uint16", "float", "torch"]
    if fault == "image-values":
        kind = draw(st.sampled_from(["high-bad", "float", "torch-float"]))
    else:
        kind = draw(st.sampled_from(kinds))
    width, height = draw(image_sizes(empty=fault == "image-empty"))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "pil":
        mode = draw(st.sampled_from(PIL_MODES))
        if fault == "image-empty":
            return PIL.Image.new(mode, (width, height))
        base = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8))
        if mode == "RGBa":
            return base.convert("RGBa")
        if mode == "La":
            return base.convert("LA").convert("La")
        image = base.convert(mode)
        if mode in ("RGB", "L", "P") and draw(st.booleans()):
            image.info["transparency"] = 0 if mode != "RGB" else (0, 0, 0)
        return image
    if kind in ("high", "high-bad"):
        mode = draw(st.sampled_from(HIGH_DEPTH_MODES if kind == "high" else ["I", "F"]))
        if fault == "image-empty":
            return PIL.Image.new(mode, (width, height))
        return _high_depth(mode, rng, width, height, bad_values=kind == "high-bad")
    if kind == "uint8":
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind == "uint16":
        return rng.integers(0, 65536, (height, width, 3)).astype(np.uint16)
    if kind == "float":
        array = rng.random((height, width, 3)).astype(draw(st.sampled_from([np.float32, np.float64, np.float16])))
        if array.size and draw(st.booleans()):
            array.flat[0] = 1.0004  # a rounding overshoot: clipped, fine
        if fault == "image-values":
            array.flat[-1] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 255.0, -0.5]))
        return array
    tensor = torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8))
    if kind == "torch-float" or draw(st.booleans()):
        tensor = tensor.float() / 255
        if fault == "image-values":
            tensor.view(-1)[-1] = float("nan")
    return tensor


def image_shape(image):
    """(H, W) of a valid image, else None."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor) and image.ndim == 3:
        return tuple(image.shape[1:])
    if isinstance(image, np.ndarray) and image.ndim == 3:
        return image.shape[:2]
    return None


@st.composite
def masks_for(draw, image, fault: bool = False):
    """A mask for `image` (None, or a valid one in some format); `fault` makes it bad (needs a valid image)."""
    shape = image_shape(image)
    if shape is None or 0 in shape:
        return None
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    mask = rng.random(shape) < 0.5
    if fault:
        bad = draw(st.sampled_from(["soft", "nan", "size", "labels", "rgb"]))
        return {
            "soft": lambda: np.full(shape, 0.5),
            "nan": lambda: np.full(shape, np.nan),
            "size": lambda: np.ones((shape[0] + 1, shape[1]), bool),
            "labels": lambda: np.full(shape, 2, np.uint8),
            "rgb": lambda: PIL.Image.new("RGB", (shape[1], shape[0])),
        }[bad]()
    kind = draw(st.sampled_from(["none", "bool", "uint8", "float", "pil", "chw"]))
    return {
        "none": lambda: None,
        "bool": lambda: mask,
        "uint8": lambda: mask.astype(np.uint8) * 255,
        "float": lambda: torch.from_numpy(mask.astype(np.float32)),
        "pil": lambda: PIL.Image.fromarray(mask.astype(np.uint8) * 255),
        "chw": lambda: mask[None],
    }[kind]()


@st.composite
def rows(draw, max_images: int = 3):
    """One text row: words, special tokens and up to `max_images` markers."""
    words = draw(st.lists(st.sampled_from(WORDS), max_size=5))
    for _ in range(draw(st.integers(0, max_images))):
        words.insert(draw(st.integers(0, len(words))), "<image>")
    return draw(st.sampled_from(["", " "])).join(words)


@st.composite
def requests(draw):
    """A whole processor call: (num_image_tokens, kwargs, per-row marker counts, whether it holds a fault)."""
    fault = draw(st.sampled_from(FAULT_WEIGHTS)) if draw(st.integers(0, 9)) < 4 else None
    texts = draw(st.lists(rows(), min_size=1, max_size=3))
    applied = False
    if fault == "raw-token":
        row = draw(st.integers(0, len(texts) - 1))
        raw = draw(st.sampled_from(["<|sniffer|>", "<|startofimage|>"]))
        texts[row] = texts[row] + raw if draw(st.booleans()) else raw + texts[row]
        applied = True
    counts = [t.count("<image>") for t in texts]
    n_images = sum(counts)
    image_fault_at = draw(st.integers(0, n_images - 1)) if n_images else None
    image_fault = fault if fault in ("image-junk", "image-empty", "image-values") else None
    flat_images = [draw(images(image_fault if k == image_fault_at else None)) for k in range(n_images)]
    applied |= image_fault is not None and image_fault_at is not None
    with_masks = draw(st.integers(0, 3)) == 0 or fault == "mask"
    flat_masks = None
    if with_masks:
        valid_at = [k for k, im in enumerate(flat_images) if image_shape(im) is not None and 0 not in image_shape(im)]
        mask_fault_at = draw(st.sampled_from(valid_at)) if fault == "mask" and valid_at else None
        flat_masks = [draw(masks_for(im, fault=k == mask_fault_at)) for k, im in enumerate(flat_images)]
        applied |= mask_fault_at is not None
    starts = np.cumsum([0] + counts).tolist()
    per_row = [flat_images[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    if fault == "too-few-images" and n_images:
        image_arg, applied = flat_images[:-1], True
    elif fault == "too-many-images":
        image_arg, applied = flat_images + [PIL.Image.new("RGB", (2, 2))], True
    elif fault == "ragged-images" and n_images >= 2:
        image_arg, applied = [flat_images[0], flat_images[1:]], True
    elif fault == "no-images" and n_images:
        image_arg, applied = None, True
    else:
        layout = draw(st.sampled_from(["flat", "per-row", "single"]))
        if layout == "per-row":
            image_arg = per_row
        elif layout == "single" and n_images == 1 and fault != "image-junk":  # a lone None / int is no image
            image_arg = flat_images[0]
        else:
            image_arg = flat_images if n_images or draw(st.booleans()) else None
    mask_arg = None
    if flat_masks is not None:
        if draw(st.booleans()):
            mask_arg = flat_masks
        else:
            mask_arg = [flat_masks[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    padding = draw(st.sampled_from([True, False, "longest", "max_length", "do_not_pad"]))
    padding_side = draw(st.sampled_from([None, "left", "right"]))
    max_length = draw(st.one_of(st.none(), st.integers(1, 24)))
    if padding == "max_length" and max_length is None:
        max_length = draw(st.integers(1, 24))
    if fault == "padding":
        padding, applied = draw(st.sampled_from(["bogus", 1, None, "True"])), True
    elif fault == "padding-side":
        padding_side, applied = draw(st.sampled_from(["middle", "LEFT", 0])), True
    elif fault == "max-length":
        max_length, applied = draw(st.sampled_from([0, -1, 2.5, "8", True])), True
    elif fault == "max-length-missing":
        padding, max_length, applied = "max_length", None, True
    kwargs = dict(
        text=texts if len(texts) > 1 or draw(st.booleans()) else texts[0],
        images=image_arg,
        image_masks=mask_arg,
        padding=padding,
        padding_side=padding_side,
        max_length=max_length,
        truncation=draw(st.integers(0, 3)) > 0,
        add_eos=draw(st.booleans()),
        add_special_tokens=draw(st.integers(0, 4)) > 0,
        return_tensors=draw(st.sampled_from(["pt", "np", None])),
        do_center_crop=draw(st.booleans()),
        do_flip=draw(st.booleans()),
        return_decoder_view=draw(st.booleans()),
        generator=draw(st.one_of(st.none(), st.integers(0, 5))),
    )
    event(f"fault: {fault if applied else None}")
    q = draw(st.sampled_from(sorted(PROCESSORS)))
    return q, kwargs, counts, fault if applied else None


# ---------------------------------------------------------------- invariants


def as_lists(value) -> list:
    return value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else [list(r) for r in value]


def check_output(processor, out, kwargs, counts):
    q, tok = processor.num_image_tokens, processor.tokenizer
    soi, img, pad = processor.soi_token_id, processor.image_token_id, tok.pad_token_id
    return_tensors, max_length = kwargs["return_tensors"], kwargs["max_length"]
    if return_tensors == "pt":
        assert out["input_ids"].dtype == torch.int64 and out["input_ids"].ndim == 2
    elif return_tensors == "np":
        assert out["input_ids"].dtype == np.int64 and out["input_ids"].ndim == 2
    ids, attention, num_images = (
        as_lists(out["input_ids"]),
        as_lists(out["attention_mask"]),
        as_lists(out["num_images"]),
    )
    assert len(ids) == len(attention) == len(num_images) == len(counts)
    side = kwargs["padding_side"] or tok.padding_side
    widths = {len(r) for r in ids}
    if kwargs["padding"] == "max_length":
        assert widths == {max_length}
    real_rows = []
    for row, mask, n, count in zip(ids, attention, num_images, counts, strict=True):
        assert len(row) == len(mask) and set(mask) <= {0, 1}
        n_real = sum(mask)
        assert n_real >= 1, "empty row"
        ones, zeros = [1] * n_real, [0] * (len(mask) - n_real)
        assert mask == (ones + zeros if side == "right" else zeros + ones), (side, mask)
        assert all(t == pad for t, m in zip(row, mask, strict=True) if not m)
        assert all(0 <= t < len(tok) for t in row)
        real = [t for t, m in zip(row, mask, strict=True) if m]
        if max_length is not None:
            assert len(real) <= max_length
        if kwargs["add_special_tokens"] and tok.bos_token_id is not None:
            assert real[0] == tok.bos_token_id
        starts = [i for i, t in enumerate(real) if t == soi]
        assert len(starts) == n <= count
        for s in starts:
            assert real[s + 1 : s + 1 + q] == [img] * q, "partial image run"
            assert s + 1 + q == len(real) or real[s + 1 + q] != img, "run too long"
        assert real.count(img) == q * n
        if max_length is None:
            assert n == count
        real_rows.append(real)
    total = sum(num_images)
    assert out["num_images"].dtype in (torch.int64, np.int64) if return_tensors else True
    if total == 0:
        assert "pixel_values" not in out and "image_masks" not in out
        return real_rows
    pixels = torch.as_tensor(np.asarray(out["pixel_values"]))
    assert pixels.shape == (total, 3, S, S) and pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1
    if kwargs["return_decoder_view"]:
        decoder = torch.as_tensor(np.asarray(out["pixel_values_decoder"]))
        assert decoder.shape == (total, 3, D, D) and torch.isfinite(decoder).all()
        assert decoder.min() >= 0 and decoder.max() <= 1
    else:
        assert "pixel_values_decoder" not in out
    if kwargs["image_masks"] is not None:
        masks = torch.as_tensor(np.asarray(out["image_masks"]))
        assert masks.shape == (total, 1, S, S) and set(masks.unique().tolist()) <= {0.0, 1.0}
    else:
        assert "image_masks" not in out
    return real_rows


def check_truncation(processor, kwargs, real_rows, counts):
    """Each truncated row is the longest prefix of the full row within max_length that does not split a run."""
    full_kwargs = dict(kwargs, max_length=None, padding=False, return_tensors=None, do_flip=False)
    full = processor(**full_kwargs)
    run = 1 + processor.num_image_tokens
    for real, whole, count in zip(real_rows, full["input_ids"], counts, strict=True):
        whole = list(whole)
        assert whole[: len(real)] == real
        if len(real) < len(whole):
            nxt = len(real)
            assert len(real) == kwargs["max_length"] or (
                whole[nxt] == processor.soi_token_id and nxt + run > kwargs["max_length"]
            ), "the cut is not maximal"
        assert whole.count(processor.soi_token_id) == count


def check_pixels_match(processor, kwargs, out, counts):
    """Without flips, the kept images are the first ones of each row, processed alone to the same pixels."""
    flat = kwargs["images"]
    if isinstance(flat, list) and flat and all(isinstance(r, list) for r in flat):
        per_row = flat
    else:
        flat = [flat] if not isinstance(flat, list) else flat
        starts = np.cumsum([0] + counts).tolist()
        per_row = [flat[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    kept = [im for row, n in zip(per_row, as_lists(out["num_images"]), strict=True) for im in row[:n]]
    alone = processor.image_processor(
        kept, do_center_crop=kwargs["do_center_crop"], return_decoder_view=False, return_tensors="pt"
    )
    torch.testing.assert_close(torch.as_tensor(np.asarray(out["pixel_values"])), alone["pixel_values"])


def raised_in_our_code(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and os.path.basename(frames[-1].filename) in OUR_FILES


@pytest.mark.timeout(TIMEOUT)
@FUZZ_SETTINGS
@given(request=requests())
def test_processor_fuzz(request):
    q, kwargs, counts, fault = request
    processor = PROCESSORS[q]
    log = processing_deem.logger
    level = log.level
    log.setLevel(logging.ERROR)  # truncation warnings are expected here
    try:
        try:
            out = processor(**kwargs)
        except (ValueError, TypeError) as err:
            assert raised_in_our_code(err), f"{type(err).__name__} from a library: {err}"
            if fault is None:
                assert any(reason in str(err) for reason in ALLOWED_FOR_VALID), f"valid input refused: {err}"
                event("refused (valid input, allowed reason)")
            else:
                assert re.search(FAULTS[fault], str(err)), f"fault {fault!r} refused with another error: {err}"
                event("refused (faulty input)")
            return
        assert fault is None, f"bad input ({fault}) accepted: {kwargs}"
        event(f"accepted, {sum(as_lists(out['num_images']))} image(s) kept")
        real_rows = check_output(processor, out, kwargs, counts)
        if kwargs["max_length"] is not None and kwargs["truncation"]:
            check_truncation(processor, kwargs, real_rows, counts)
        if "pixel_values" in out and not kwargs["do_flip"]:
            check_pixels_match(processor, kwargs, out, counts)
    finally:
        log.setLevel(level)


def test_fuzz_profiles():
    assert settings.get_profile("deem-fuzz-ci").max_examples >= 2000
    assert settings.get_profile("deem-fuzz-ci").derandomize
    assert settings.get_profile("deem-fuzz-slow").max_examples == 20000
    assert FUZZ_SETTINGS.max_examples == (2000 if PROFILE == "ci" else 20000)
