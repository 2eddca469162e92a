"""DEEM image processor: encoder view, decoder (diffusion) view and region masks of each image.

Transform of the original data pipeline (reference §6.1), applied to every view at its own resolution:
- ``do_center_crop=False`` (SFT / eval default): bicubic resize to a square, aspect ratio not preserved.
- ``do_center_crop=True`` (stage-1 pretraining): halve with a BOX filter while the short side is >= 2x the
  target, bicubic-resize the short side to the target (long side rounded), then centre-crop. For aspect ratios
  beyond 16:1 the crop window is resampled directly instead (the same window, without building the huge
  intermediate image).
- ``do_flip`` (training only): random horizontal flip with probability ``flip_prob``. One draw per image is
  shared by its encoder view, decoder view and mask (the original flips the views independently, bug B5).
Outputs are float32 in [0, 1] and NOT normalised: the model applies the CLIP mean/std (``image_mean`` /
``image_std``) to the encoder view and maps the decoder view to [-1, 1] itself, as the original does.

Accepted pixel data (anything else is refused with a ``TypeError`` / ``ValueError`` naming the image):
- PIL images of any mode. 8-bit modes go through PIL's own conversion ("P" through its palette, "1", "L",
  "CMYK", "YCbCr", "LAB", "HSV"); "I;16*" is scaled by its 16-bit range (value / 65535); "F" must hold values in
  [0, 1] like any float data; "I" (what older Pillow gives 16-bit PNGs) is 8-bit when its values fit in
  [0, 255] and 16-bit when they fit in [0, 65535]. Transparency ("RGBA", "RGBa", "LA", "La", "PA", a palette or
  colour-key ``transparency``) is composited over a white background.
- numpy arrays / torch tensors (H, W, 3) or (3, H, W) (tensors: channels first): uint8 in [0, 255], uint16 in
  [0, 65535], other integer types in [0, 255], floats finite in [0, 1].
- a path or URL (loaded with transformers' ``load_image``).
Every image needs at least 1x1 pixels. Masks are binary: bool, integers 0/1 (or 0/255), or floats 0.0/1.0, of
the image's (H, W) (also given as (1, H, W) or (H, W, 1)), as numpy, torch or single-channel PIL ("1", "L",
"I", "I;16*", "F").
"""

import math
import numbers

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_image
from transformers.processing_utils import ImagesKwargs
from transformers.utils import TensorType


class DeemImagesKwargs(ImagesKwargs, total=False):
    """Options of `DeemImageProcessor` beyond the standard ones (see its docstring)."""

    decoder_size: int
    do_flip: bool
    flip_prob: float
    return_decoder_view: bool


FLOAT_TOLERANCE = 1e-3  # float pixels may overshoot [0, 1] by this much (rounding); they are clipped
MAX_CROP_ASPECT = 16  # centre crop: beyond this aspect ratio the crop window is resampled directly
ALPHA_BACKGROUND = (255, 255, 255)
RETURN_TENSORS = (None, "pt", "np")
PREPROCESS_OPTIONS = (
    "size",
    "decoder_size",
    "do_center_crop",
    "do_flip",
    "flip_prob",
    "return_decoder_view",
)
_MASK_MODES = ("1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")


# ---------------------------------------------------------------- option checks


def _type_name(value) -> str:
    return type(value).__name__


def _square_size(size, name: str) -> int:
    if isinstance(size, dict):
        if set(size) != {"height", "width"} or size["height"] != size["width"]:
            raise ValueError(f"{name} must be an int or a square {{'height', 'width'}} dict, got {size}")
        size = size["height"]
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {_type_name(size)} {size!r}")
    if size <= 0:
        raise ValueError(f"{name} must be a positive int, got {size!r}")
    return int(size)


