"""Watching random initialisation: loaders build modules as shapes only (on the meta device) and take every
weight from the file, so the random init they used to compute and throw away runs on no real tensor."""

from __future__ import annotations

import torch


def init_devices(monkeypatch) -> list[str]:
    """The device type of every tensor ``kaiming_uniform_`` (nn.Linear's and nn.Conv2d's random init) is called on
    from now on in the test."""
    seen, original = [], torch.nn.init.kaiming_uniform_

    def recorded(tensor, *args, **kwargs):
        seen.append(tensor.device.type)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", recorded)
    return seen
