"""EmojiDiff's E-Adapter training stages (spec A2) on the diffusers host: base, refined and ICA.

- ``emojidiff_base`` (Stage I, [P §3.2]): same-identity triplets {S, R = D, D} from
  :mod:`training.pair_samplers`, loss L_sd. Trainable: the ID projection, the expression projection
  and the expression K/V; frozen: the ID K/V, the UNet, the text encoder(s), CLIP (its embeddings are
  cached by prepare) and the FaceID LoRA (merged into the UNet at ``emojidiff.faceid_lora_scale``).
  Initialised from the published IP-Adapter files, assembled by :meth:`EAdapter.from_published` as
  Load E-Adapter assembles them.
- ``emojidiff_refined`` (Stage III, [P §3.4]): the same training on the cross-identity triplets
  ``training.idi`` writes (each sample holds S's ``faceid``, R's ``clip_image`` and D's latents), on
  SD1.5 or SDXL (pooled text + time ids, with random scaling: ``emojidiff.random_scale``).
- ``emojidiff_ica`` (Stage IV, [P §3.5]): the adapter being tuned against a frozen expression teacher
  (the refined adapter) and a frozen identity teacher (the original FaceID adapter, no expression),
  L_ft = L_sd + w_id L_id + w_exp L_exp on ANI's x0 estimates decoded by the frozen VAE.

Each exports our E-Adapter safetensors (:meth:`EAdapter.save`), which Load E-Adapter reads.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from adapters.branches import TokenCondition
from adapters.e_adapter import EAdapter
from adapters.layers import SDXL
from adapters.rows import COND, UNCOND
from hosts.diffusers import attach_adapters

from ..models import unet_layout
from ..sampling import SamplingInputs
from ..tiny import TinyFan, tiny_recognizer_net, tiny_text_encoders, write_standin_published
from .base import DenoisingStage

# -- text ------------------------------------------------------------------------------------------


class PromptEncoder:
    """The frozen text encoder(s): prompts -> (context B x 77 x D, pooled B x P or None), cached per prompt.

    One encoder (SD1.5): its last hidden state. Two (SDXL): both penultimate hidden states side by side,
    and the second's projected ``text_embeds`` as the pooled vector, as diffusers' SDXL pipeline does.
    """

    def __init__(self, encoders: list[tuple[object, nn.Module]]):
        self.encoders = encoders
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @classmethod
    def from_config(cls, model_cfg: Mapping, work_dir, device, dtype) -> PromptEncoder:
        if model_cfg.get("tiny_text_encoder") is not None:
            encoders = tiny_text_encoders(model_cfg["tiny_text_encoder"], work_dir)
        else:
            from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

            encoders = [(CLIPTokenizer.from_pretrained(model_cfg["tokenizer"], local_files_only=True),
                         CLIPTextModel.from_pretrained(model_cfg["text_encoder"], local_files_only=True))]
            if model_cfg.get("text_encoder_2"):
                encoders.append((CLIPTokenizer.from_pretrained(model_cfg["tokenizer_2"], local_files_only=True),
                                 CLIPTextModelWithProjection.from_pretrained(model_cfg["text_encoder_2"], local_files_only=True)))
        return cls([(tokenizer, model.to(device=device, dtype=dtype).eval().requires_grad_(False))
                    for tokenizer, model in encoders])

    @property
    def models(self) -> list[nn.Module]:
        return [model for _, model in self.encoders]

    @torch.no_grad()
    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        states, pooled = [], None
        for tokenizer, model in self.encoders:
            length = int(model.config.max_position_embeddings)
            ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
            out = model(ids.to(next(model.parameters()).device), output_hidden_states=True)
            if len(self.encoders) == 1:
                states.append(out.last_hidden_state)
            else:
                states.append(out.hidden_states[-2])
                pooled = getattr(out, "text_embeds", None)
        return torch.cat(states, -1).float(), None if pooled is None else pooled.float()

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = []
        for prompt in prompts:
            if prompt not in self.cache:
                self.cache[prompt] = self._encode(prompt)
            rows.append(self.cache[prompt])
        pooled = None if rows[0][1] is None else torch.cat([r[1] for r in rows])
        return torch.cat([r[0] for r in rows]), pooled


# -- the adapter -------------------------------------------------------------------------------------


def published_files(cfg: Mapping, unet, work_dir) -> tuple[Path | None, Path | None]:
    """The FaceID and image IP-Adapter files: the configured ones, or stand-ins written under ``work_dir``."""
    if cfg.get("standin_published") is not None:
        block = dict(cfg["standin_published"])
        return write_standin_published(unet, unet_layout(unet), Path(work_dir) / "standin_published",
                                       int(block.get("seed", 0)), int(block.get("lora_rank", 4)))
    return cfg.get("faceid"), cfg.get("image_adapter")


def initial_adapter(cfg: Mapping, unet, work_dir) -> EAdapter:
    """The E-Adapter a stage starts from: ``emojidiff.init`` (ours) or the published files; with the FaceID
    file's LoRA (in :attr:`EAdapter.lora`) wherever that file is given."""
    faceid, image = published_files(cfg, unet, work_dir)
    layers = None if cfg["expression_layers"] == "auto" else cfg["expression_layers"]
    layout = unet_layout(unet)
    published = EAdapter.from_published(faceid, image, layers, layout) if faceid and image else None
    if cfg.get("init"):
        adapter = EAdapter.from_file(cfg["init"])
        adapter.lora = published.lora if published is not None else {}
    else:
        adapter = published
    if adapter.layout.name != layout.name:
        raise ValueError(f"the E-Adapter is for {adapter.layout.name} but the UNet is {layout.name}")
    for name, branch in adapter.named_adapters().items():
        for layer in branch.layers:
            width = unet.get_submodule(layer.diffusers_name).to_k.out_features
            kv = branch.branch(layer).to_k_ip.weight
            if tuple(kv.shape) != (width, int(unet.config.cross_attention_dim)):
                raise ValueError(f"the E-Adapter's {name} branch does not fit this UNet at {layer.diffusers_name}: "
                                 f"keys {tuple(kv.shape)}, the UNet's {width} x {unet.config.cross_attention_dim}")
    return adapter


