"""DEEM's image decoder as a diffusers pipeline (§2.8, §2.9, §5.2 of ``reference/original-deem.md``).

[`DeemImagePipeline`] samples the next image of an interleaved document from an embedding condition instead of a
text prompt: the decoder perceiver's reading of the LLM context (``prompt_embeds`` [N, Q, D], or the context
itself), plus the multi-scale maps of the previous image, which the UNet side network adds to the UNet's skip
samples. Its components are the DEEM model's own modules (shared, never copied):

* ``unet`` / ``vae``: the model's ``UNet2DConditionModel`` / ``AutoencoderKL`` (the VAE stays in fp32);
* ``side_network``: the model's ``DeemUNetSideNetwork`` (MMFSNet, a diffusers ``ModelMixin``);
* ``decoder_perceiver``: the model's ``DeemDecoderPerceiver`` (a transformers model), which reads the LLM context
  into the condition and holds the learned null condition (the negative condition of classifier-free guidance);
* ``scheduler``: any diffusers scheduler; by default a ``DDPMScheduler`` with the model's noise-scheduler config
  (SD-2.1-base betas, "leading" spacing, ``steps_offset`` 1: 250 steps visit t = 997, 993, ..., 1).

``pipe.save_pretrained(dir)`` writes the usual diffusers layout (``model_index.json`` and one folder per
component) plus a one-line ``pipeline_deem.py`` that points diffusers at this class, so that
``DeemImagePipeline.from_pretrained(dir)`` and ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)``
load it (both need the ``deem-transformers`` package installed).

This file must not import ``modeling_deem`` at module level (``modeling_deem`` imports it).
"""

import inspect
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence

import torch
from diffusers import DDPMScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .image_decoder_deem import DeemDecoderPerceiver
from .mmfs import DeemUNetSideNetwork, sampling_layout, unet_forward_with_side

logger = logging.get_logger(__name__)


def _first_parameter(module: nn.Module):
    return next(module.parameters(), None)


def _module_device(module: nn.Module) -> torch.device:
    p = _first_parameter(module)
    return p.device if p is not None else torch.device("cpu")


def _module_dtype(module: nn.Module) -> torch.dtype:
    p = _first_parameter(module)
    return p.dtype if p is not None else torch.float32


