"""Nodes for FaceCrafter: load the control modules, patch Arc2Face, guide with four predictions, re-pose landmarks."""

from __future__ import annotations

import logging

import comfy.samplers
import torch
from comfy_api.latest import io

from ..adapters.checkpoints import FACECRAFTER_FILE, adapter_file_kind
from ..adapters.facecrafter import (
    GUIDANCE_CONDITIONAL,
    GUIDANCE_SWITCHES,
    SWITCHES_KEY,
    FaceCrafter,
    check_emotion,
    multi_condition_guidance,
)
from ..adapters.rows import CONDITIONAL_KEY
from ..encoders.core_face_landmarks import as_landmarks
from ..encoders.landmark_image import blank_rows, resize_landmark_images
from ..encoders.landmark_pose import pose_sweep
from ..hosts.comfyui.facecrafter import HOOK_SWITCHES, apply_facecrafter, facecrafter_applications
from ..hosts.comfyui.helper_models import helper_of
from .model_folders import model_choices, model_file
from .types import EmotionType, FaceCrafterType, FaceLandmarksType, landmarks_input
from .validation import check_choices, check_numbers

CATEGORY = "expression_adapters"
log = logging.getLogger(__name__)


FACECRAFTER_NAME = "facecrafter.safetensors"
FACECRAFTER_SOURCE = ("your own training run (python -m training.train --config training/configs/facecrafter_joint.yaml "
                      "exports it; FaceCrafter's authors have published no weights)")

class LoadFaceCrafter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersLoadFaceCrafter",
            display_name="Load FaceCrafter",
            category=f"{CATEGORY}/loaders",
            description="Loads FaceCrafter's control modules (LMK: landmark image, EMO: emotion; either may be absent) "
                        "from a .safetensors file in ComfyUI/models/expression_adapters.",
            inputs=[io.Combo.Input("facecrafter_name",
                                   options=model_choices("expression_adapters", FACECRAFTER_NAME,
                                                         lambda path: adapter_file_kind(path) == FACECRAFTER_FILE),
                                   tooltip="A FaceCrafter .safetensors file (lmk.* and/or emo.* sections) in "
                                           "ComfyUI/models/expression_adapters")],
            outputs=[FaceCrafterType.Output(display_name="facecrafter")],
        )

    @classmethod
    def execute(cls, facecrafter_name):
        check_choices(cls, {"facecrafter_name": "expression_adapters"}, facecrafter_name=facecrafter_name)
        path = model_file("expression_adapters", facecrafter_name, FACECRAFTER_SOURCE)
        return io.NodeOutput(FaceCrafter.from_file(path))


def landmark_tokens(crafter: FaceCrafter, images: torch.Tensor, allow_blank: bool) -> torch.Tensor:
    size = crafter.lmk.encoder.config.image_size
    chw, resized = resize_landmark_images(images, size)
    if resized:
        log.warning("Apply FaceCrafter: landmark images of %dx%d resized to %dx%d, the size the LMK module reads; "
                    "render them at %d for sharp lines", images.shape[2], images.shape[1], size, size, size)
    blank = blank_rows(chw)
    if blank and not allow_blank:
        raise ValueError(f"landmark image {', '.join(str(i + 1) for i in blank)} is all black (no face drawn): connect "
                         "Landmark Image (FaceCrafter) output, or turn on allow_blank_landmark_image to use it anyway")
    return _on_compute_device(crafter.lmk, chw)


def _on_compute_device(module, condition: torch.Tensor) -> torch.Tensor:
    """Tokens computed once, kept on the CPU; the module's encoder runs where ComfyUI's model management loads it,
    as SMIRK's and EmoNet's do."""
    helper = helper_of(module, module.kind)
    with torch.no_grad():
        return helper.loaded().tokens(condition.to(helper.patcher.load_device)).cpu()