def merge_lora(unet, lora: Mapping, scale: float) -> None:
    """FaceID's LoRA merged into the frozen UNet: W += scale x up @ down (it stays frozen; merging is exact)."""
    with torch.no_grad():
        for module_name, weights in lora.items():
            linear = unet.get_submodule(module_name)
            linear.weight += (scale * weights.delta()).to(linear.weight)


def training_view(adapter: EAdapter) -> EAdapter:
    """The adapter a stage trains: the expression branch on its layer set only; the ID K/V frozen."""
    view = EAdapter(adapter.identity, adapter.expression_branch("auto"), adapter.expression_layers, adapter.id_recognizer)
    view.float().requires_grad_(True)
    view.identity.ip_adapter.requires_grad_(False)
    return view


def frozen(adapter: EAdapter, device) -> EAdapter:
    return adapter.to(device).float().eval().requires_grad_(False)


def e_adapter_tokens(adapter: EAdapter, faceid: torch.Tensor, clip_image: torch.Tensor, prefix: str = "") -> dict:
    return {f"{prefix}id": adapter.id_tokens(faceid), f"{prefix}expression": adapter.expression_tokens(clip_image)}


def named_branches(adapter: EAdapter, prefix: str = "") -> dict:
    return {f"{prefix}{name}": branch for name, branch in adapter.named_adapters().items()}


def e_adapter_conditions(adapter: EAdapter, faceid: torch.Tensor, clip_image: torch.Tensor) -> dict[str, TokenCondition]:
    """The E-Adapter's two branches as branch conditions for a guided batch (names as :func:`named_branches`
    attaches them): the identity's and the expression image's tokens on the conditional rows, the tokens of
    zero embeddings elsewhere, as Apply E-Adapter has them."""
    branches = named_branches(adapter)
    tokens = e_adapter_tokens(adapter, faceid, clip_image)
    uncond = {"id": adapter.unconditional_id_tokens(), "expression": adapter.unconditional_expression_tokens()}
    what = {"id": "the identity", "expression": "the expression image"}
    return {name: TokenCondition(branches[name], tokens[name], uncond[name].to(tokens[name]), what=what[name])
            for name in ("id", "expression")}


