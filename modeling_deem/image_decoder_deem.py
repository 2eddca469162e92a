"""What the paper calls the image decoder (reference §2.8-§2.9, §4.2-§4.3): the context projection and decoder
perceiver that turn LLM states into a UNet condition, the learned null condition, Stable Diffusion's UNet and VAE
with the UNet side network, the noise scheduler's config, and the denoising loss that both L_NIP and L_CSR use.

Shapes: N images, H the LLM width, C the UNet's cross-attention width, Q the decoder perceiver's queries.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers import initialization as init

from .configuration_deem import DeemConfig, DeemDecoderPerceiverConfig
from .mmfs import DeemUNetSideNetwork, unet_forward_with_side
from .pos_embed import sincos_1d
from .sequence_deem import _describe
from .vision import DeemPerceiverBody


def check_draws(draws, name: str, n: int, latent_shape: tuple[int, ...], num_train_timesteps: int) -> None:
    """Raise a ``ValueError`` naming the field that does not fit ``n`` images of latents ``latent_shape``."""
    if not isinstance(draws, DiffusionDraws):
        raise TypeError(f"{name} must be a DiffusionDraws, got {type(draws).__name__}")
    for field, expected in (("latent_noise", (n, *latent_shape)), ("noise", (n, *latent_shape))):
        value = getattr(draws, field)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name}.{field} must be a float tensor {expected}, got {type(value).__name__}")
        if tuple(value.shape) != expected:
            raise ValueError(f"{name}.{field} must have shape {expected}, got {tuple(value.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}.{field} holds NaN or infinite values")
    t = draws.timesteps
    if t is not None:
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or tuple(t.shape) != (n,):
            raise ValueError(f"{name}.timesteps must be {n} integer timesteps, got {_describe(t)}")
        if n and (int(t.min()) < 0 or int(t.max()) >= num_train_timesteps):
            raise ValueError(
                f"{name}.timesteps must be in [0, {num_train_timesteps}), got {int(t.min())}..{int(t.max())}"
            )
    flags = draws.null_condition
    if flags is not None:
        if not isinstance(flags, torch.Tensor) or flags.numel() != n:
            raise ValueError(f"{name}.null_condition must hold {n} flags (one per image), got {_describe(flags)}")


def initialize_unless_loaded(model: PreTrainedModel, module: nn.Module) -> None:
    """transformers' per-module init step, but a module counts as initialised only when all of its (recursive)
    tensors were loaded: the library's custom-code shortcut treats a module without direct parameters as
    initialised, which would skip modules whose ``_init_weights`` branch sets their children."""
    if getattr(module, "_is_hf_initialized", False):
        return
    tensors = [*module.parameters(), *(b for b in module.buffers() if b is not None)]
    if tensors and all(getattr(t, "_is_hf_initialized", False) for t in tensors):
        module._is_hf_initialized = True
        return
    model._init_weights(module)
    module._is_hf_initialized = True


class DeemDecoderPerceiver(DeemPerceiverBody, PreTrainedModel):
    """The image decoder's resampler (§2.8): ``num_queries`` queries read the reversed LLM context into the UNet
    condition [N,Q,C], and, with ``config.null_condition``, the learned null condition [1,Q,C] that replaces the
    condition for classifier-free guidance (CFG dropout in training, the negative branch in sampling).

    A model of its own (its sub-config, ``save_pretrained`` / ``from_pretrained``) so that the diffusers
    [`DeemImagePipeline`] can hold, save and load it as a component; inside DEEM it is
    ``model.image_decoder.decoder_perceiver``, sharing the top config's ``decoder_perceiver_config``."""

    config: DeemDecoderPerceiverConfig
    config_class = DeemDecoderPerceiverConfig
    base_model_prefix = "decoder_perceiver"
    main_input_name = "encoder_hidden_states"
    input_modalities = ("text",)
    _no_split_modules = ["DeemPerceiverLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = False

    def __init__(self, config: DeemDecoderPerceiverConfig):
        super().__init__(config)
        self._build_perceiver(config)
        if config.null_condition:
            self.null_condition = nn.Parameter(torch.zeros(1, config.num_queries, config.hidden_size))
        else:
            self.null_condition = None
        self.reset_parameters()
        self.post_init()

    @torch.no_grad()
    def reset_parameters(self):
        super().reset_parameters()
        if self.null_condition is not None:
            init.normal_(self.null_condition, mean=0.0, std=self.config.initializer_range)

    def _initialize_weights(self, module, is_custom_code: bool = False):
        initialize_unless_loaded(self, module)

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if module is self:
            init.normal_(self.queries, mean=0.0, std=std)
            if self.null_condition is not None:
                init.normal_(self.null_condition, mean=0.0, std=std)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def forward(
        self,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        null_condition_mask: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Context [N,S,H] (+ [N,S] mask, 1 = attend) -> condition [N,Q,C]; rows where ``null_condition_mask`` [N]
        is true get the learned null condition instead (CFG dropout). Without a context: the null condition
        [batch_size (default 1), Q, C], the negative condition of classifier-free guidance. The null condition is
        read here, inside ``forward``, so that sharding (FSDP) and offload hooks have placed it."""
        if encoder_hidden_states is None or null_condition_mask is not None:
            if self.null_condition is None:
                raise ValueError(
                    "this decoder perceiver has no learned null condition (config.null_condition is False: the DEEM "
                    "model has no diffusion decoder)"
                )
        if encoder_hidden_states is None:
            if null_condition_mask is not None or encoder_attention_mask is not None:
                raise ValueError("`null_condition_mask` / `encoder_attention_mask` go with `encoder_hidden_states`")
            return self.null_condition.expand(1 if batch_size is None else int(batch_size), -1, -1)
        condition = DeemPerceiverBody.forward(self, encoder_hidden_states, encoder_attention_mask)
        if null_condition_mask is not None:
            flags = null_condition_mask.to(device=condition.device, dtype=torch.bool).reshape(-1)
            if flags.shape[0] != condition.shape[0]:
                raise ValueError(
                    f"null_condition_mask has {flags.shape[0]} entries for {condition.shape[0]} conditions"
                )
            condition = torch.where(flags[:, None, None], self.null_condition.to(condition.dtype), condition)
        return condition


@dataclass
class DiffusionDraws:
    """Random draws of one diffusion loss branch, for reproducible research and parity checks.

    Any field left ``None`` is sampled. ``latent_noise``: [N,4,h,w] eps of the VAE posterior sample;
    ``noise``: [N,4,h,w] diffusion noise (the regression target); ``timesteps``: [N] integers in
    [0, num_train_timesteps) *before* the CSR remapping; ``null_condition``: [N] bool, which images get the
    learned null condition (NIP only).
    """

    latent_noise: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    null_condition: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> "DiffusionDraws":
        """The draws of the images ``index`` (the null-condition flags are taken whole: they index all images)."""
        pick = lambda t: None if t is None else t[index.to(t.device)]  # noqa: E731
        return DiffusionDraws(pick(self.latent_noise), pick(self.noise), pick(self.timesteps), None)


class DenoisingBranch(NamedTuple):
    """One diffusion loss branch's UNet inputs (``DeemImageDecoder.denoise``): noised latents [N,4,h,w], their
    timesteps [N] and noise (the target), the condition [N,Q,C], the side maps (4 x [N,n_img,E,h_l,w_l]) and their
    mask [N,n_img]."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    condition: torch.Tensor
    side_features: list
    side_mask: torch.Tensor

    @staticmethod
    def concatenate(branches: list["DenoisingBranch"]) -> tuple["DenoisingBranch", torch.Tensor | None]:
        """The branches' images one after another (a single branch as it is), and the condition's key mask [N, Q]
        (1 = a condition token) when their conditions differ in length: the shorter ones are padded with zero
        tokens that the mask hides from the UNet's cross-attention (CSR's condition is the image tokens, NIP's the
        decoder perceiver's queries); ``None`` when every condition has the same length."""
        if len(branches) == 1:
            return branches[0], None
        joined = {
            name: torch.cat([getattr(b, name) for b in branches])
            for name in DenoisingBranch._fields
            if name not in ("side_features", "condition")
        }
        side = [torch.cat(level) for level in zip(*(b.side_features for b in branches))]
        longest = max(b.condition.shape[1] for b in branches)
        mask = None
        if any(b.condition.shape[1] != longest for b in branches):
            mask = torch.cat(
                [
                    F.pad(b.condition.new_ones(b.condition.shape[:2]), (0, longest - b.condition.shape[1]))
                    for b in branches
                ]
            )
        condition = torch.cat([F.pad(b.condition, (0, 0, 0, longest - b.condition.shape[1])) for b in branches])
        return DenoisingBranch(**joined, condition=condition, side_features=side), mask


class DeemImageDecoder(nn.Module):
    """The image decoder: ``context_proj`` + ``decoder_perceiver`` (LLM context -> [N,Q,C] condition) and, with
    ``config.diffusion_config``, the decoder perceiver's learned ``null_condition`` [1,Q,C], ``unet``, ``vae``
    (frozen, fp32), ``unet_side`` and the DDPM ``noise_scheduler`` (a config object, no weights)."""

    def __init__(self, config: DeemConfig):
        super().__init__()
        self.config = config
        hidden = config.text_config.hidden_size
        self.context_proj = nn.Linear(hidden, hidden)
        self.decoder_perceiver = DeemDecoderPerceiver(config.decoder_perceiver_config)
        if config.diffusion_config is not None:
            from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

            dcfg = config.diffusion_config
            self.unet = UNet2DConditionModel.from_config(dcfg.unet)
            self.vae = AutoencoderKL.from_config(dcfg.vae)
            self.unet_side = DeemUNetSideNetwork.from_diffusion_config(dcfg, config.image_embed_dim)
            self.noise_scheduler = DDPMScheduler.from_config(dcfg.scheduler)
            self.vae.requires_grad_(False)
        else:
            self.unet = self.vae = self.unet_side = self.noise_scheduler = None

    @property
    def null_condition(self) -> nn.Parameter | None:
        """The learned null condition [1,Q,C] (held by the decoder perceiver); ``None`` without diffusion."""
        return self.decoder_perceiver.null_condition

    @property
    def has_diffusion(self) -> bool:
        return self.unet is not None

    # ------------------------------------------------------------------ condition from the LLM context

    def context_features(self, hidden: torch.Tensor, image_rows, soi_pos, starts):
        """Reversed LLM context of each image, projected + 1-D positions, and its mask (§2.8).

        ``hidden`` [B,L,H]; for image i the span ``starts[i] .. soi_pos[i]`` of row ``image_rows[i]``.
        Returns ([N, L_max, H], [N, L_max])."""
        lengths = soi_pos - starts + 1
        l_max = int(lengths.max())
        offs = torch.arange(l_max, device=hidden.device)
        idx = soi_pos[:, None] - offs[None, :]  # index 0 = the soi token, then backwards
        valid = offs[None, :] < lengths[:, None]
        ctx = hidden[image_rows[:, None], idx.clamp(min=0)] * valid[..., None].to(hidden.dtype)
        ctx = self.context_proj(ctx)
        ctx = ctx + sincos_1d(offs.float(), hidden.shape[-1]).to(ctx)[None]
        return ctx, valid.long()

    def condition(self, hidden: torch.Tensor, image_rows, soi_pos, starts, null_condition_mask=None) -> torch.Tensor:
        """[N,Q,C] UNet condition of each image from its LLM context (``context_features`` + decoder perceiver);
        the learned null condition for the images flagged in ``null_condition_mask`` [N]."""
        ctx, ctx_mask = self.context_features(hidden, image_rows, soi_pos, starts)
        return self.decoder_perceiver(ctx, ctx_mask, null_condition_mask=null_condition_mask)

    # ------------------------------------------------------------------ denoising loss

    def encode_latents(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior (mean, std) of decoder views in [0,1] -> latents space; frozen, fp32, no grad."""
        with torch.no_grad():
            x = images.to(device=self.vae.device, dtype=self.vae.dtype) * 2 - 1
            moments = torch.cat([self.vae.encode(chunk).latent_dist.parameters for chunk in x.split(32)])
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean, std

    def noised_latents(self, posterior, draws: DiffusionDraws, timestep_map, generator):
        """(noisy latents, timesteps, noise) of one branch: a posterior sample, scaled, noised at (remapped) draws;
        the random draws in the order eps, noise, timesteps."""
        mean, std = posterior
        n = mean.shape[0]
        sched = self.noise_scheduler
        eps = (
            draws.latent_noise
            if draws.latent_noise is not None
            else torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        )
        latents = (mean + std * eps.to(mean)) * self.vae.config.scaling_factor
        noise = (
            draws.noise
            if draws.noise is not None
            else torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        )
        noise = noise.to(latents)
        t = draws.timesteps
        if t is None:
            t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=generator, device=latents.device)
        t = timestep_map(t.to(latents.device)).long()
        return sched.add_noise(latents, noise, t), t, noise

    def denoise(self, branches: list["DenoisingBranch"]) -> list[torch.Tensor]:
        """Per-element epsilon MSE [N,4,h,w] (fp32) of each branch, all branches in one UNet + side-network call.

        The branches' images are concatenated (one pass over the UNet's and the side network's layers instead of
        one per branch) when their condition widths and side-feature shapes agree, else each branch runs alone;
        conditions of different lengths are padded and masked (`DenoisingBranch.concatenate`), which gives each
        image what it gets alone (masked keys weigh exp(-10000) = 0; measured on the fixture-sized stage-1 step:
        the CSR and NIP branches in one call instead of two, 0.95x the step time)."""
        if not branches:
            return []
        first = branches[0]
        fits = all(
            b.condition.shape[2:] == first.condition.shape[2:]
            and [f.shape[1:] for f in b.side_features] == [f.shape[1:] for f in first.side_features]
            and b.side_mask.shape[1:] == first.side_mask.shape[1:]
            for b in branches
        )
        unet_dtype = self.unet.dtype
        maps = []
        for group in [branches] if fits else [[b] for b in branches]:
            joined, condition_mask = DenoisingBranch.concatenate(group)
            pred = unet_forward_with_side(
                self.unet,
                self.unet_side,
                joined.noisy.to(unet_dtype),
                joined.timesteps,
                joined.condition.to(unet_dtype),
                side_features=[f.to(unet_dtype) for f in joined.side_features],
                side_mask=joined.side_mask,
                encoder_attention_mask=condition_mask,
            )
            for part, b in zip(pred.split([b.noisy.shape[0] for b in group]), group):
                maps.append((part.float() - b.noise.float()) ** 2)
        return maps

    def denoising_loss(
        self, posterior, condition, side_features, side_mask, draws: DiffusionDraws, timestep_map, generator
    ):
        """Per-element epsilon MSE [N,4,h,w] (fp32) of the UNet + side network on noised latents (§2.9)."""
        noisy, t, noise = self.noised_latents(posterior, draws, timestep_map, generator)
        return self.denoise([DenoisingBranch(noisy, t, noise, condition, side_features, side_mask)])[0]

    def csr_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """CSR timestep remap ``round((t - T/2) * scale + T/2)`` (T=1000, scale 0.6: [0,1000) -> [200,799])."""
        half = self.noise_scheduler.config.num_train_timesteps / 2
        return torch.round((t.double() - half) * self.config.csr_timestep_scale + half).long()

    # ------------------------------------------------------------------ the two losses

    def csr_branch(self, condition, region_features, posterior, draws: DiffusionDraws, generator, timestep_map=None):
        """The CSR branch's denoising inputs (see ``denoise``): every image, its own side maps (mask 1)."""
        n = condition.shape[0]
        side = [f[:, None] for f in region_features]
        side_mask = torch.ones(n, 1, device=condition.device, dtype=condition.dtype)
        noisy, t, noise = self.noised_latents(posterior, draws, timestep_map or self.csr_timesteps, generator)
        return DenoisingBranch(noisy, t, noise, condition, side, side_mask)

    @staticmethod
    def csr_reduce(loss_map, latent_mask, per_image: bool = False):
        """CSR loss from its [N,4,h,w] map: the mean (inside each image's region with ``latent_mask``), or [N]."""
        if latent_mask is not None:
            m = latent_mask.to(loss_map.dtype)
            loss_map = loss_map * m * (m[0].numel() / (m.sum(dim=(1, 2, 3), keepdim=True) + 1e-8))
        return loss_map.flatten(1).mean(1) if per_image else loss_map.mean()

    def loss_csr(
        self,
        condition,
        region_features,
        latent_mask,
        posterior,
        draws: DiffusionDraws,
        generator,
        timestep_map=None,
        per_image: bool = False,
    ):
        """Consistency semantic regularisation (§4.3): reconstruct each image from the encoder's own reading.

        ``condition`` [N,Q,C] (the encoder's ``diffusion_condition``), ``region_features`` its 4 side maps
        [N,E,h,w], ``latent_mask`` [N,1,h,w] or ``None`` (mean inside each image's region). Returns the mean, or
        [N] with ``per_image``."""
        branch = self.csr_branch(condition, region_features, posterior, draws, generator, timestep_map)
        return self.csr_reduce(self.denoise([branch])[0], latent_mask, per_image)

    def nip_branch(
        self, hidden, multiscale_features, image_rows, soi_pos, starts, posterior, draws: DiffusionDraws, generator
    ):
        """The NIP branch's denoising inputs (see ``denoise``), or ``None`` when no image has a context longer than
        ``<s><soi>`` (those get no UNet pass)."""
        n = soi_pos.shape[0]
        lengths = soi_pos - starts + 1
        keep = lengths > 2
        if not bool(keep.any()):
            return None
        sel = keep.nonzero().squeeze(1)
        null = draws.null_condition
        if null is None:
            null = torch.rand(n, generator=generator, device=hidden.device) < self.config.cfg_dropout_prob
        null = null.to(hidden.device).reshape(n)[sel]
        condition = self.condition(hidden, image_rows[sel], soi_pos[sel], starts[sel], null_condition_mask=null)
        side, side_mask = self.previous_image_features(multiscale_features, image_rows, soi_pos, starts)
        side = [f[sel] for f in side]
        posterior = tuple(p[sel.to(p.device)] for p in posterior)
        noisy, t, noise = self.noised_latents(posterior, draws.select(sel), lambda t: t, generator)
        return DenoisingBranch(noisy, t, noise, condition, side, side_mask[sel])

    @staticmethod
    def nip_reduce(loss_map, n: int):
        """NIP loss from the map of the images that ran: the sum over the mean of all ``n`` images' elements."""
        return loss_map.sum() / (n * loss_map[0].numel())

    def loss_nip(
        self, hidden, multiscale_features, image_rows, soi_pos, starts, posterior, draws: DiffusionDraws, generator
    ):
        """Next-image prediction (§4.2): images whose context is longer than ``<s><soi>`` are denoised from the
        decoder perceiver's reading of the LLM context; mean over all images' elements as the original."""
        branch = self.nip_branch(hidden, multiscale_features, image_rows, soi_pos, starts, posterior, draws, generator)
        if branch is None:
            return hidden.new_zeros((), dtype=torch.float32)
        return self.nip_reduce(self.denoise([branch])[0], soi_pos.shape[0])

    @staticmethod
    def previous_image_features(maps, image_rows, soi_pos, starts):
        """Side features for NIP (§2.8): image i gets the maps of image i-1 when that image is in the same row
        and inside image i's document; zeros and mask 0 otherwise. Returns (list of 4 [N,1,E,h,w], [N,1])."""
        n = image_rows.shape[0]
        prev_ok = torch.zeros(n, dtype=torch.bool, device=image_rows.device)
        if n > 1:
            prev_ok[1:] = (image_rows[1:] == image_rows[:-1]) & (soi_pos[:-1] >= starts[1:])
        feats = []
        for m in maps:
            shifted = torch.cat([torch.zeros_like(m[:1]), m[:-1]], dim=0)
            feats.append((shifted * prev_ok[:, None, None, None].to(m.dtype))[:, None])
        return feats, prev_ok[:, None].to(maps[0].dtype)
