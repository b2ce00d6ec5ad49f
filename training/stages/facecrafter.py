"""FaceCrafter's training stages (Mishima et al., §3.2; spec B3) on the frozen Arc2Face UNet.

- ``facecrafter_lmk`` / ``facecrafter_emo``: one control module alone (its encoder and its K/V),
  the ID image drawn by the module's pair rule (:mod:`training.pair_samplers`): LMK: the same
  person with another pose and expression; EMO: the same person and pose, another expression.
  Every row has its module on. Loss: the denoising MSE.
- ``facecrafter_joint``: both modules (from the pre-training files) and Arc2Face's CLIP ID encoder
  (ArcFace stays frozen: the prepared embeddings are constants). Intra-batch mixed conditioning
  (:mod:`training.mixed_conditioning`): each example is replicated ``facecrafter.replicas`` times
  and each replica switches the modules with its own (alpha_LMK, alpha_EMO). Loss: the denoising
  MSE plus lambda_AD x the AD loss (:func:`training.losses.attention_disentanglement_loss`) over the
  attention outputs the diffusers host records during that same forward, masked by the face mask
  resized (nearest) to each layer's token grid. Both terms are logged (``train/loss_sd``,
  ``train/loss_ad``, the latter already weighted).

The unconditional embedding stays the *original* encoder's (spec B3 CHOICE): it is computed once,
before training, and the export writes it beside the trained encoder, where Load Arc2Face ID
Encoder picks it up. Exports: ``export.file`` (the ``lmk.*``/``emo.*`` file Load FaceCrafter
reads) and, for the joint stage, ``export.id_encoder_folder`` (config.json, model.safetensors,
negative_conditioning.safetensors) next to it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from adapters.facecrafter import (
    DEFAULT_LANDMARK_STYLE,
    GUIDANCE_CONDITIONAL,
    GUIDANCE_SWITCHES,
    MODULE_NAMES,
    SWITCHES_KEY,
    EmotionEncoderConfig,
    FaceCrafter,
    LandmarkEncoderConfig,
    SwitchedCondition,
    multi_condition_guidance,
)
from adapters.layers import SD15
from encoders.arc2face_id import NEGATIVE_FILE
from encoders.expressions import Landmarks
from encoders.landmark_image import render_landmark_image
from hosts.diffusers import attach_adapters

from ..data import ShardDataset
from ..losses import attention_disentanglement_loss, token_mask
from ..mixed_conditioning import MixedRows, mixed_rows, row_noise
from ..models import HostModels, unet_layout, unet_widths
from ..pair_samplers import PartnerDataset, emo_partners, lmk_partners, sample_table
from ..sampling import SamplingInputs
from .base import DenoisingStage

logger = logging.getLogger(__name__)
SWITCH_COLUMNS = {"lmk": 0, "emo": 1}  # columns of MixedRows.alphas
SAMPLED_CONDITIONS = {"lmk": "the landmark image", "emo": "the emotion"}  # what each module's condition is, in messages


class FaceCrafterDenoiser(nn.Module):
    """The frozen UNet with FaceCrafter's branches. Submodules (trained, synchronised, checkpointed):
    ``crafter`` and, when the ID encoder trains, ``text_model``.

    ``forward`` takes one row per example for the ID embeddings and conditions and ``source`` (which
    example each UNet row is), so replicas share one encoder pass; ``alphas`` (rows x 2) are the
    per-row switches (alpha_LMK, alpha_EMO). A dict ``record`` receives the attention outputs.
    Intra-batch mixed conditioning gives every row its own switches, so the training forward passes
    tokens and alphas one per row (``adapter_tokens``/``adapter_scale``): a per-row layout, not the chunks
    of a guided batch (sampling: :meth:`FaceCrafterStage.sampling_inputs`, switched conditions and a
    ``RowLayout``).
    """

    def __init__(self, unet, crafter: FaceCrafter, id_encoder, train_id_encoder: bool):
        super().__init__()
        self.crafter = crafter
        object.__setattr__(self, "unet", unet)
        object.__setattr__(self, "id_encoder", id_encoder)
        if train_id_encoder:
            self.text_model = id_encoder.text_model
        attach_adapters(unet, crafter.modules_present())

    @property
    def trains_id_encoder(self) -> bool:
        return "text_model" in self._modules

    def forward(self, noisy, timesteps, id_embeddings, source, alphas, landmark_images=None, emotion=None, record=None):
        encode = self.id_encoder.encode_differentiable if self.trains_id_encoder else self.id_encoder.encode
        context = encode(id_embeddings)[source].to(noisy.dtype)
        tokens, scales = {}, {}
        for name, condition in (("lmk", landmark_images), ("emo", emotion)):
            module = getattr(self.crafter, name)
            if module is not None and condition is not None:
                tokens[name] = module.tokens(condition)[source]
                scales[name] = alphas[:, SWITCH_COLUMNS[name]].to(noisy.device)
        kwargs = {"adapter_tokens": tokens, "adapter_scale": scales}
        if record is not None:
            kwargs["attention_record"] = record
        return self.unet(noisy, timesteps, encoder_hidden_states=context, cross_attention_kwargs=kwargs).sample


class LandmarkImages(Dataset):
    """Adds ``landmark_image`` (3 x S x S, 0..1) drawn from each item's ``landmarks`` (the target's frame)."""

    def __init__(self, dataset, size: int, style: Mapping):
        self.dataset, self.size = dataset, int(size)
        self.style = {key: style[key] for key in ("palette", "thickness", "fit")}
        self.shard_ranges = dataset.shard_ranges

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item) -> dict:
        out = self.dataset[item]
        image = render_landmark_image(Landmarks(out["landmarks"][None]), self.size, self.size, **self.style)
        out["landmark_image"] = image[0].permute(2, 0, 1).contiguous()
        return out


class FaceCrafterStage(DenoisingStage):
    """Shared by the three stages; subclasses name the modules they train and their pair rule."""

    modules: tuple[str, ...] = ()
    train_id_encoder = False
    default_partner = "lmk"
    items_with_epoch = True

    def __init__(self, config: Mapping, host: HostModels, device):
        self.config, self.host = config, host
        self.fc = config["facecrafter"]
        if unet_layout(host.unet) is not SD15:
            raise ValueError("FaceCrafter trains on Arc2Face, an SD1.5 UNet; model.unet is another family")
        crafter = self.build_crafter().to(device)
        self.negative = host.id_encoder.encode_negative(1)  # the original encoder's, kept for good (CHOICE)
        if self.train_id_encoder:
            host.id_encoder.text_model.float().requires_grad_(True)  # trained in float32 even when the UNet is half
        self.module = FaceCrafterDenoiser(host.unet, crafter, host.id_encoder, self.train_id_encoder)
        self.ad_weight = float(self.fc["ad_weight"]) if self.train_id_encoder else 0.0
        self.loss_terms = {}

    # -- modules -----------------------------------------------------------------------------

    def build_crafter(self) -> FaceCrafter:
        """New modules with the configured shapes, or (``<module>_init``) the pre-trained ones."""
        fc = self.fc
        loaded = {name: self.pretrained(name) for name in self.modules if fc.get(f"{name}_init")}
        configs = {"lmk": _dataclass(LandmarkEncoderConfig, fc["lmk"]), "emo": _dataclass(EmotionEncoderConfig, fc["emo"])}
        for name, crafter in loaded.items():
            configs[name] = getattr(crafter, name).encoder.config
        style = dict(DEFAULT_LANDMARK_STYLE) | dict(fc["landmark_style"]) | {"size": configs["lmk"].image_size}
        if "lmk" in loaded:
            style = dict(DEFAULT_LANDMARK_STYLE) | loaded["lmk"].landmark_style  # draw what the LMK module was trained on
        layer_set = next((crafter.layer_set for crafter in loaded.values()), fc["layer_set"])
        torch.manual_seed(int(fc["seed"]))
        crafter = FaceCrafter(*(configs[name] if name in self.modules else None for name in ("lmk", "emo")),
                              layer_set=layer_set, widths=unet_widths(self.host.unet, SD15), landmark_style=style)
        for name, source in loaded.items():
            try:
                getattr(crafter, name).load_state_dict(getattr(source, name).state_dict())
            except RuntimeError as error:
                raise ValueError(f"facecrafter.{name}_init does not fit this UNet's layers: {error}") from None
        return crafter.float().train().requires_grad_(True)

    def pretrained(self, name: str) -> FaceCrafter:
        path = self.fc[f"{name}_init"]
        crafter = FaceCrafter.from_file(path)
        if getattr(crafter, name) is None:
            raise ValueError(f"facecrafter.{name}_init {path} has no {name} section; give the file facecrafter_{name} exported")
        return crafter

    def parameter_groups(self, module):
        groups = [{"params": list(module.crafter.parameters())}]
        if module.trains_id_encoder:
            groups.append({"params": list(module.text_model.parameters()), "lr": float(self.fc["id_encoder_learning_rate"])})
        return groups

    # -- data --------------------------------------------------------------------------------

    def partner_rule(self) -> str:
        return self.fc["partner"] or self.default_partner

    def fields(self) -> tuple[str, ...]:
        wanted = ["id"] + (["landmarks"] if "lmk" in self.modules else []) + (["emotion"] if "emo" in self.modules else [])
        if self.ad_weight > 0:
            wanted.append("face_mask")
        if self.partner_rule() != "self":
            wanted += ["blendshapes", "head_pose"]  # what the pair rules compare
        return tuple(wanted)

    def build_dataset(self, records, data_cfg: Mapping):
        fc, seed = self.fc, int(self.config["seed"])
        cached = bool(data_cfg["use_cached_latents"])
        frames = ShardDataset(records, self.fields(), resolution=int(data_cfg["resolution"]), load_image=not cached,
                              load_latents=cached)
        rule = self.partner_rule()
        if rule == "self":
            pairs = PartnerDataset(frames, {}, seed, same_as_target=["source"])
        else:
            table = sample_table(frames)
            threshold = float(fc["expression_threshold"])
            if rule == "lmk":
                partners = lmk_partners(table, threshold, float(fc["pose_degrees"]))
            else:
                partners = emo_partners(table, threshold, float(fc["same_pose_degrees"]))
            alone = sum(not len(p) for p in partners)
            if fc["unpaired"] == "self":
                partners = [p if len(p) else np.asarray([i]) for i, p in enumerate(partners)]
            logger.info("%s: %d of %d targets have no %s partner (%s)", self.name, alone, len(partners), rule,
                        "their own image is their ID image" if fc["unpaired"] == "self" else "left out")
            pairs = PartnerDataset(frames, {"source": partners}, seed)
        if "lmk" not in self.modules:
            return pairs
        return LandmarkImages(pairs, self.module.crafter.lmk.encoder.config.image_size, self.module.crafter.landmark_style)

    # -- loss --------------------------------------------------------------------------------

    def rows(self, examples: int, generator: torch.Generator) -> MixedRows:
        """Pre-training: one row per example, its module on."""
        alphas = torch.tensor([[float("lmk" in self.modules), float("emo" in self.modules)]]).expand(examples, 2)
        return MixedRows(torch.arange(examples), alphas, ["ID+LMK" if "lmk" in self.modules else "ID+EMO"] * examples)

    def conditions(self, batch: Mapping) -> dict:
        out = {}
        if "lmk" in self.modules:
            out["landmark_images"] = batch["landmark_image"].to(self.device)
        if "emo" in self.modules:
            out["emotion"] = batch["emotion"].to(self.device).float()
        return out

    def loss(self, module, batch, generator) -> torch.Tensor:
        scheduler = self.host.noise_scheduler
        latents = self.latents(batch, generator)
        rows = self.rows(latents.shape[0], generator)
        noise, timesteps = row_noise(tuple(latents.shape[1:]), rows, scheduler.config.num_train_timesteps, generator,
                                     bool(self.fc["shared_noise"]))
        source = rows.source.to(self.device)
        clean = latents[source]
        noisy = scheduler.add_noise(clean, noise, timesteps)
        record = {} if self.ad_weight > 0 else None
        dtype = next(self.host.unet.parameters()).dtype
        prediction = module(noisy.to(dtype), timesteps, batch["source_id"].to(self.device), source, rows.alphas,
                            record=record, **self.conditions(batch))
        target = scheduler.get_velocity(clean, noise, timesteps) if scheduler.config.prediction_type == "v_prediction" else noise
        loss_sd = F.mse_loss(prediction.float(), target.float())
        self.loss_terms = {"loss_sd": loss_sd.detach()}
        if record is None:
            return loss_sd
        loss_ad = self.ad_weight * self.ad_loss(record, batch["face_mask"].to(self.device), rows)
        self.loss_terms["loss_ad"] = loss_ad.detach()
        return loss_sd + loss_ad

    def ad_loss(self, record: Mapping[str, torch.Tensor], face_masks: torch.Tensor, rows: MixedRows) -> torch.Tensor:
        """L_AD over the recorded layers, the example's face mask resized (nearest) to each layer's token grid."""
        if face_masks.dim() == 4:  # B x 1 x H x W
            face_masks = face_masks[:, 0]
        outputs = [record[name] for name in sorted(record)]
        masks = [token_mask(face_masks, output.shape[1])[rows.source.to(face_masks.device)] for output in outputs]
        return attention_disentanglement_loss(outputs, rows.conditions, rows.source, masks,
                                              token_reduction=self.fc["ad_token_reduction"],
                                              pair_reduction=self.fc["ad_pair_reduction"])

    # -- samples and export ------------------------------------------------------------------

    def guidance_chunks(self) -> list[int]:
        """The FaceCrafter Guider's predictions a preview runs, as GUIDANCE_SWITCHES indices: uncond, ID, and
        ID+LMK / ID+EMO for the modules this stage has (the Guider skips a module the model lacks)."""
        return [0, 1] + [2] * ("lmk" in self.modules) + [3] * ("emo" in self.modules)

    def sampling_inputs(self, module, batch: Mapping) -> SamplingInputs:
        """Eq. 6's predictions, as the FaceCrafter Guider runs them: the chunks of :meth:`guidance_chunks`, the
        negative on the unconditional one and the ID context on the others (GUIDANCE_CONDITIONAL), each module a
        switched condition whose alpha per chunk is that prediction's switch (GUIDANCE_SWITCHES)."""
        with torch.no_grad():
            context = self.host.id_encoder.encode(batch["source_id"].to(self.device))
            conditions = {}
            for name, condition in self.conditions(batch).items():
                key = "lmk" if name == "landmark_images" else "emo"
                control = getattr(module.crafter, key)
                conditions[key] = SwitchedCondition(control, control.tokens(condition), 1.0, MODULE_NAMES.index(key),
                                                    SAMPLED_CONDITIONS[key])
        negative = self.negative.to(context).expand_as(context)
        chunks = self.guidance_chunks()
        return SamplingInputs({index: context if GUIDANCE_CONDITIONAL[index] else negative for index in chunks}, conditions,
                              chunks, GUIDANCE_CONDITIONAL, {SWITCHES_KEY: GUIDANCE_SWITCHES}, guide=self.sampling_guide())

    def sampling_guide(self):
        """Eq. 6 over the predictions of :meth:`guidance_chunks` with facecrafter.w_id / w_lmk / w_emo."""
        weights = {2: float(self.fc["w_lmk"]), 3: float(self.fc["w_emo"])}
        modules = [weights[index] for index in self.guidance_chunks()[2:]]
        w_id = float(self.fc["w_id"])

        def guide(unconditional, with_id, *with_modules):
            return multi_condition_guidance(unconditional, with_id, with_modules, w_id, modules)

        return guide

    def export(self, module, path) -> None:
        module.crafter.save(path)
        if module.trains_id_encoder:
            save_id_encoder(module.text_model, self.negative, Path(path).parent / self.config["export"]["id_encoder_folder"])