class EAdapterDenoiser(nn.Module):
    """The frozen UNet with the E-Adapter's two branches; only the adapter is a submodule (see arc2face.AdapterDenoiser).

    Its forward is a training forward: tokens one per batch row (``adapter_tokens``), each row with its own
    condition dropout. Sampling lays a guided batch out with :func:`e_adapter_conditions` and a ``RowLayout``."""

    def __init__(self, unet, adapter: EAdapter):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "unet", unet)

    def forward(self, noisy, timesteps, context, faceid, clip_image, added=None):
        tokens = e_adapter_tokens(self.adapter, faceid, clip_image)
        return self.unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added,
                         cross_attention_kwargs={"adapter_tokens": tokens}).sample


# -- random scaling (SDXL) ---------------------------------------------------------------------------


def random_resized_crops(tensors: list[torch.Tensor], scale: tuple[float, float], generator, resolution: int):
    """The same random square crop of each row of every B x C x H x W tensor, of area fraction in ``scale``,
    resized back to H x W; and SDXL's time ids (original size, crop top-left, target size) in pixels of
    ``resolution``: the crop is the target, so the original is the full picture at resolution / side fraction.
    Our reading of IP-Adapter's "random scaling" ([ED supp B.1])."""
    batch, size = tensors[0].shape[0], tensors[0].shape[-1]
    device = tensors[0].device
    low, high = scale
    area = low + (high - low) * torch.rand(batch, generator=generator, device=generator.device if generator else device)
    where = torch.rand(batch, 2, generator=generator, device=generator.device if generator else device)
    outputs = [torch.empty_like(t) for t in tensors]
    time_ids = []
    for row in range(batch):
        side = max(1, min(size, round(float(area[row].sqrt()) * size)))
        top, left = (int(float(v) * (size - side + 1)) for v in where[row])
        top, left = min(top, size - side), min(left, size - side)
        for source, out in zip(tensors, outputs, strict=True):
            crop = source[row:row + 1, :, top:top + side, left:left + side].float()
            out[row] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0].to(out.dtype)
        factor = resolution / side
        original = size * factor
        time_ids.append([original, original, top * factor, left * factor, resolution, resolution])
    return outputs, torch.tensor(time_ids, dtype=torch.float32, device=device)


# -- stages ------------------------------------------------------------------------------------------


