"""Trainable adapter modules and their maths: pure torch, no ComfyUI.

One implementation serves every host: ComfyUI's attention patches (``nodes/``) and the
diffusers attention processors (``adapters/diffusers_host.py``) both call into here, row layout
included (``adapters/rows.py``: which rows of a guided batch get which tokens, reference and scale).
"""
