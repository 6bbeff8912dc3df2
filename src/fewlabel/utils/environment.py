"""The software a run was made with, recorded beside its results.

Two runs with the same config and seed give the same numbers only under the same library
versions (a new PyTorch may pick other CPU kernels, bfloat16 ones especially), so every run
folder and checkpoint says which versions made it. MONAI's ``print_config`` helpers supply
the versions of MONAI and its companions; the imaging readers and scikit-learn, which MONAI
does not list, come from the installed package metadata.
"""

from __future__ import annotations

import contextlib
import platform
from importlib import metadata

import torch

from fewlabel import __version__

#: Distributions MONAI's config report leaves out, by their PyPI names.
_EXTRA_DISTRIBUTIONS = ("SimpleITK", "pydicom", "scikit-learn", "safetensors")


def software_versions() -> dict[str, str]:
    """Versions of Python, fewlabel and the libraries that shape its numbers.

    Returns:
        A flat ``{name: version}`` dict of strings (JSON- and ``weights_only``-safe). Optional
        libraries that are not installed are left out. ``cpu`` is the processor model,
        ``cpu_capability`` the instruction set PyTorch's CPU kernels use, ``cuda`` is the CUDA version PyTorch was
        built for (``none`` for a CPU build), and ``gpus`` the devices visible now (absent
        without CUDA).
    """
    from monai.config.deviceconfig import get_config_values, get_optional_config_values

    versions = {"python": platform.python_version(), "platform": platform.platform(), "fewlabel": __version__}
    for name, version in {**get_config_values(), **get_optional_config_values()}.items():
        if "NOT INSTALLED" not in str(version):
            versions[name] = str(version)
    for name in _EXTRA_DISTRIBUTIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    versions["cpu"] = _cpu_name()
    # The vector instruction set PyTorch dispatches its CPU kernels to (AVX2, AVX512...).
    versions["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    versions["cuda"] = torch.version.cuda or "none"
    if torch.cuda.is_available():
        versions["gpus"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return versions


def _cpu_name() -> str:
    """The processor model (``/proc/cpuinfo`` on Linux, where ``platform`` often says nothing)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