def _onload(module: nn.Module) -> None:
    """Trigger an accelerate offload hook for a module used through something other than its ``forward`` (as
    diffusers' ``apply_forward_hook`` does for ``vae.decode``): the UNet (driven block by block by
    ``unet_forward_with_side``) and the side network's one-off feature projection."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)


def _stack_embeds(embeds, name: str):
    """A list / tuple of [Q, D] or [1, Q, D] tensors -> [N, Q, D]; a tensor or ``None`` as given."""
    if not isinstance(embeds, (list, tuple)):
        return embeds
    if not embeds or not all(
        isinstance(e, torch.Tensor) and e.dim() in (2, 3) and (e.dim() == 2 or e.shape[0] == 1) for e in embeds
    ):
        raise ValueError(
            f"`{name}` as a list must hold [Q, D] or [1, Q, D] tensors, got "
            f"{[tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__ for e in embeds]}"
        )
    shapes = {tuple(e.shape[-2:]) for e in embeds}
    if len(shapes) != 1:
        raise ValueError(f"`{name}` entries differ in shape: {sorted(shapes)}")
    return torch.cat([e if e.dim() == 3 else e[None] for e in embeds])


# the file ``save_pretrained`` writes next to ``model_index.json``: diffusers loads a custom pipeline class from a
# module in the saved folder, and this one only re-exports ours from the installed package
PIPELINE_MODULE = "pipeline_deem"
PIPELINE_MODULE_SOURCE = (
    '"""DEEM image pipeline: the class lives in the deem-transformers package (pip install deem-transformers)."""\n'
    "\n"
    "from deem.modeling.pipeline_deem import DeemImagePipeline  # noqa: F401\n"
)
# the classes of ours a saved pipeline names, under the package path a fresh process imports them from (a model
# loaded with trust_remote_code has them in transformers' dynamic-module cache, which a later process lacks)
_CANONICAL_MODULES = {
    "DeemUNetSideNetwork": "deem.modeling.mmfs",
    "DeemDecoderPerceiver": "deem.modeling.image_decoder_deem",
}


class DeemImagePipeline(DiffusionPipeline):
    r"""Generate images from DEEM's LLM context: decoder perceiver condition + previous-image side features ->
    UNet (+ side network) denoising with classifier-free guidance against the learned null condition -> VAE.

    Build it from a model with [`~DeemImagePipeline.from_model`] (``model.image_pipeline()``) or from a saved DEEM
    checkpoint with [`~DeemImagePipeline.from_pretrained`]; call it with ``prompt_embeds`` [N, Q, D] or with
    ``context_features`` + ``context_mask``.

    Args:
        unet: the model's ``UNet2DConditionModel``.
        vae: the model's ``AutoencoderKL``.
        scheduler: a diffusers scheduler (the model's DDPM configuration by default in ``from_model``).
        side_network: the model's ``DeemUNetSideNetwork``; ``pipe.register_modules(side_network=None)`` removes it
            (the UNet alone, as stock Stable Diffusion samples). Without a previous image its residuals are a
            constant (``DeemSideBlock.no_image_residual``), added without building or sampling any maps.
        decoder_perceiver: the model's ``DeemDecoderPerceiver`` (context -> condition, and the learned null
            condition).
        image_size: default output side in pixels (the model's decoder image size); ``None``: the UNet's
            ``sample_size`` times the VAE scale factor.
    """

    model_cpu_offload_seq = "decoder_perceiver->side_network->unet->vae"
    _optional_components = []
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        unet,
        vae,
        scheduler,
        side_network: DeemUNetSideNetwork,
        decoder_perceiver: DeemDecoderPerceiver,
        image_size: int | None = None,
    ):
        super().__init__()
        if getattr(decoder_perceiver, "null_condition", None) is None:
            raise ValueError(
                "`decoder_perceiver` has no learned null condition (config.null_condition is False): it comes from a "
                "DEEM model without a diffusion decoder"
            )
        self.register_modules(
            unet=unet, vae=vae, scheduler=scheduler, side_network=side_network, decoder_perceiver=decoder_perceiver
        )
        self.register_to_config(image_size=image_size)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_model(cls, model, scheduler=None) -> "DeemImagePipeline":
        """Pipeline over a [`DeemForInterleavedGeneration`]'s own modules (shared: ``pipe.unet is model.unet``).

        ``scheduler``: any diffusers scheduler; default a fresh ``DDPMScheduler`` with the model's noise-scheduler
        configuration (a separate object, so sampling never changes the training scheduler's state)."""
        if getattr(model, "unet", None) is None:
            raise ValueError(
                "this DEEM model has no diffusion decoder (config.diffusion_config is None): it cannot generate images"
            )
        if scheduler is None:
            scheduler = DDPMScheduler.from_config(model.noise_scheduler.config)
        dcfg = getattr(model.config, "diffusion_config", None)
        image_size = getattr(dcfg, "image_size", None)
        return cls(
            unet=model.unet,
            vae=model.vae,
            scheduler=scheduler,
            side_network=model.unet_side,
            decoder_perceiver=model.decoder_perceiver,
            image_size=image_size,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, scheduler=None, **kwargs) -> "DeemImagePipeline":
        """Load a saved pipeline (a folder or Hub repo with ``model_index.json``, as ``save_pretrained`` writes it)
        or build one over the modules of a DEEM model checkpoint.

        A saved pipeline loads through ``DiffusionPipeline.from_pretrained`` (``torch_dtype`` as a dtype or a
        per-component dict, ``device_map``, ``variant``, ...); its ``pipeline_deem.py`` is trusted without
        ``trust_remote_code`` only when it is exactly the file ``save_pretrained`` writes and the repo has no other
        code. For a DEEM checkpoint, ``kwargs`` go to the model's ``from_pretrained`` (``dtype``, ``device_map``,
        ``revision``, ...; ``torch_dtype`` is accepted as ``dtype``, per-component dicts too); the model class next
        to this file is used, or with ``trust_remote_code=True`` the checkpoint's own code through
        ``transformers.AutoModel``."""
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        if _has_model_index(pretrained_model_name_or_path, **hub_kwargs):
            if scheduler is not None:
                kwargs["scheduler"] = scheduler
            if not kwargs.get("trust_remote_code") and _only_our_code(pretrained_model_name_or_path, **hub_kwargs):
                kwargs["trust_remote_code"] = True
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls._from_model_checkpoint(pretrained_model_name_or_path, scheduler=scheduler, **kwargs)

    @classmethod
    def _from_model_checkpoint(cls, pretrained_model_name_or_path, scheduler=None, **kwargs) -> "DeemImagePipeline":
        if "torch_dtype" in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        component_dtypes = None
        if isinstance(kwargs.get("dtype"), dict) and set(kwargs["dtype"]) & set(cls._component_names()):
            # diffusers' per-component form: {"unet": torch.float16, "default": torch.float32, ...}
            component_dtypes = kwargs.pop("dtype")
            unknown = sorted(set(component_dtypes) - set(cls._component_names()) - {"default"})
            if unknown:
                raise ValueError(
                    f"torch_dtype keys {unknown} are not components of DeemImagePipeline "
                    f"{cls._component_names()} (or 'default')"
                )
            kwargs["dtype"] = component_dtypes.get("default", torch.float32)
        trust_remote_code = kwargs.pop("trust_remote_code", None)
        model_class = None
        if not trust_remote_code:
            try:
                from .modeling_deem import DeemForInterleavedGeneration as model_class
            except ImportError:  # pragma: no cover - this file travels with modeling_deem.py
                model_class = None
        if model_class is not None:
            model = model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
        else:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(pretrained_model_name_or_path, trust_remote_code=True, **kwargs)
        model.eval()
        pipe = cls.from_model(model, scheduler=scheduler)
        for name, dtype in (component_dtypes or {}).items():
            if name != "default" and name != "vae":  # the VAE stays fp32 (§2.9)
                getattr(pipe, name).to(dtype)
        return pipe

    @staticmethod
    def _component_names() -> list[str]:
        return ["unet", "vae", "side_network", "decoder_perceiver"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``DiffusionPipeline.save_pretrained``; into a new (or empty) folder it writes through a staging folder
        next to it, renamed at the end, so that a failure leaves nothing behind."""
        target = os.path.abspath(os.fspath(save_directory))
        if kwargs.get("push_to_hub") or (os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target))):
            return super().save_pretrained(save_directory, *args, **kwargs)
        parent = os.path.dirname(target)
        made_parent = not os.path.exists(parent)
        os.makedirs(parent, exist_ok=True)
        staging = os.path.join(parent, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:8]}")
        os.makedirs(staging)
        try:
            result = super().save_pretrained(staging, *args, **kwargs)
            if os.path.isdir(target):
                os.rmdir(target)  # empty
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if made_parent:
                shutil.rmtree(parent, ignore_errors=True)
            raise
        return result

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs):
        """``model_index.json`` as diffusers writes it, naming this class through ``pipeline_deem.py`` (written
        next to it) and our component classes under their installed package path."""
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)
        path = os.path.join(save_directory, self.config_name)
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
        for name, value in index.items():
            if isinstance(value, list) and len(value) == 2 and value[1] in _CANONICAL_MODULES:
                index[name] = [_CANONICAL_MODULES[value[1]], value[1]]
        _write_atomic(path, json.dumps(index, indent=2, sort_keys=True) + "\n")
        _write_atomic(os.path.join(save_directory, PIPELINE_MODULE + ".py"), PIPELINE_MODULE_SOURCE)

    # ------------------------------------------------------------------ device / dtype

    @property
    def device(self) -> torch.device:
        """The device the denoiser lives on (an accelerator if any component is on one)."""
        parts = (self.unet, self.side_network, self.decoder_perceiver, self.vae)
        modules = [m for m in parts if isinstance(m, nn.Module)]
        devices = [_module_device(m) for m in modules]
        for device in devices:
            if device.type not in ("cpu", "meta"):
                return device
        return devices[0] if devices else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's dtype."""
        return _module_dtype(self.unet)

    # ------------------------------------------------------------------ properties (diffusers conventions)

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    @property
    def default_image_size(self) -> int:
        size = self.config.get("image_size")
        if size is None:
            size = self.unet.config.sample_size * self.vae_scale_factor
        return int(size)

    # ------------------------------------------------------------------ side network layout

    def _side_layout(self):
        """(feature width E, number of levels, configured (h, w) per level) of the side network."""
        block = self.side_network.mid_block
        return block.feat_norm.normalized_shape[0], block.attn.num_levels, block.attn.spatial_shapes

    # ------------------------------------------------------------------ input checks

    def check_inputs(
        self,
        prompt_embeds,
        context_features,
        context_mask,
        side_features,
        side_mask,
        negative_prompt_embeds,
        num_inference_steps,
        height,
        width,
        num_images_per_prompt,
        output_type,
        callback_on_step_end_tensor_inputs,
    ):
        if (prompt_embeds is None) == (context_features is None):
            raise ValueError(
                "pass exactly one of `prompt_embeds` (the UNet condition [N, Q, D]) or `context_features` (the "
                "LLM context [N, L, H])"
            )
        cross_dim = self.unet.config.cross_attention_dim
        if prompt_embeds is not None:
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
                raise ValueError(f"`prompt_embeds` must be a [N, Q, D] tensor, got {_shape(prompt_embeds)}")
            if prompt_embeds.shape[-1] != cross_dim:
                raise ValueError(
                    f"`prompt_embeds` width {prompt_embeds.shape[-1]} does not match the UNet's "
                    f"cross_attention_dim {cross_dim}"
                )
            if context_mask is not None:
                raise ValueError("`context_mask` goes with `context_features`, not with `prompt_embeds`")
            batch = prompt_embeds.shape[0]
        else:
            if not isinstance(context_features, torch.Tensor) or context_features.dim() != 3:
                raise ValueError(f"`context_features` must be a [N, L, H] tensor, got {_shape(context_features)}")
            width_h = self.decoder_perceiver.config.encoder_hidden_size
            if context_features.shape[-1] != width_h:
                raise ValueError(
                    f"`context_features` width {context_features.shape[-1]} does not match the decoder perceiver's "
                    f"input width {width_h}"
                )
            if context_mask is not None and tuple(context_mask.shape) != tuple(context_features.shape[:2]):
                raise ValueError(
                    f"`context_mask` must be [N, L] = {tuple(context_features.shape[:2])}, got "
                    f"{tuple(context_mask.shape)}"
                )
            batch = context_features.shape[0]
        if batch == 0:
            raise ValueError("empty batch: `prompt_embeds` / `context_features` hold no condition")
        if negative_prompt_embeds is not None:
            if not isinstance(negative_prompt_embeds, torch.Tensor) or negative_prompt_embeds.dim() != 3:
                raise ValueError(
                    "`negative_prompt_embeds` must be a [N, Q, D] (or [1, Q, D]) tensor, got "
                    f"{_shape(negative_prompt_embeds)}"
                )
            if negative_prompt_embeds.shape[0] not in (1, batch):
                raise ValueError(
                    f"`negative_prompt_embeds` has batch {negative_prompt_embeds.shape[0]}, expected 1 or {batch}"
                )
            if negative_prompt_embeds.shape[-1] != cross_dim:
                raise ValueError(
                    f"`negative_prompt_embeds` width {negative_prompt_embeds.shape[-1]} does not match the UNet's "
                    f"cross_attention_dim {cross_dim}"
                )
            if prompt_embeds is not None and negative_prompt_embeds.shape[1] != prompt_embeds.shape[1]:
                raise ValueError(
                    f"`negative_prompt_embeds` has {negative_prompt_embeds.shape[1]} tokens, `prompt_embeds` "
                    f"{prompt_embeds.shape[1]}"
                )
        if side_features is not None and self.side_network is None:
            raise ValueError("`side_features` were given but this pipeline has no side network")
        if side_features is not None:
            feat_dim, num_levels, _ = self._side_layout()
            if isinstance(side_features, torch.Tensor) or not isinstance(side_features, Sequence):
                raise ValueError(
                    f"`side_features` must be a list of {num_levels} tensors [N, E, h, w] (or [N, n_img, E, h, w])"
                )
            if len(side_features) != num_levels:
                raise ValueError(
                    f"`side_features` has {len(side_features)} levels, the side network reads {num_levels}"
                )
            n_img = None
            for lvl, f in enumerate(side_features):
                if not isinstance(f, torch.Tensor) or f.dim() not in (4, 5):
                    raise ValueError(
                        f"`side_features[{lvl}]` must be [N, E, h, w] or [N, n_img, E, h, w], got {_shape(f)}"
                    )
                if f.shape[0] != batch:
                    raise ValueError(f"`side_features[{lvl}]` has batch {f.shape[0]}, the condition has {batch}")
                channels = f.shape[-3]
                if channels != feat_dim:
                    raise ValueError(
                        f"`side_features[{lvl}]` has {channels} channels, the side network expects {feat_dim}"
                    )
                k = 1 if f.dim() == 4 else f.shape[1]
                if n_img is not None and k != n_img:
                    raise ValueError(f"`side_features` levels disagree on the number of images ({n_img} vs {k})")
                n_img = k
            if side_mask is not None:
                if side_mask.shape[0] != batch or side_mask.numel() != batch * n_img:
                    raise ValueError(
                        f"`side_mask` must be [N], [N, 1] or [N, n_img] with N = {batch}, n_img = {n_img}; got "
                        f"{tuple(side_mask.shape)}"
                    )
        elif side_mask is not None:
            raise ValueError("`side_mask` was given without `side_features`")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}")
        for name, value in (("height", height), ("width", width)):
            if value is not None and (int(value) <= 0 or int(value) % self.vae_scale_factor):
                raise ValueError(
                    f"`{name}` must be a positive multiple of the VAE scale factor {self.vae_scale_factor}, got {value}"
                )
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be one of 'pil', 'np', 'pt', 'latent'; got {output_type!r}")
        if callback_on_step_end_tensor_inputs is not None:
            bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if bad:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {bad}"
                )
        return batch

    # ------------------------------------------------------------------ preparation

    def encode_context(self, context_features: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the decoder perceiver: context_features [N, L, H] (+ context_mask [N, L]) -> condition [N, Q, D]."""
        device = self._execution_device
        mask = None if context_mask is None else context_mask.to(device)
        return self.decoder_perceiver(context_features.to(device=device, dtype=self.decoder_perceiver.dtype), mask)

    def prepare_side_features(self, side_features, side_mask, batch_size: int, device, dtype):
        """-> (list of 4 [N, n_img, E, h, w], mask [N, n_img]); ``None`` gives zero maps at the configured level
        sizes with mask 0 (no previous image: the side network adds its "no image" output, as the original)."""
        if side_features is None:
            feat_dim, _, shapes = self._side_layout()
            feats = [torch.zeros(batch_size, 1, feat_dim, h, w, device=device, dtype=dtype) for h, w in shapes]
            return feats, torch.zeros(batch_size, 1, device=device, dtype=dtype)
        feats = [(f[:, None] if f.dim() == 4 else f).to(device=device, dtype=dtype) for f in side_features]
        n_img = feats[0].shape[1]
        if side_mask is None:
            mask = torch.ones(batch_size, n_img, device=device, dtype=dtype)
        else:
            mask = side_mask.reshape(batch_size, n_img).to(device=device, dtype=dtype)
        return feats, mask

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        shape = (
            batch_size,
            num_channels_latents,
            int(height) // self.vae_scale_factor,
            int(width) // self.vae_scale_factor,
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"{len(generator)} generators were passed for {batch_size} images (N x num_images_per_prompt)"
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def prepare_extra_step_kwargs(self, generator, eta=None):
        """``generator`` (and ``eta``) for schedulers whose ``step`` takes them (DDPM draws its variance noise)."""
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "generator" in params:
            kwargs["generator"] = generator
        if eta is not None and "eta" in params:
            kwargs["eta"] = eta
        return kwargs

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def __call__(
        self,
        prompt_embeds: torch.Tensor | None = None,
        context_features: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        side_features: Sequence[torch.Tensor] | None = None,
        side_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_inference_steps: int = 250,
        guidance_scale: float = 3.5,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ):
        r"""Sample images.

        Args:
            prompt_embeds (`torch.Tensor` [N, Q, D]): the UNet condition (decoder perceiver output).
            context_features (`torch.Tensor` [N, L, H]): instead of ``prompt_embeds``, the reversed, projected and
                positioned LLM context (the image decoder's ``context_features``); the pipeline runs the
                decoder perceiver.
            context_mask (`torch.Tensor` [N, L]): 1 for valid context positions (default all).
            side_features (list of 4 `torch.Tensor`): the previous image's multi-scale maps, [N, E, h, w] each (or
                [N, n_img, E, h, w]); ``None``: zeros with mask 0 (first image of a document).
            side_mask (`torch.Tensor` [N], [N, 1] or [N, n_img]): 1 where the image is present (default all ones when
                ``side_features`` is given).
            negative_prompt_embeds (`torch.Tensor` [N or 1, Q, D]): the unconditional condition; default the learned
                null condition.
            num_inference_steps (`int`, defaults to 250), guidance_scale (`float`, defaults to 3.5; CFG when > 1,
                ``uncond + g * (cond - uncond)``; the side inputs go to both halves).
            height / width (`int`): output size in pixels, multiples of the VAE scale factor (default the model's
                decoder image size).
            num_images_per_prompt (`int`): images per condition.
            generator (`torch.Generator` or a list, one per image): makes sampling reproducible.
            latents (`torch.Tensor` [N * num_images_per_prompt, C, h, w]): initial noise (before
                ``init_noise_sigma`` scaling) instead of drawing it.
            output_type (`str`): "pil" (list of PIL images), "np" ([N, H, W, 3] in [0, 1]), "pt" ([N, 3, H, W] in
                [0, 1]) or "latent" (the final latents).
            return_dict (`bool`): return an `ImagePipelineOutput` (else a tuple).
            callback_on_step_end: ``callback(pipe, step, timestep, callback_kwargs) -> dict`` after each step; the
                returned ``latents`` / ``prompt_embeds`` / ``negative_prompt_embeds`` replace the current ones.
            callback_on_step_end_tensor_inputs (`list[str]`): which tensors go into ``callback_kwargs``.

        Returns:
            `ImagePipelineOutput` with ``images``, or ``(images,)``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs (a list of per-prompt conditions, [Q, D] or [1, Q, D] each, is stacked as other
        # embedding-conditioned diffusers pipelines accept it)
        prompt_embeds = _stack_embeds(prompt_embeds, "prompt_embeds")
        negative_prompt_embeds = _stack_embeds(negative_prompt_embeds, "negative_prompt_embeds")
        batch_size = self.check_inputs(
            prompt_embeds,
            context_features,
            context_mask,
            side_features,
            side_mask,
            negative_prompt_embeds,
            num_inference_steps,
            height,
            width,
            num_images_per_prompt,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        height = int(height or self.default_image_size)
        width = int(width or self.default_image_size)
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(
                f"the default image size {self.default_image_size} is not a multiple of the VAE scale factor "
                f"{self.vae_scale_factor}"
            )
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        unet_dtype = self.unet.dtype

        # 2. Condition (decoder perceiver when given the context) and the negative condition
        if prompt_embeds is None:
            prompt_embeds = self.encode_context(context_features, context_mask)
            if prompt_embeds.shape[-1] != self.unet.config.cross_attention_dim:
                raise ValueError(
                    f"the decoder perceiver gives width {prompt_embeds.shape[-1]}, the UNet expects "
                    f"{self.unet.config.cross_attention_dim}"
                )
        prompt_embeds = prompt_embeds.to(device=device, dtype=unet_dtype)
        if self.do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                negative_prompt_embeds = self.decoder_perceiver(batch_size=batch_size)
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=unet_dtype).expand(
                batch_size, -1, -1
            )
            if negative_prompt_embeds.shape[1] != prompt_embeds.shape[1]:
                raise ValueError(
                    f"the negative condition has {negative_prompt_embeds.shape[1]} tokens, the condition "
                    f"{prompt_embeds.shape[1]}"
                )
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        total = batch_size * num_images_per_prompt

        # 3. Side features (previous image), projected once for every step; duplicated for both CFG halves
        _onload(self.unet)  # driven block by block, its forward (and offload hook) is never called
        projected = mask = None
        if self.side_network is not None:  # None: the side network removed (the UNet alone, as stock SD)
            _onload(self.side_network)
            side_dtype = _module_dtype(self.side_network)
            if side_features is None or (side_mask is not None and not bool(side_mask.any())):
                # no previous image anywhere: the side network's residuals are a constant (its closed form), no
                # maps are built, projected or sampled
                mask = torch.zeros(total * (2 if self.do_classifier_free_guidance else 1), 1, device=device)
            else:
                feats, mask = self.prepare_side_features(side_features, side_mask, batch_size, device, side_dtype)
                feats = [f.repeat_interleave(num_images_per_prompt, dim=0) for f in feats]
                mask = mask.repeat_interleave(num_images_per_prompt, dim=0)
                projected = self.side_network.project_features(feats)  # once per call, reused at every step
                halves = 2 if self.do_classifier_free_guidance else 1
                # duplicated for both CFG halves and stored in the sampling's layout once per call, so no step
                # copies them; _replace keeps the side network's own DeemSideFeatures class (its module may be a
                # dynamic copy)
                projected = projected._replace(
                    values=tuple(sampling_layout(torch.cat([v] * halves)) for v in projected.values)
                )
                mask = torch.cat([mask] * halves)

        # 4. Timesteps and initial latents (kept in fp32; the UNet gets its own dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(
            total, self.unet.config.in_channels, height, width, torch.float32, device, generator, latents
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator)

        # 5. Denoising loop
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                if self.do_classifier_free_guidance:
                    latent_model_input = torch.cat([latents, latents])
                    condition = torch.cat([negative_prompt_embeds, prompt_embeds])
                else:
                    latent_model_input = latents
                    condition = prompt_embeds
                if hasattr(self.scheduler, "scale_model_input"):
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                noise_pred = unet_forward_with_side(
                    self.unet,
                    self.side_network,
                    latent_model_input.to(unet_dtype),
                    t,
                    condition,
                    side_features=projected,
                    side_mask=mask,
                ).float()
                if self.do_classifier_free_guidance:
                    noise_uncond, noise_cond = noise_pred.chunk(2)
                    noise_pred = noise_uncond + self.guidance_scale * (noise_cond - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    available = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents).to(device=device, dtype=torch.float32)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 6. Decode with the VAE in its own dtype (fp32 in DEEM), (x / 2 + 0.5) clamped to [0, 1]
        if output_type == "latent":
            image = latents
        else:
            z = latents / self.vae.config.scaling_factor
            shift = getattr(self.vae.config, "shift_factor", None)
            if shift is not None:
                z = z + shift
            image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder (never a half-written file)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _has_model_index(path, **hub_kwargs) -> bool:
    """Whether ``path`` (a folder or a Hub repo id) holds a saved pipeline (``model_index.json``)."""
    path = str(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, DiffusionPipeline.config_name))
    from huggingface_hub import file_exists

    try:
        return file_exists(
            path, DiffusionPipeline.config_name, revision=hub_kwargs.get("revision"), token=hub_kwargs.get("token")
        )
    except Exception:  # offline or not a repo id: treat as a model checkpoint, whose loader reports the problem
        return False


def _only_our_code(path, **hub_kwargs) -> bool:
    """True when the only code in the saved pipeline at ``path`` is the ``pipeline_deem.py`` we write."""
    path = str(path)
    name = PIPELINE_MODULE + ".py"
    if os.path.isdir(path):
        code = [
            os.path.relpath(os.path.join(root, f), path)
            for root, _, files in os.walk(path)
            for f in files
            if f.endswith(".py")
        ]
        if code != [name]:
            return False
        with open(os.path.join(path, name), encoding="utf-8") as f:
            return f.read() == PIPELINE_MODULE_SOURCE
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        files = list_repo_files(path, revision=hub_kwargs.get("revision"), token=hub_kwargs.get("token"))
        if [f for f in files if f.endswith(".py")] != [name]:
            return False
        local = hf_hub_download(path, name, **hub_kwargs)
        with open(local, encoding="utf-8") as f:
            return f.read() == PIPELINE_MODULE_SOURCE
    except Exception:
        return False


__all__ = ["DeemImagePipeline"]
