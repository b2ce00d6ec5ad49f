"""The ComfyUI host: attention replaces on ComfyUI's SD1.5/SDXL UNets that add our branches, stack with other
packs' replaces (``stacking``), cache per sampling run and gate by sigma; LoRAs through ComfyUI's weight
patching; helper models under ComfyUI's memory management. Node classes (``nodes/``) call these."""