class EmojiDiffBaseStage(DenoisingStage):
    """Stage I (see the module docstring). Condition dropout per sample (IP-Adapter's scheme, our choice):
    the expression (zero CLIP embedding), the ID (zero FaceID embedding), the text (""), or all three."""

    name = "emojidiff_base"
    required_fields = ("faceid", "clip_image")
    items_with_epoch = True

    def __init__(self, config: Mapping, host, device):
        self.config, self.host, self.train_cfg = config, host, config["train"]
        self.cfg = config["emojidiff"]
        self.negative = None
        unet = host.unet
        self.layout = unet_layout(unet)
        adapter = initial_adapter(self.cfg, unet, config["output_dir"])
        if float(self.cfg["faceid_lora_scale"]) and adapter.lora:
            merge_lora(unet, adapter.lora, float(self.cfg["faceid_lora_scale"]))
        self.prompts = PromptEncoder.from_config(config["model"], config["output_dir"], device, next(unet.parameters()).dtype)
        self.frozen_modules = tuple(self.prompts.models)
        self.resolution = int(config["data"]["resolution"])
        self.module = EAdapterDenoiser(unet, training_view(adapter).to(device))
        attach_adapters(unet, named_branches(self.module.adapter))

    @property
    def sdxl(self) -> bool:
        return self.layout is SDXL

    def adapter(self, module) -> EAdapter:
        return module.adapter

    def export(self, module, path) -> None:
        self.adapter(module).save(path)

    def trainable_state(self, module) -> dict[str, torch.Tensor]:
        """Only the trained tensors: the frozen ID K/V (340 M values on SDXL) never change, so checkpoints skip them."""
        names = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
        return {key: value for key, value in module.state_dict().items() if key in names}

    def load_trainable_state(self, module, state) -> None:
        missing, unexpected = module.load_state_dict(state, strict=False)
        trained = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
        if unexpected or set(missing) & trained:
            raise ValueError(f"the checkpoint does not fit this stage's adapter: unexpected {unexpected[:4]}, "
                             f"missing {sorted(set(missing) & trained)[:4]}")

    def build_dataset(self, records, data_cfg: Mapping):
        from ..pair_samplers import PartnerDataset, same_person_other_expression, sample_table

        frames = super().build_dataset(records, data_cfg)
        table = sample_table(frames, expression=self.cfg["expression_field"], pose=None)
        sources = same_person_other_expression(table, float(self.cfg["expression_threshold"]))
        return PartnerDataset(frames, {"source": sources}, int(self.config["seed"]), same_as_target=["reference"])

    def conditions(self, batch: Mapping, generator, dropout: bool = True):
        """(context, pooled text or None, FaceID embeddings of S, CLIP embeddings of R's local image), dropout applied."""
        faceid = batch.get("source_faceid", batch["faceid"]).to(self.device).float()
        clip_image = batch.get("reference_clip_image", batch["clip_image"]).to(self.device).float()
        prompts = [meta.get("caption") or self.cfg["prompt"] for meta in batch["meta"]]
        if dropout:
            cfg, train = self.cfg, self.train_cfg
            edges = torch.tensor([float(train["drop_expression"]), float(train["drop_id"]), float(cfg["drop_text"]),
                                  float(train["drop_both"])]).cumsum(0).tolist()
            u = torch.rand(len(prompts), generator=generator, device=self.device)
            drop_all = (u >= edges[2]) & (u < edges[3])
            drop_exp = (u < edges[0]) | drop_all
            drop_id = ((u >= edges[0]) & (u < edges[1])) | drop_all
            drop_text = ((u >= edges[1]) & (u < edges[2])) | drop_all
            clip_image = torch.where(drop_exp[:, None], torch.zeros_like(clip_image), clip_image)
            faceid = torch.where(drop_id[:, None], torch.zeros_like(faceid), faceid)
            prompts = ["" if drop else prompt for prompt, drop in zip(prompts, drop_text.tolist(), strict=True)]
        context, pooled = self.prompts(prompts)
        return context.to(self.device), pooled, faceid, clip_image

    def default_time_ids(self, batch_size: int) -> torch.Tensor:
        r = float(self.resolution)
        return torch.tensor([[r, r, 0.0, 0.0, r, r]], device=self.device).expand(batch_size, 6)

    def added_conditions(self, pooled, time_ids):
        if not self.sdxl:
            return None
        if pooled is None:
            raise ValueError("an SDXL UNet needs the pooled text of a second text encoder: set model.text_encoder_2")
        dtype = next(self.host.unet.parameters()).dtype
        return {"text_embeds": pooled.to(self.device, dtype), "time_ids": time_ids.to(dtype)}

    def scaled(self, batch: Mapping, generator):
        """The batch after random scaling (when configured), and its SDXL time ids."""
        size = len(batch["key"])
        if self.cfg["random_scale"] is None:
            return batch, self.default_time_ids(size)
        names = [n for n in ("latent_mean", "latent_std", "pixels") if n in batch]
        tensors, time_ids = random_resized_crops([batch[n].to(self.device) for n in names],
                                                 tuple(float(v) for v in self.cfg["random_scale"]), generator, self.resolution)
        return dict(batch) | dict(zip(names, tensors, strict=True)), time_ids

    def denoise_step(self, module, batch: Mapping, generator, dropout: bool = True) -> SimpleNamespace:
        """One noising of the batch's targets and the model's prediction; everything the losses need."""
        scheduler = self.host.noise_scheduler
        batch, time_ids = self.scaled(batch, generator)
        latents = self.latents(batch, generator)
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        offset = float(self.train_cfg["noise_offset"])
        if offset:
            noise = noise + offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator,
                                                 device=self.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                                  device=self.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        context, pooled, faceid, clip_image = self.conditions(batch, generator, dropout)
        added = self.added_conditions(pooled, time_ids)
        dtype = next(self.host.unet.parameters()).dtype
        prediction = module(noisy.to(dtype), timesteps, context.to(dtype), faceid, clip_image, added)
        target = scheduler.get_velocity(latents, noise, timesteps) if scheduler.config.prediction_type == "v_prediction" else noise
        return SimpleNamespace(batch=batch, latents=latents, noise=noise, timesteps=timesteps, noisy=noisy.to(dtype),
                               context=context.to(dtype), added=added, faceid=faceid, clip_image=clip_image,
                               prediction=prediction, target=target)

    def loss(self, module, batch, generator, dropout: bool = True) -> torch.Tensor:
        step = self.denoise_step(module, batch, generator, dropout)
        return F.mse_loss(step.prediction.float(), step.target.float())

    def sampling_inputs(self, module, batch: Mapping) -> SamplingInputs:
        """CFG's two predictions for sample grids: the batch's prompts with S's identity and R's expression
        image, and the empty prompt with the branches' unconditional tokens (SDXL: with their pooled texts)."""
        context, pooled, faceid, clip_image = self.conditions(batch, None, dropout=False)
        count = context.shape[0]
        with torch.no_grad():
            conditions = e_adapter_conditions(self.adapter(module), faceid, clip_image)
        negative, negative_pooled = self.prompts([""] * count)
        added = None
        if self.sdxl:
            time_ids = self.default_time_ids(count)
            added = {UNCOND: self.added_conditions(negative_pooled, time_ids), COND: self.added_conditions(pooled, time_ids)}
        return SamplingInputs({UNCOND: negative.to(context), COND: context}, conditions, added=added)