class ApplyFaceCrafter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersApplyFaceCrafter",
            display_name="Apply FaceCrafter",
            category=f"{CATEGORY}/apply",
            description="Adds FaceCrafter's landmark (pose + expression) and emotion branches to an Arc2Face (SD1.5) "
                        "model. Under a plain KSampler they are on for the positive and off for the negative; the "
                        "FaceCrafter Guider switches them per prediction (paper Eq. 6).",
            inputs=[
                io.Model.Input("model", tooltip="Arc2Face's UNet (SD1.5); stacks on Expression/Reference Adapter patches"),
                FaceCrafterType.Input("facecrafter", tooltip="From Load FaceCrafter"),
                io.Image.Input("landmark_image", optional=True,
                               tooltip="From Landmark Image (FaceCrafter), in the target's frame: one image for the "
                                       "whole batch or one per image. Other sizes are resized to 512"),
                EmotionType.Input("emotion", optional=True,
                                  tooltip="From Emotion (manual) or Emotion from Image: one row for the whole batch "
                                          "or one per image"),
                io.Float.Input("lmk_strength", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="alpha_LMK: 1 as trained, 0 switches the landmark branch off"),
                io.Float.Input("emo_strength", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="alpha_EMO: 1 as trained, 0 switches the emotion branch off"),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of sampling where the branches start"),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of sampling where the branches stop"),
                io.Boolean.Input("allow_blank_landmark_image", default=False, optional=True,
                                 tooltip="Accept an all-black landmark image (no face drawn); off, it is refused "
                                         "as a likely wiring mistake"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, facecrafter, lmk_strength, emo_strength, start_at, end_at, landmark_image=None,
                emotion=None, allow_blank_landmark_image=False):
        check_numbers(cls, lmk_strength=lmk_strength, emo_strength=emo_strength)
        if landmark_image is None and emotion is None:
            raise ValueError("Apply FaceCrafter needs a landmark image, an emotion or both")
        lmk_tokens = emo_tokens = None
        if landmark_image is not None:
            if facecrafter.lmk is None:
                raise ValueError("this FaceCrafter file has no LMK (landmark) module; disconnect the landmark image")
            lmk_tokens = landmark_tokens(facecrafter, landmark_image, allow_blank_landmark_image)
        if emotion is not None:
            if facecrafter.emo is None:
                raise ValueError("this FaceCrafter file has no EMO (emotion) module; disconnect the emotion")
            values = emotion.float() if isinstance(emotion, torch.Tensor) else emotion.values  # an Emotion, or raw rows
            check_emotion(values)
            emo_tokens = _on_compute_device(facecrafter.emo, values)
        rows = {len(t) for t in (lmk_tokens, emo_tokens) if t is not None} - {1}
        if len(rows) > 1:
            raise ValueError(f"the landmark images and the emotion have different numbers of rows ({len(lmk_tokens)} and "
                             f"{len(emo_tokens)}): give one for all images or one per image")
        return io.NodeOutput(apply_facecrafter(model, facecrafter, lmk_tokens, emo_tokens, lmk_strength, emo_strength,
                                               start_at, end_at))


def _with_transformer_options(model_options: dict, entries: dict) -> dict:
    options = dict(model_options)
    options["transformer_options"] = dict(model_options.get("transformer_options", {})) | entries
    return options