def check_bool(value, name: str) -> bool:
    """`value` as a bool; a `TypeError` naming `name` for anything but a Python / numpy bool."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {_type_name(value)} {value!r}")


def _check_probability(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {_type_name(value)} {value!r}")
    if not 0.0 <= float(value) <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
    return float(value)


def check_return_tensors(return_tensors):
    """`None`, "pt" or "np" (a `TensorType` too); a `ValueError` for anything else."""
    if isinstance(return_tensors, TensorType):
        return_tensors = return_tensors.value
    if not (return_tensors is None or isinstance(return_tensors, str)) or return_tensors not in RETURN_TENSORS:
        raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
    return return_tensors


def check_generator(generator):
    """`None`, a CPU `torch.Generator`, or an int seed in [0, 2**64) turned into one."""
    if generator is None or isinstance(generator, torch.Generator):
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        return generator
    if isinstance(generator, (bool, np.bool_)) or not isinstance(generator, numbers.Integral):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {_type_name(generator)}")
    if not 0 <= int(generator) < 2**64:
        raise ValueError(f"generator seed must lie in [0, 2**64), got {generator}")
    return torch.Generator().manual_seed(int(generator))


def _check_stats(values, name: str) -> list[float]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != 3:
        raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {values!r}")
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be 3 finite numbers, got {values!r}")
        out.append(float(v))
    if name == "image_std" and min(out) <= 0:
        raise ValueError(f"image_std must be positive, got {values!r}")
    return out


# ---------------------------------------------------------------- pixels


def _to_numpy(array, what: str, index: int) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        if array.layout != torch.strided or array.is_meta:
            raise TypeError(f"{what} {index} is a {array.layout} / {array.device} tensor; expected a dense one")
        if array.is_complex():
            raise TypeError(f"{what} {index} has non-numeric dtype {array.dtype}; expected uint8 or float")
        array = array.detach().cpu()
        array = (array.float() if array.dtype == torch.bfloat16 else array).numpy()
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{what} {index} has non-numeric dtype {array.dtype}; expected uint8 or float")
    return array


def _check_not_empty(shape, index: int, what: str = "image") -> None:
    if 0 in shape:
        raise ValueError(f"{what} {index} is empty: (H, W) = {tuple(shape)}; expected at least 1x1 pixels")


def _float_to_unit(array: np.ndarray, what: str, index: int) -> np.ndarray:
    """Finite float data in [0, 1] (within `FLOAT_TOLERANCE`) -> float64 clipped to [0, 1]."""
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"float {what} {index} has {bad} NaN or infinite value(s); expected finite values in [0, 1]")
    low, high = float(array.min()), float(array.max())
    if low < -FLOAT_TOLERANCE or high > 1 + FLOAT_TOLERANCE:
        raise ValueError(
            f"float {what} {index} must lie in [0, 1], got range [{low:.4g}, {high:.4g}]"
            + ("; divide 0..255 data by 255 (or pass uint8)" if high <= 255 and low >= 0 else "")
        )
    return np.clip(array, 0.0, 1.0)


def _pixels_to_uint8(array: np.ndarray, index: int, infer_depth: bool = False) -> np.ndarray:
    """Numeric pixel data -> uint8, by the rules of the module docstring (`infer_depth`: PIL mode "I")."""
    kind = array.dtype.kind
    if kind == "b":
        raise TypeError(f"image {index} has boolean dtype; expected uint8 in [0, 255] or float in [0, 1]")
    if kind == "f":
        return np.round(_float_to_unit(array, "image", index) * 255).astype(np.uint8)
    if array.dtype == np.uint8:
        return array
    low, high = int(array.min()), int(array.max())
    sixteen_bit = (kind == "u" and array.dtype.itemsize == 2) or (infer_depth and high > 255)
    if sixteen_bit:
        if low < 0 or high > 65535:
            raise ValueError(f"16-bit image {index} must lie in [0, 65535], got range [{low}, {high}]")
        return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    if low < 0 or high > 255:
        raise ValueError(
            f"integer image {index} ({array.dtype}) must lie in [0, 255], got range [{low}, {high}]; "
            "pass 16-bit data as uint16 in [0, 65535] or float data in [0, 1]"
        )
    return array.astype(np.uint8)


def _composite(rgb: np.ndarray, alpha: np.ndarray, premultiplied: bool) -> np.ndarray:
    """uint8 colour (H, W, C) with uint8 alpha (H, W) over `ALPHA_BACKGROUND` (white) -> uint8."""
    colour, a = rgb.astype(np.float64), alpha.astype(np.float64)[..., None] / 255.0
    background = np.asarray(ALPHA_BACKGROUND[: rgb.shape[-1]], dtype=np.float64)
    out = colour + background * (1 - a) if premultiplied else colour * a + background * (1 - a)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _pil_to_rgb(image: PIL.Image.Image, index: int) -> PIL.Image.Image:
    try:
        image.load()
    except Exception as err:  # a truncated or corrupt file surfaces here, from any of PIL's decoders
        raise ValueError(f"image {index} could not be decoded: {err}") from err
    _check_not_empty((image.height, image.width), index)
    mode, transparent = image.mode, image.info.get("transparency") is not None
    if mode == "RGB" and not transparent:
        return image
    if mode in ("I", "F") or mode.startswith("I;16"):
        gray = _pixels_to_uint8(np.asarray(image), index, infer_depth=mode == "I")
        return PIL.Image.fromarray(gray).convert("RGB")
    if mode in ("RGBa", "La"):
        array = np.asarray(image)
        out = _composite(array[..., :-1], array[..., -1], premultiplied=True)
        return PIL.Image.fromarray(out[..., 0] if mode == "La" else out).convert("RGB")
    try:
        if mode in ("RGBA", "LA", "PA") or transparent:
            rgba = np.asarray(image.convert("RGBA"))
            return PIL.Image.fromarray(_composite(rgba[..., :3], rgba[..., 3], premultiplied=False))
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(f"image {index} has PIL mode {mode!r}, which cannot be converted to RGB: {err}") from err


def to_rgb_image(image, index: int = 0) -> PIL.Image.Image:
    """One image (PIL, path/URL, numpy / torch array) -> a validated RGB PIL image (see the module docstring)."""
    if isinstance(image, str):
        try:
            image = load_image(image)
        except Exception as err:  # load_image raises whatever its source (file, URL, base64) raises
            raise ValueError(f"image {index}: could not load {image[:200]!r}: {err}") from err
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image, index)
    if image is None:
        raise TypeError(f"image {index} is None; expected a PIL image, a path, a numpy array or a torch tensor")
    if not isinstance(image, (np.ndarray, torch.Tensor)):
        raise TypeError(f"image {index} has unsupported type {_type_name(image)}; expected PIL, a path, numpy or torch")
    channels_first = isinstance(image, torch.Tensor)
    array = _to_numpy(image, "image", index)
    if array.ndim != 3:
        raise ValueError(f"image {index} must have 3 dimensions (H, W, 3) or (3, H, W), got shape {array.shape}")
    first, last = array.shape[0] == 3, array.shape[-1] == 3
    if not (first or last):
        raise ValueError(f"image {index} must have 3 (RGB) channels first or last, got shape {array.shape}")
    if first and (channels_first or not last):
        array = array.transpose(1, 2, 0)
    _check_not_empty(array.shape[:2], index)
    return PIL.Image.fromarray(np.ascontiguousarray(_pixels_to_uint8(array, index)))


def to_binary_mask(mask, index: int, image_size: tuple[int, int]) -> np.ndarray:
    """One mask of an image of (H, W) = `image_size` -> bool (H, W) (see the module docstring)."""
    if isinstance(mask, PIL.Image.Image):
        if mask.mode not in _MASK_MODES:
            raise ValueError(
                f"mask {index} must be a single-channel PIL image (mode {', '.join(_MASK_MODES[:4])} or I;16), "
                f"got mode {mask.mode!r}"
            )
        mask = np.asarray(mask)
    if not isinstance(mask, (np.ndarray, torch.Tensor)):
        raise TypeError(f"mask {index} has unsupported type {_type_name(mask)}; expected PIL, numpy or torch")
    array = _to_numpy(mask, "mask", index)
    if array.ndim == 3 and array.shape[0] == 1 and array.shape[1:] == image_size:
        array = array[0]
    elif array.ndim == 3 and array.shape[-1] == 1 and array.shape[:2] == image_size:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"mask {index} must have shape (H, W), (1, H, W) or (H, W, 1), got {array.shape}")
    if array.shape != image_size:
        raise ValueError(f"mask {index} has shape {array.shape} but its image is (H, W) = {image_size}")
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(bool)
    if kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"float mask {index} has NaN or infinite values; expected 0.0 / 1.0")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            raise ValueError(f"float mask {index} must lie in [0, 1] and be binary, got [{low:.4g}, {high:.4g}]")
        soft = array[(array != 0) & (array != 1)]
        if soft.size:
            raise ValueError(
                f"mask {index} must be binary (0.0 or 1.0), got {soft.size} value(s) such as {float(soft[0]):.4g}; "
                "threshold a soft mask yourself, e.g. mask > 0.5"
            )
        return array == 1
    values = np.unique(array)
    allowed = [v for v in ((0, 1), (0, 255), (0, 65535)) if np.isin(values, v).all()]
    if not allowed:
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise ValueError(f"integer mask {index} must be binary (0/1 or 0/255), got values {shown}")
    return array != 0


def _as_list(images, what: str) -> list:
    if images is None:
        raise TypeError(f"{what} is None; expected one {what[:-1]} or a list of them")
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


def _crop_window(size: tuple[int, int], target: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Centre crop after resizing the short side to `target`: (resized W, H) and the crop box in it."""
    scale = target / min(size)
    width, height = max(target, round(size[0] * scale)), max(target, round(size[1] * scale))
    left, top = (width - target) // 2, (height - target) // 2
    return (width, height), (left, top, left + target, top + target)