class EmojiDiffRefinedStage(EmojiDiffBaseStage):
    """Stage III: the same training on ``training.idi``'s cross-identity triplets (one sample = one triplet)."""

    name = "emojidiff_refined"
    items_with_epoch = False

    def build_dataset(self, records, data_cfg: Mapping):
        return DenoisingStage.build_dataset(self, records, data_cfg)


class EmojiDiffICAStage(EmojiDiffRefinedStage):
    """Stage IV: ICA fine-tuning with ANI (see the module docstring and spec A2).

    x0_hat = Decode(z0 + f(t) (eps - eps_model)) with the ground-truth z0 and f capped at ``r_tmax``, for the
    current adapter (with gradients, through the frozen decoder, checkpointed) and both teachers (without).
    L_id = 1 - cos of the differentiable ArcFace on 112 crops aligned by 5 points of D's MediaPipe landmarks
    (eye centres, nose tip, mouth corners: our choice, resolution-free and pixel-aligned with x0_hat);
    L_exp = Wing between the FAN's soft-argmax landmarks (contour dropped) on a 256 crop around D's
    landmarks. The terms are logged as ``loss_sd``, ``loss_id_weighted`` and ``loss_exp_weighted``.
    """

    name = "emojidiff_ica"
    required_fields = ("faceid", "clip_image", "landmarks")

    def __init__(self, config: Mapping, host, device):
        from ..differentiable_faces import enable_decoder_checkpointing, load_torch_recognizer

        super().__init__(config, host, device)
        if host.vae is None:
            raise ValueError("emojidiff_ica decodes ANI's x0 estimates: set model.vae (or model.tiny_vae)")
        if host.noise_scheduler.config.prediction_type != "epsilon":
            raise ValueError("ANI (EmojiDiff Eq. 6) is written for epsilon prediction; this scheduler predicts "
                             f"{host.noise_scheduler.config.prediction_type}")
        cfg = self.cfg
        if cfg["random_scale"] is not None:
            raise ValueError("emojidiff_ica aligns its face crops by D's stored landmarks, which random scaling would move: "
                             "set emojidiff.random_scale to null")
        faceid, image = published_files(cfg, host.unet, config["output_dir"])
        teacher = EAdapter.from_file(cfg["exp_teacher"]) if cfg["exp_teacher"] else copy.deepcopy(self.module.adapter)
        self.exp_teacher = frozen(teacher, device)
        self.id_teacher = frozen(EAdapter.from_published(faceid, image, layout=self.layout).identity, device)
        attach_adapters(host.unet, named_branches(self.module.adapter) | named_branches(self.exp_teacher, "exp_teacher_")
                        | {"id_teacher": self.id_teacher})
        if cfg["arcface"]:
            self.recognizer = load_torch_recognizer(cfg["arcface"])
        else:
            self.recognizer = tiny_recognizer_net(cfg["tiny_arcface"])
        if cfg["fan"]:
            from encoders.emotion import load_emonet

            self.fan = load_emonet(cfg["fan"])
        else:
            self.fan = TinyFan(int(dict(cfg["tiny_fan"]).get("seed", 0)))
        self.recognizer = self.recognizer.to(device).eval().requires_grad_(False)
        self.fan = self.fan.to(device).eval().requires_grad_(False)
        if cfg["decoder_checkpointing"]:
            enable_decoder_checkpointing(host.vae)
        self.frozen_modules = (*self.frozen_modules, self.exp_teacher, self.id_teacher, self.recognizer, self.fan)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.host.vae
        dtype = next(vae.parameters()).dtype
        return vae.decode((latents / self.host.latent_scale + self.host.latent_shift).to(dtype)).sample.float()

    def loss(self, module, batch, generator, dropout: bool = True) -> torch.Tensor:
        terms = self.terms(module, batch, generator, dropout)
        weighted_id, weighted_exp = float(self.cfg["id_weight"]) * terms["loss_id"], float(self.cfg["exp_weight"]) * terms["loss_exp"]
        self.loss_terms = {"loss_sd": terms["loss_sd"].detach(), "loss_id_weighted": weighted_id.detach(),
                           "loss_exp_weighted": weighted_exp.detach()}
        return terms["loss_sd"] + weighted_id + weighted_exp

    def terms(self, module, batch, generator, dropout: bool = True) -> dict[str, torch.Tensor]:
        """L_sd, L_id and L_exp (unweighted) of one draw."""
        from ..differentiable_faces import fan_landmarks, identity_loss, warp_faces
        from ..losses import ani_latent, wing_loss

        cfg = self.cfg
        step = self.denoise_step(module, batch, generator, dropout)
        loss_sd = F.mse_loss(step.prediction.float(), step.target.float())
        unet = self.host.unet
        with torch.no_grad():
            def teacher(tokens):  # a training forward: the batch's own rows, tokens one per row
                return unet(step.noisy, step.timesteps, encoder_hidden_states=step.context, added_cond_kwargs=step.added,
                            cross_attention_kwargs={"adapter_tokens": tokens}).sample.float()

            eps_exp = teacher(e_adapter_tokens(self.exp_teacher, step.faceid, step.clip_image, "exp_teacher_"))
            eps_id = teacher({"id_teacher": self.id_teacher.project(step.faceid)})
        abar = self.host.noise_scheduler.alphas_cumprod
        r_tmax = int(cfg["r_tmax"])

        def x0(eps):
            return self.decode(ani_latent(step.latents, step.noise, eps, step.timesteps, abar, r_tmax))

        current = x0(step.prediction.float())
        with torch.no_grad():
            expression_teacher, identity_teacher = x0(eps_exp), x0(eps_id)
        size = current.shape[-1]
        landmarks = step.batch["landmarks"].to(self.device).float()[..., :2]
        loss_id = identity_loss(self.recognizer, identity_teacher, current, arcface_points(landmarks) * size)
        crop = landmark_crop_matrices(landmarks, size, 256, float(cfg["landmark_crop_margin"]))
        beta = float(cfg["landmark_beta"])

        def points(images):
            return fan_landmarks(self.fan, ((warp_faces(images, crop, 256) + 1) / 2).clamp(0, 1), beta)

        with torch.no_grad():
            target_points = points(expression_teacher)
        loss_exp = wing_loss(points(current), target_points, float(cfg["wing_width"]), float(cfg["wing_epsilon"]))
        return {"loss_sd": loss_sd, "loss_id": loss_id, "loss_exp": loss_exp}


