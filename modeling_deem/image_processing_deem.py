"""DEEM image processor: encoder view, decoder (diffusion) view and region masks of each image.

Transform of the original data pipeline (reference §6.1), applied to every view at its own resolution:
- ``do_center_crop=False`` (SFT / eval default): bicubic resize to a square, aspect ratio not preserved.
- ``do_center_crop=True`` (stage-1 pretraining): halve with a BOX filter while the short side is >= 2x the
  target, bicubic-resize the short side to the target (long side rounded), then centre-crop.
- ``do_flip`` (training only): random horizontal flip with probability ``flip_prob``. One draw per image is
  shared by its encoder view, decoder view and mask (the original flips the views independently, bug B5).
Outputs are float32 in [0, 1] and NOT normalised: the model applies the CLIP mean/std (``image_mean`` /
``image_std``) to the encoder view and maps the decoder view to [-1, 1] itself, as the original does.
"""

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_image
from transformers.processing_utils import ImagesKwargs


class DeemImagesKwargs(ImagesKwargs, total=False):
    """Options of `DeemImageProcessor` beyond the standard ones (see its docstring)."""

    decoder_size: int
    do_flip: bool
    flip_prob: float
    return_decoder_view: bool


def _square_size(size, name: str) -> int:
    if isinstance(size, dict):
        if set(size) != {"height", "width"} or size["height"] != size["width"]:
            raise ValueError(f"{name} must be an int or a square {{'height', 'width'}} dict, got {size}")
        size = size["height"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"{name} must be a positive int, got {size!r}")
    return size


def _resize(image: PIL.Image.Image, target: int, center_crop: bool, halve, resample) -> PIL.Image.Image:
    """Resize (and optionally centre-crop) one PIL image to ``target x target``."""
    if not center_crop:
        return image.resize((target, target), resample=resample)
    while min(image.size) >= 2 * target:
        image = image.resize((image.width // 2, image.height // 2), resample=halve)
    scale = target / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=resample)
    left, top = (image.width - target) // 2, (image.height - target) // 2
    return image.crop((left, top, left + target, top + target))


def _to_numpy(array, what: str, index: int) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        array = (array.float() if array.dtype == torch.bfloat16 else array).numpy()
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{what} {index} has non-numeric dtype {array.dtype}; expected uint8 or float")
    return array


def _to_pil_rgb(image, index: int) -> PIL.Image.Image:
    """PIL image, path/URL, or uint8 [0, 255] / float [0, 1] array of shape (H, W, 3) or (3, H, W) -> RGB PIL."""
    if isinstance(image, str):
        image = load_image(image)
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    if not isinstance(image, (np.ndarray, torch.Tensor)):
        raise TypeError(f"image {index} has unsupported type {type(image).__name__}; expected PIL, numpy or torch")
    channels_first = isinstance(image, torch.Tensor)
    array = _to_numpy(image, "image", index)
    if array.ndim != 3:
        raise ValueError(f"image {index} must have 3 dimensions (H, W, 3) or (3, H, W), got shape {array.shape}")
    first, last = array.shape[0] == 3, array.shape[-1] == 3
    if not (first or last):
        raise ValueError(f"image {index} must have 3 (RGB) channels first or last, got shape {array.shape}")
    if first and (channels_first or not last):
        array = array.transpose(1, 2, 0)
    if array.dtype.kind == "b":
        raise TypeError(f"image {index} has boolean dtype; expected uint8 in [0, 255] or float in [0, 1]")
    if array.dtype.kind == "f":
        if array.size and (array.min() < -1e-3 or array.max() > 1 + 1e-3):
            raise ValueError(
                f"float image {index} must lie in [0, 1], got range [{array.min():.3g}, {array.max():.3g}]"
            )
        array = np.round(np.clip(array, 0, 1) * 255)
    elif array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"integer image {index} must lie in [0, 255], got range [{array.min()}, {array.max()}]")
    return PIL.Image.fromarray(array.astype(np.uint8))


