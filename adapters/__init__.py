"""Trainable adapter modules and their maths: pure torch, no ComfyUI.

One implementation serves every host: ComfyUI's attention patches (``hosts/comfyui``) and the
diffusers attention processors (``hosts/diffusers.py``) both call into here, row layout
included (``adapters/rows.py``: which rows of a guided batch get which tokens, reference and scale).
"""
