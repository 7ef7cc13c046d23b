"""perft: Parameter-Efficient Routed Fine-Tuning (PERFT) for Mixture-of-Experts language models."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes warns on import, on CPUs with AVX512-BF16, that an optional hub kernel ("kernels" package) is missing;
# perft does not use that kernel (platform.md), so the line is only noise in every command's output.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)


def dist_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