def _to_pil_mask(mask, index: int, image_size: tuple[int, int]) -> PIL.Image.Image:
    """Mask (H, W) or (1, H, W): bool / integer (non-zero = inside) / float in [0, 1] -> PIL mode "F"."""
    if isinstance(mask, PIL.Image.Image):
        mask = np.asarray(mask)
    if not isinstance(mask, (np.ndarray, torch.Tensor)):
        raise TypeError(f"mask {index} has unsupported type {type(mask).__name__}; expected PIL, numpy or torch")
    array = _to_numpy(mask, "mask", index)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"mask {index} must have shape (H, W) or (1, H, W), got {array.shape}")
    if array.shape != image_size:
        raise ValueError(f"mask {index} has shape {array.shape} but its image is (H, W) = {image_size}")
    if array.dtype.kind == "f":
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError(f"float mask {index} must lie in [0, 1], got [{array.min():.3g}, {array.max():.3g}]")
    else:
        array = array != 0
    return PIL.Image.fromarray(array.astype(np.float32))


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


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
        - `image_masks`: float32 [N, 1, S, S] (only when `image_masks` is given; all ones for `None` entries).
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
        self.do_center_crop = do_center_crop
        self.do_flip = do_flip
        self.flip_prob = flip_prob
        self.return_decoder_view = return_decoder_view
        self.image_mean = list(OPENAI_CLIP_MEAN if image_mean is None else image_mean)
        self.image_std = list(OPENAI_CLIP_STD if image_std is None else image_std)

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
    ) -> BatchFeature:
        """Process one image or a list of N images (PIL, path, numpy/torch uint8 or float in [0, 1]).

        `image_masks`: `None` or a list of N entries, each `None` (whole image) or an (H, W) mask of its image.
        `generator`: a `torch.Generator` or an int seed for the flips (global torch RNG when `None`).
        """
        size = _square_size(self.size if size is None else size, "size")
        decoder_size = _square_size(self.decoder_size if decoder_size is None else decoder_size, "decoder_size")
        do_center_crop = self.do_center_crop if do_center_crop is None else do_center_crop
        do_flip = self.do_flip if do_flip is None else do_flip
        flip_prob = self.flip_prob if flip_prob is None else flip_prob
        return_decoder_view = self.return_decoder_view if return_decoder_view is None else return_decoder_view
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)

        images = [_to_pil_rgb(image, i) for i, image in enumerate(_as_list(images))]
        if not images:
            raise ValueError("no images to process")
        if image_masks is not None:
            image_masks = _as_list(image_masks)
            if len(image_masks) != len(images):
                raise ValueError(f"got {len(image_masks)} image masks for {len(images)} images; counts must match")

        encoder, decoder, masks = [], [], []
        for i, image in enumerate(images):
            flip = do_flip and bool(torch.rand((), generator=generator) < flip_prob)
            views = [(encoder, size)] + ([(decoder, decoder_size)] if return_decoder_view else [])
            for out, target in views:
                view = _resize(image, target, do_center_crop, PIL.Image.BOX, PIL.Image.BICUBIC)
                view = view.transpose(PIL.Image.FLIP_LEFT_RIGHT) if flip else view
                out.append(np.asarray(view, dtype=np.float32).transpose(2, 0, 1) / 255.0)
            if image_masks is not None:
                if image_masks[i] is None:
                    masks.append(np.ones((1, size, size), dtype=np.float32))
                    continue
                mask = _to_pil_mask(image_masks[i], i, (image.height, image.width))
                mask = _resize(mask, size, do_center_crop, PIL.Image.NEAREST, PIL.Image.NEAREST)
                mask = mask.transpose(PIL.Image.FLIP_LEFT_RIGHT) if flip else mask
                masks.append(np.asarray(mask, dtype=np.float32)[None])

        data = {"pixel_values": np.stack(encoder)}
        if return_decoder_view:
            data["pixel_values_decoder"] = np.stack(decoder)
        if image_masks is not None:
            data["image_masks"] = np.stack(masks)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def postprocess(self, images, do_denormalize: bool = False, output_type: str = "pil"):
        """Generated images [N, 3, H, W] (or [3, H, W]) in [0, 1], or in [-1, 1] with `do_denormalize=True`.

        Returns a list of N RGB PIL images (`output_type="pil"`), a uint8 numpy array [N, H, W, 3] ("np") or a
        float32 tensor [N, 3, H, W] in [0, 1] ("pt").
        """
        images = torch.as_tensor(images).detach().cpu().float()
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
        images = ((images + 1) / 2 if do_denormalize else images).clamp(0, 1)
        if output_type == "pt":
            return images
        array = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        if output_type == "np":
            return array
        if output_type == "pil":
            return [PIL.Image.fromarray(a) for a in array]
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")


DeemImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["DeemImageProcessor"]