def save_id_encoder(text_model, negative: torch.Tensor, folder: Path) -> None:
    """The trained encoder as Load Arc2Face ID Encoder reads it, with the original encoder's negative beside it."""
    from adapters.checkpoints import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    text_model.save_pretrained(str(folder), safe_serialization=True)
    write_safetensors({"negative": negative.float()}, folder / NEGATIVE_FILE,
                      metadata={"kind": "Arc2Face negative conditioning (the encoder on '' before fine-tuning)"})


def _dataclass(config_class, values: Mapping):
    values = dict(values or {})
    if "channels" in values:
        values["channels"] = tuple(values["channels"])
    try:
        return config_class(**values)
    except TypeError as error:
        raise ValueError(f"facecrafter module settings {values}: {error}") from None


class FaceCrafterLmkStage(FaceCrafterStage):
    name = "facecrafter_lmk"
    modules = ("lmk",)
    default_partner = "lmk"


class FaceCrafterEmoStage(FaceCrafterStage):
    name = "facecrafter_emo"
    modules = ("emo",)
    default_partner = "emo"


class FaceCrafterJointStage(FaceCrafterStage):
    """Both modules and the CLIP ID encoder; intra-batch mixed conditioning and the AD loss.

    The ID image follows the LMK rule by default (other pose and expression; the paper does not say
    which pairs the joint stage uses: a CHOICE, ``facecrafter.partner``).
    """

    name = "facecrafter_joint"
    modules = ("lmk", "emo")
    train_id_encoder = True
    default_partner = "lmk"

    def rows(self, examples: int, generator: torch.Generator) -> MixedRows:
        return mixed_rows(examples, int(self.fc["replicas"]), generator)

