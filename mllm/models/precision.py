"""Precision of fine-tuning and scoring: `model.precision` (auto, fp32, bf16) resolved against what the device has.

bf16 is autocast only: weights, gradients, AdamW state and every checkpoint stay float32; matrix multiplies run in
bf16 (torch.autocast), and the loss is taken on float32 logits. A device without bf16 is refused in one line before
any run opens. The resolved precision (fp32 or bf16, never auto) is part of every reuse key (member, evaluation,
frozen-prefix caches): a bf16 member is not an fp32 member.

Who has bf16: a CUDA GPU when torch says so (Ampere and later); a CPU when /proc/cpuinfo lists `avx512_bf16` or
`amx_bf16` (Cooper Lake, Sapphire Rapids and later Xeons, AMD Zen 4 and later). Elsewhere (other CPUs, macOS,
Windows) fp32 only: torch would emulate bf16 there, slower than fp32.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

from mllm.config.schema import ModelConfig
from mllm.errors import ModelError

Precision = Literal["fp32", "bf16"]
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # either one runs bf16 matrix multiplies natively
CPUINFO = Path("/proc/cpuinfo")

# Whether model.precision=auto takes bf16 on a CPU that has it (on a GPU with bf16 it always does). Measured on this
# project's 2-core AMD EPYC with avx512_bf16 (issue 27), on an idle machine: see AUTO_BF16_ON_CPU_EVIDENCE.
AUTO_BF16_ON_CPU = True
AUTO_BF16_ON_CPU_EVIDENCE = (
    "Speed: scripts/bench_finetune.py trained at 1.69x fp32's samples/s in bf16; scripts/bench_search.py scored a "
    "search trial of trained members in 0.65x fp32's time; scripts/precision_check.py scored the main job's members "
    "and merges 1.86x faster. Quality: configs/default.yaml's members, best validation macro-F1 (NLL), fp32 / bf16: "
    "seed-0 0.5354 (0.722) / 0.5388 (0.725), seed-1 0.5327 (0.768) / 0.5327 (0.771), seed-2 0.5646 (0.680) / "
    "0.5600 (0.679); the same fp32 members scored in bf16 changed macro-F1 by at most 0.0046 (1 of 147 "
    "predictions). An earlier 0.70x for bf16 training was measured beside another job and is withdrawn")


@functools.cache
def cpu_bf16() -> str | None:
    """The CPU's bf16 flag (amx_bf16 or avx512_bf16), or None: no such flag, or no /proc/cpuinfo (not Linux)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return next((f for f in CPU_BF16_FLAGS if f in flags), None)


def cuda_bf16() -> bool:
    """Whether the current CUDA GPU runs bf16 natively (torch's own test; False on pre-Ampere GPUs)."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def pick_device(cfg: ModelConfig) -> Any:
    """The torch.device model.device names (auto: CUDA when available)."""
    import torch

    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ModelError("model.device=cuda but no CUDA GPU is visible", "set model.device=auto or cpu")
    return torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu")


def resolve_precision(cfg: ModelConfig, device: Any = None) -> Precision:
    """fp32 or bf16 for model.precision on `device` (default: the one model.device picks). auto: bf16 where the
    device has it (a CPU only when AUTO_BF16_ON_CPU), else fp32; bf16 on a device without it is refused."""
    device = device if device is not None else pick_device(cfg)
    has_bf16 = cuda_bf16() if device.type == "cuda" else cpu_bf16() is not None
    if cfg.precision == "fp32":
        return "fp32"
    if cfg.precision == "bf16":
        if not has_bf16:
            what = ("this GPU has no bf16 support (torch.cuda.is_bf16_supported() is False)" if device.type == "cuda"
                    else "this CPU has no bf16 support (no avx512_bf16 or AMX flag)")
            raise ModelError(f"model.precision=bf16: {what}", "use model.precision=fp32 (it has fp32)")
        return "bf16"
    return "bf16" if has_bf16 and (device.type == "cuda" or AUTO_BF16_ON_CPU) else "fp32"


def autocast_dtype(precision: Precision) -> Any:
    """The dtype torch.autocast runs in for `precision`, or None (fp32: autocast off)."""
    import torch

    return torch.bfloat16 if precision == "bf16" else None


def resolve_device(cfg: ModelConfig) -> tuple[Any, Any]:
    """(torch.device, autocast dtype or None) from model.device and model.precision."""
    device = pick_device(cfg)
    return device, autocast_dtype(resolve_precision(cfg, device))


def bench_precisions(asked: str, device: Any = None) -> tuple[list[Precision], str | None]:
    """The precisions a benchmark runs (`asked`: both, fp32 or bf16) on this device, and why bf16 is left out (None:
    it is not). bf16 asked for where the device lacks it is refused with the one-line reason."""
    try:
        resolve_precision(ModelConfig(precision="bf16"), device)
    except ModelError as e:
        if asked == "bf16":
            raise ModelError(f"--precision bf16: {e.what}", e.fix) from None
        return ["fp32"], e.what
    return {"both": ["fp32", "bf16"], "fp32": ["fp32"], "bf16": ["bf16"]}[asked], None  # type: ignore[return-value]