class FaceCrafterCFGGuider(comfy.samplers.CFGGuider):
    """Paper Eq. 6 with the four predictions (uncond, ID, ID+LMK, ID+EMO) as one batched model call per step.

    ComfyUI's predictions are denoised latents, not noise; Eq. 6's weights sum to 1, so the formula
    is the same on either. The model call tells the patches which prediction each chunk is: FaceCrafter's
    switches (``facecrafter_switches``) and, for every other adapter on the model (Expression, Reference,
    E-Adapter), which chunks are conditional (all but the negative: ``rows.CONDITIONAL_KEY``).

    Like ComfyUI's ``cfg_function`` (and its PerpNeg guider), the result goes through the model's
    ``sampler_post_cfg_function`` hooks with ComfyUI's arguments: ``cond_denoised`` the ID prediction,
    ``uncond_denoised`` the negative, ``cond_scale`` w_id, ``denoised`` the guided result, plus
    ``lmk_denoised``/``emo_denoised`` (None where not run) and ``lmk_scale``/``emo_scale``. Hooks that run
    the model again get options in ComfyUI's plain order (0 the positive as the ID prediction, 1 the
    negative). ``sampler_cfg_function`` and ``sampler_pre_cfg_function`` replace or edit a two-prediction
    CFG; Eq. 6 has four, so this guider does not run them (the node warns); our choice.
    """

    def set_conds(self, positive, negative):
        self.inner_set_conds({"positive": positive, "negative": negative})

    def set_weights(self, w_id: float, w_lmk: float, w_emo: float):
        self.w_id, self.w_lmk, self.w_emo = w_id, w_lmk, w_emo

    def _used(self, name: str, weight: float) -> bool:
        return weight != 0.0 and any(name in app.active_modules for app in facecrafter_applications(self.model_patcher))

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        negative, positive = self.conds.get("negative"), self.conds.get("positive")
        use_lmk, use_emo = self._used("lmk", self.w_lmk), self._used("emo", self.w_emo)
        options = _with_transformer_options(model_options, {SWITCHES_KEY: GUIDANCE_SWITCHES,
                                                            CONDITIONAL_KEY: GUIDANCE_CONDITIONAL})
        # list index = the chunk index the patches read from cond_or_uncond; None entries are not run
        uncond, with_id, with_lmk, with_emo = comfy.samplers.calc_cond_batch(
            self.inner_model, [negative, positive, positive if use_lmk else None, positive if use_emo else None],
            x, timestep, options)
        predictions, weights = [], []
        for used, prediction, weight in ((use_lmk, with_lmk, self.w_lmk), (use_emo, with_emo, self.w_emo)):
            if used:
                predictions.append(prediction)
                weights.append(weight)
        guided = multi_condition_guidance(uncond, with_id, predictions, self.w_id, weights)
        hook_options = _with_transformer_options(model_options, {SWITCHES_KEY: HOOK_SWITCHES})
        for hook in model_options.get("sampler_post_cfg_function", []):
            guided = hook({"denoised": guided, "cond": positive, "uncond": negative, "cond_scale": self.w_id,
                           "model": self.inner_model, "uncond_denoised": uncond, "cond_denoised": with_id,
                           "sigma": timestep, "model_options": hook_options, "input": x,
                           "lmk_denoised": with_lmk if use_lmk else None, "emo_denoised": with_emo if use_emo else None,
                           "lmk_scale": self.w_lmk, "emo_scale": self.w_emo})
        return guided


def warn_about_unused_cfg_functions(model) -> None:
    """Functions that replace or edit two-prediction CFG (RescaleCFG, PerpNeg, APG...) do not fit Eq. 6."""
    unused = [name for name in ("sampler_cfg_function", "sampler_pre_cfg_function") if model.model_options.get(name)]
    if unused:
        log.warning("FaceCrafter Guider: the model has %s (from a node such as RescaleCFG, PerpNeg or APG); they "
                    "change a two-prediction CFG and are not used with the guider's four predictions. Post-CFG hooks "
                    "(CFGNorm, PAG, SAG...) are used.", " and ".join(unused))


class FaceCrafterGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersFaceCrafterGuider",
            display_name="FaceCrafter Guider",
            category=f"{CATEGORY}/sampling",
            description="FaceCrafter's multi-condition guidance (paper Eq. 6) for SamplerCustomAdvanced: "
                        "eps + w_id (ID - eps) + w_lmk (ID+LMK - ID) + w_emo (ID+EMO - ID). Four predictions per step "
                        "(two where a module is unused), in one batched model call; this pack's other adapters on the "
                        "model act on the three positive predictions, and post-CFG nodes on the result. The paper "
                        "samples with DDPM.",
            inputs=[
                io.Model.Input("model", tooltip="A model patched by Apply FaceCrafter (Expression/Reference Adapter patches may "
                                                "sit on it too)"),
                io.Conditioning.Input("positive", tooltip="Arc2Face ID conditioning (positive)"),
                io.Conditioning.Input("negative", tooltip="Arc2Face ID conditioning (negative: the empty prompt)"),
                io.Float.Input("w_id", default=2.5, min=0.0, max=20.0, step=0.1, tooltip="Identity guidance (paper: 2.5)"),
                io.Float.Input("w_lmk", default=2.0, min=0.0, max=20.0, step=0.1,
                               tooltip="Landmark guidance on top of the identity (paper: 2.0); 0 skips that prediction"),
                io.Float.Input("w_emo", default=2.0, min=0.0, max=20.0, step=0.1,
                               tooltip="Emotion guidance on top of the identity (paper: 2.0); 0 skips that prediction"),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, w_id, w_lmk, w_emo):
        check_numbers(cls, w_id=w_id, w_lmk=w_lmk, w_emo=w_emo)
        if not facecrafter_applications(model):
            raise ValueError("FaceCrafter Guider needs a model patched by Apply FaceCrafter; use CFGGuider for other models")
        warn_about_unused_cfg_functions(model)
        guider = FaceCrafterCFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_weights(float(w_id), float(w_lmk), float(w_emo))
        return io.NodeOutput(guider)


