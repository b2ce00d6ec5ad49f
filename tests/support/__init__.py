"""What the tests share: stand-in models written in the official formats, real pictures and models that ship in
packages, the two hosts side by side, ComfyUI servers and browsers, headless workflow runs."""
