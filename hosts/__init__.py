"""Where the adapters' maths (``adapters/``) runs: ComfyUI's models (``hosts/comfyui``) and diffusers' UNet."""
