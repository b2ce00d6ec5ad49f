"""Nodes for the Arc2Face Expression Adapter: load it, build a FLAME expression, patch a model."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..adapters.checkpoints import EXPRESSION_ADAPTER_FILE, adapter_file_kind
from ..adapters.expression_adapter import ExpressionAdapter
from ..encoders.expression_edit import edit_flame
from ..encoders.expressions import FlameExpression
from ..hosts.comfyui.cross_attention import apply_cross_attention_branch
from .model_folders import model_choices, model_file
from .types import ExpressionAdapterType, FlameExpressionType
from .validation import check_choices, check_numbers

CATEGORY = "expression_adapters"
EXPRESSION_ADAPTER_NAME = "exp_adapter.bin"
EXPRESSION_ADAPTER_SOURCE = "hub repo FoivosPar/Arc2Face, file exp_adapter/exp_adapter.bin (https://huggingface.co/FoivosPar/Arc2Face)"


class LoadExpressionAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersLoadExpressionAdapter",
            display_name="Load Expression Adapter",
            category=f"{CATEGORY}/loaders",
            description="Loads an Arc2Face Expression Adapter (exp_adapter.bin as published, or our .safetensors) "
                        "from ComfyUI/models/expression_adapters.",
            inputs=[io.Combo.Input("adapter_name", tooltip="Expression Adapter file in ComfyUI/models/expression_adapters "
                                                           "(exp_adapter.bin as published); Reference Adapter files are not listed",
                                   options=model_choices("expression_adapters", EXPRESSION_ADAPTER_NAME,
                                                         lambda path: adapter_file_kind(path) == EXPRESSION_ADAPTER_FILE))],
            outputs=[ExpressionAdapterType.Output(display_name="expression_adapter")],
        )

    @classmethod
    def execute(cls, adapter_name):
        check_choices(cls, {"adapter_name": "expression_adapters"}, adapter_name=adapter_name)
        path = model_file("expression_adapters", adapter_name, EXPRESSION_ADAPTER_SOURCE)
        return io.NodeOutput(ExpressionAdapter.from_file(path).eval())


class FlameExpressionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersFlameExpression",
            display_name="FLAME Expression",
            category=f"{CATEGORY}/expression",
            description="Builds FLAME blendshape parameters (50 expression, 2 eyelid, 3 jaw) from a JSON list "
                        "and/or the controls below, which are added on top of the JSON values.",
            inputs=[
                io.String.Input("json_values", multiline=True, default="",
                                tooltip="Empty for neutral, a list of 55 numbers, or a list of such lists (one per image)"),
                io.Float.Input("jaw_open", default=0.0, min=0.0, max=0.5, step=0.01, tooltip="FLAME jaw pose, parameter 52"),
                io.Float.Input("eyelid_left", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Eyelid closure, parameter 50"),
                io.Float.Input("eyelid_right", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Eyelid closure, parameter 51"),
                *[io.Float.Input(f"expression_{i}", default=0.0, min=-3.0, max=3.0, step=0.05,
                                 tooltip=f"FLAME expression component {i} (the leading components move the most)")
                  for i in range(1, 6)],
            ],
            outputs=[FlameExpressionType.Output(display_name="expression")],
        )

    @classmethod
    def execute(cls, json_values, **controls):
        check_numbers(cls, **controls)
        base = FlameExpression.from_json(json_values) if json_values.strip() else None
        return io.NodeOutput(edit_flame(base, "offset", controls))


class ApplyExpressionAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExpressionAdaptersApplyExpressionAdapter",
            display_name="Apply Expression Adapter",
            category=f"{CATEGORY}/apply",
            description="Adds the expression branch to every cross-attention layer of an Arc2Face (SD1.5) model. "
                        "Stacks with IPAdapter, InstantID and other expression branches.",
            inputs=[
                io.Model.Input("model", tooltip="The Arc2Face UNet (Load Diffusion Model), possibly already patched"),
                ExpressionAdapterType.Input("expression_adapter", tooltip="From Load Expression Adapter"),
                FlameExpressionType.Input("expression", tooltip="One row for the whole batch, or one row per image"),
                io.Float.Input("strength", default=ExpressionAdapter.default_scale, min=0.0, max=3.0, step=0.05,
                               tooltip="Weight of the expression branch: 0 off, 1 as trained (default); above about "
                                       "1.5 the expression overrides the identity"),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Fraction of sampling where the branch starts"),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Fraction of sampling where the branch stops"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, expression_adapter, expression, strength, start_at, end_at):
        check_numbers(cls, strength=strength, start_at=start_at, end_at=end_at)
        with torch.no_grad():
            cond_tokens = expression_adapter.expression_tokens(expression.values)
            uncond_tokens = expression_adapter.unconditional_tokens()
        patched = apply_cross_attention_branch(model, expression_adapter, cond_tokens, uncond_tokens, strength, start_at, end_at)
        return io.NodeOutput(patched)


NODES = [LoadExpressionAdapter, FlameExpressionNode, ApplyExpressionAdapter]