class LandmarkPoseEditor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        angle = {"min": -90.0, "max": 90.0, "step": 1.0}
        return io.Schema(
            node_id="ExpressionAdaptersLandmarkPoseEditor",
            display_name="Landmark Pose Editor",
            category=f"{CATEGORY}/edit",
            description="Turns face landmarks in 3D (yaw, pitch, roll about the face centre), then scales and shifts "
                        "them in the frame: a pose for Landmark Image (FaceCrafter) without a pose photo. With frames > 1 "
                        "the angles sweep from the first to the *_end values over a batch.",
            inputs=[
                landmarks_input("landmarks", tooltip="From Face Landmarks: one face, or one per frame"),
                io.Float.Input("yaw", default=0.0, **angle, tooltip="Degrees; > 0 turns the face toward the image's right"),
                io.Float.Input("pitch", default=0.0, **angle, tooltip="Degrees; > 0 tilts the face up"),
                io.Float.Input("roll", default=0.0, **angle, tooltip="Degrees; > 0 turns the face counter-clockwise"),
                io.Float.Input("scale", default=1.0, min=0.25, max=4.0, step=0.05, tooltip="Face size, about its centre"),
                io.Float.Input("shift_x", default=0.0, min=-1.0, max=1.0, step=0.01, tooltip="Move right by this fraction of the width"),
                io.Float.Input("shift_y", default=0.0, min=-1.0, max=1.0, step=0.01, tooltip="Move down by this fraction of the height"),
                io.Int.Input("frames", default=1, min=1, max=256,
                             tooltip="1: one pose for every row; more: a sweep of this many rows toward the *_end angles"),
                io.Float.Input("yaw_end", default=0.0, **angle, tooltip="Yaw of the last frame of a sweep"),
                io.Float.Input("pitch_end", default=0.0, **angle, tooltip="Pitch of the last frame of a sweep"),
                io.Float.Input("roll_end", default=0.0, **angle, tooltip="Roll of the last frame of a sweep"),
            ],
            outputs=[FaceLandmarksType.Output(display_name="landmarks"),
                     io.String.Output(display_name="report", tooltip="Rows with points outside the frame (they are clipped when drawn)")],
        )

    @classmethod
    def execute(cls, landmarks, yaw, pitch, roll, scale, shift_x, shift_y, frames, yaw_end, pitch_end, roll_end):
        check_numbers(cls, yaw=yaw, pitch=pitch, roll=roll, scale=scale, shift_x=shift_x, shift_y=shift_y, frames=frames,
                      yaw_end=yaw_end, pitch_end=pitch_end, roll_end=roll_end)
        landmarks = as_landmarks(landmarks)
        start = (yaw, pitch, roll)
        if frames == 1:
            frames, end = len(landmarks), start
        else:
            end = (yaw_end, pitch_end, roll_end)
        posed = pose_sweep(landmarks, frames, start, end, scale, shift_x, shift_y)
        if any(posed.outside):
            log.warning("Landmark Pose Editor: %s", posed.report())
        return io.NodeOutput(posed.landmarks, posed.report())


NODES = [LoadFaceCrafter, ApplyFaceCrafter, FaceCrafterGuider, LandmarkPoseEditor]