# -- face geometry of ICA ------------------------------------------------------------------------

# MediaPipe indices of the 5 ArcFace points, in the template's order (image-left eye first).
ARCFACE_FROM_MEDIAPIPE = ((33, 133), (362, 263), (1,), (61,), (291,))


def arcface_points(landmarks: torch.Tensor) -> torch.Tensor:
    """B x 478 x 2 normalised MediaPipe landmarks -> B x 5 x 2 normalised ArcFace keypoints."""
    return torch.stack([landmarks[:, list(group)].mean(1) for group in ARCFACE_FROM_MEDIAPIPE], 1)


def landmark_crop_matrices(landmarks: torch.Tensor, image_size: int, crop_size: int, margin: float) -> torch.Tensor:
    """B x 2 x 3 pixel maps of the square around each face's landmarks (``margin`` x its larger side) to the crop."""
    xy = landmarks * image_size
    low, high = xy.amin(1), xy.amax(1)
    centre, side = (low + high) / 2, (high - low).amax(1) * margin
    scale = crop_size / side.clamp(min=1.0)
    zero = torch.zeros_like(scale)
    return torch.stack([torch.stack([scale, zero, crop_size / 2 - centre[:, 0] * scale], -1),
                        torch.stack([zero, scale, crop_size / 2 - centre[:, 1] * scale], -1)], 1)
