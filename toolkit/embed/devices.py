"""The one device resolver every stage uses (embed, evaluate, improve).

`resolve_device("auto" | "cpu" | "cuda" | "cuda:N" | "mps")` returns the torch device string to
run on, or raises a `UserError` that says what to pass instead: for a device that is not available
on this machine (``cuda`` without CUDA, ``cuda:3`` with two GPUs, ``mps`` off a Mac) and for a
value that is not a device at all (``tpu``).

``auto`` picks cuda, then mps (only where the stage allows it: retrieval ranks use
``auto_mps=False`` and run on the CPU on a Mac, as they always did), then cpu.
"""

from __future__ import annotations

import re

from toolkit.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(device=None, *, auto_mps: bool = True) -> str:
    """The device to run on, as a string torch accepts ('cpu', 'cuda', 'cuda:1', 'mps')."""
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    text = str(device if device is not None else "auto").strip().lower() or "auto"
    if text == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if auto_mps and mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if text == "cpu":
        return "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m:
        if not torch.cuda.is_available():
            raise UserError(f"--device {text} was asked for, but CUDA is not available here. Use --device auto or cpu.")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise UserError(
                f"--device {text} was asked for, but this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})."
            )
        return text
    if text == "mps":
        mps = getattr(torch.backends, "mps", None)
        if not (mps is not None and mps.is_available()):
            raise UserError("--device mps was asked for, but MPS is not available here. Use --device auto or cpu.")
        return "mps"
    raise UserError(f"Unknown --device {device!r}: use {DEVICE_CHOICES}.")