def _resize(image: PIL.Image.Image, target: int, center_crop: bool, halve, resample) -> PIL.Image.Image:
    """Resize (and optionally centre-crop) one PIL image to ``target x target``."""
    if not center_crop:
        return image.resize((target, target), resample=resample)
    while min(image.size) >= 2 * target:
        image = image.resize((image.width // 2, image.height // 2), resample=halve)
    (width, height), box = _crop_window(image.size, target)
    if max(width, height) <= MAX_CROP_ASPECT * target:
        return image.resize((width, height), resample=resample).crop(box)
    # the same window mapped back into the source, resampled at once (no width x height intermediate)
    sx, sy = image.width / width, image.height / height
    window = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return image.resize((target, target), resample=resample, box=window)


class DeemImageProcessor(BaseImageProcessor):
    r"""
    Builds DEEM's two views of each image (and optional region masks).

    Args:
        size (`int`, defaults to 256): encoder resolution S (256 in stage 1, 448 in stages 2-3).
        decoder_size (`int`, defaults to 512): resolution of the diffusion (decoder) view.
        do_center_crop (`bool`, defaults to `False`): centre-crop path of §6.1 instead of a square resize.
        do_flip (`bool`, defaults to `False`): random horizontal flip, shared by all views of an image.
        flip_prob (`float`, defaults to 0.5): flip probability when `do_flip`.
        return_decoder_view (`bool`, defaults to `True`): also return `pixel_values_decoder`.
        image_mean, image_std: OpenAI CLIP statistics; not applied here, read by the model config.

    Returns (`preprocess` / `__call__`), for N images:
        - `pixel_values`: float32 [N, 3, S, S] in [0, 1].
        - `pixel_values_decoder`: float32 [N, 3, decoder_size, decoder_size] in [0, 1] (if requested).
        - `image_masks`: float32 [N, 1, S, S] of 0 / 1 (only when `image_masks` is given; all ones for `None`
          entries).
    """

    model_input_names = ["pixel_values", "pixel_values_decoder", "image_masks"]
    valid_kwargs = DeemImagesKwargs

    def __init__(
        self,
        size: int = 256,
        decoder_size: int = 512,
        do_center_crop: bool = False,
        do_flip: bool = False,
        flip_prob: float = 0.5,
        return_decoder_view: bool = True,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = _square_size(size, "size")
        self.decoder_size = _square_size(decoder_size, "decoder_size")
        self.do_center_crop = check_bool(do_center_crop, "do_center_crop")
        self.do_flip = check_bool(do_flip, "do_flip")
        self.flip_prob = _check_probability(flip_prob, "flip_prob")
        self.return_decoder_view = check_bool(return_decoder_view, "return_decoder_view")
        self.image_mean = _check_stats(OPENAI_CLIP_MEAN if image_mean is None else image_mean, "image_mean")
        self.image_std = _check_stats(OPENAI_CLIP_STD if image_std is None else image_std, "image_std")

    # ---------------------------------------------------------------- the three steps of `preprocess`

    def resolve_options(self, **options) -> dict:
        """The `preprocess` options (`PREPROCESS_OPTIONS`), checked; `None` or absent = this processor's setting."""
        unknown = sorted(set(options) - set(PREPROCESS_OPTIONS))
        if unknown:
            raise TypeError(f"unknown image processor option(s) {unknown}; expected some of {list(PREPROCESS_OPTIONS)}")
        resolved = {
            name: getattr(self, name) if options.get(name) is None else options[name] for name in PREPROCESS_OPTIONS
        }
        return {
            "size": _square_size(resolved["size"], "size"),
            "decoder_size": _square_size(resolved["decoder_size"], "decoder_size"),
            "do_center_crop": check_bool(resolved["do_center_crop"], "do_center_crop"),
            "do_flip": check_bool(resolved["do_flip"], "do_flip"),
            "flip_prob": _check_probability(resolved["flip_prob"], "flip_prob"),
            "return_decoder_view": check_bool(resolved["return_decoder_view"], "return_decoder_view"),
        }

    def prepare(self, images, image_masks=None) -> tuple[list[PIL.Image.Image], list | None]:
        """Check and convert N images (-> RGB PIL) and their masks (-> bool (H, W) or `None`); nothing is resized."""
        images = [to_rgb_image(image, i) for i, image in enumerate(_as_list(images, "images"))]
        if not images:
            raise ValueError("no images to process: images is an empty list")
        if image_masks is None:
            return images, None
        image_masks = _as_list(image_masks, "image_masks")
        if len(image_masks) != len(images):
            raise ValueError(f"got {len(image_masks)} image masks for {len(images)} images; counts must match")
        masks = [
            None if mask is None else to_binary_mask(mask, i, (image.height, image.width))
            for i, (mask, image) in enumerate(zip(image_masks, images, strict=True))
        ]
        return images, masks

    def build(self, images, masks, options: dict, generator=None, return_tensors=None) -> BatchFeature:
        """The views (and masks) of images / masks returned by `prepare`, with options from `resolve_options`."""
        size, decoder_size, center_crop = options["size"], options["decoder_size"], options["do_center_crop"]
        encoder, decoder, out_masks = [], [], []
        for i, image in enumerate(images):
            flip = options["do_flip"] and bool(torch.rand((), generator=generator) < options["flip_prob"])
            views = [(encoder, size)] + ([(decoder, decoder_size)] if options["return_decoder_view"] else [])
            for out, target in views:
                view = _resize(image, target, center_crop, PIL.Image.BOX, PIL.Image.BICUBIC)
                view = view.transpose(PIL.Image.FLIP_LEFT_RIGHT) if flip else view
                out.append(np.asarray(view, dtype=np.float32).transpose(2, 0, 1) / 255.0)
            if masks is not None:
                if masks[i] is None:
                    out_masks.append(np.ones((1, size, size), dtype=np.float32))
                    continue
                mask = PIL.Image.fromarray(masks[i].astype(np.float32))
                mask = _resize(mask, size, center_crop, PIL.Image.NEAREST, PIL.Image.NEAREST)
                mask = mask.transpose(PIL.Image.FLIP_LEFT_RIGHT) if flip else mask
                out_masks.append((np.asarray(mask, dtype=np.float32) > 0.5).astype(np.float32)[None])
        data = {"pixel_values": np.stack(encoder)}
        if options["return_decoder_view"]:
            data["pixel_values_decoder"] = np.stack(decoder)
        if masks is not None:
            data["image_masks"] = np.stack(out_masks)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def preprocess(
        self,
        images,
        image_masks: list | None = None,
        size: int | None = None,
        decoder_size: int | None = None,
        do_center_crop: bool | None = None,
        do_flip: bool | None = None,
        flip_prob: float | None = None,
        return_decoder_view: bool | None = None,
        generator: torch.Generator | int | None = None,
        return_tensors: str | None = "pt",
        **unknown,
    ) -> BatchFeature:
        """Process one image or a list of N images (PIL, path, numpy/torch uint8 or float in [0, 1]).

        `image_masks`: `None` or a list of N entries, each `None` (whole image) or an (H, W) binary mask of its
        image. `generator`: a `torch.Generator` or an int seed for the flips (global torch RNG when `None`).
        Every argument is checked before any image is resized.
        """
        options = self.resolve_options(
            size=size,
            decoder_size=decoder_size,
            do_center_crop=do_center_crop,
            do_flip=do_flip,
            flip_prob=flip_prob,
            return_decoder_view=return_decoder_view,
            **unknown,
        )
        generator = check_generator(generator)
        return_tensors = check_return_tensors(return_tensors)
        images, masks = self.prepare(images, image_masks)
        return self.build(images, masks, options, generator=generator, return_tensors=return_tensors)

    def postprocess(self, images, do_denormalize: bool = False, output_type: str = "pil"):
        """Generated images [N, 3, H, W] (or [3, H, W]) in [0, 1], or in [-1, 1] with `do_denormalize=True`.

        Returns a list of N RGB PIL images (`output_type="pil"`), a uint8 numpy array [N, H, W, 3] ("np") or a
        float32 tensor [N, 3, H, W] in [0, 1] ("pt"). NaN pixels (a diverged decode) are refused.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        do_denormalize = check_bool(do_denormalize, "do_denormalize")
        if not isinstance(images, (torch.Tensor, np.ndarray)):
            raise TypeError(f"images must be a torch tensor or numpy array [N, 3, H, W], got {_type_name(images)}")
        images = torch.as_tensor(images).detach().cpu().float()
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
        if torch.isnan(images).any():
            raise ValueError("images contain NaN values; the decode diverged (try float32 for the VAE)")
        images = ((images + 1) / 2 if do_denormalize else images).clamp(0, 1)
        if output_type == "pt":
            return images
        array = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        if output_type == "np":
            return array
        return [PIL.Image.fromarray(a) for a in array]


DeemImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["DeemImageProcessor"]
