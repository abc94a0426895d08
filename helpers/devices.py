"""Which device a command runs on, and which mixed precision that device gets.

``resolve_device(name)`` turns the ``--device`` option into a ``torch.device``
(default: the first CUDA GPU when there is one, else the CPU) and refuses, with
a one-line ``UserError``, a name torch does not know or a GPU that is not there.

``amp_dtype(device)`` is the autocast dtype of a CUDA device: bf16 only where the
GPU computes it natively (compute capability 8.0 and up: A100, L4, H100, RTX 30xx),
fp16 otherwise (a T4 is 7.5: ``torch.cuda.is_bf16_supported()`` answers True there
because it counts emulation, but cuDNN has no bf16 convolutions on it). fp16 needs a
GradScaler; bf16 has fp32's exponent range and does not.
"""

from __future__ import annotations

import torch

from .errors import UserError

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first GPUs with native bf16 tensor cores


def default_device() -> torch.device:
    """CUDA when a GPU is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``--device`` value (``cpu``, ``cuda``, ``cuda:1``, ``mps``; None: the default) -> a usable device."""
    if name is None or (isinstance(name, str) and not name.strip()):
        return default_device()
    if isinstance(name, torch.device):
        device = name
    else:
        try:
            device = torch.device(name.strip())
        except RuntimeError:
            raise UserError(f"unknown device {name!r}: use cpu, cuda, cuda:N (a GPU's index) or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {name} asks for a GPU, but PyTorch sees none on this machine: use --device cpu "
                "(on Colab: Runtime > Change runtime type > GPU)"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"--device {name}: Apple's MPS backend is not available here; use --device cpu")
    elif device.type != "cpu":
        raise UserError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or mps")
    return device


def amp_dtype(device: torch.device | str) -> torch.dtype:
    """The autocast dtype for mixed precision on CUDA ``device``: bf16 where native, else fp16."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if tuple(torch.cuda.get_device_capability(index)) >= BF16_MIN_CAPABILITY:
        return torch.bfloat16
    return torch.float16


def precision_line(device: torch.device, dtype: torch.dtype | None) -> str:
    """One line saying which precision a run uses, e.g. 'precision: mixed fp16 + GradScaler (Tesla T4, 7.5)'."""
    if dtype is None:
        return f"precision: fp32 on {device.type}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    card = f"{torch.cuda.get_device_name(index)}, compute capability {major}.{minor}"
    if dtype == torch.bfloat16:
        return f"precision: mixed bf16 ({card})"
    return f"precision: mixed fp16 with a GradScaler ({card}: no native bf16)"
