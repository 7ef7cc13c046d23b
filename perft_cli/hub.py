"""One quick look at whether the Hugging Face hub can be reached, before anything is loaded from it by id.

transformers and datasets retry every file request of an unreachable hub for 25-30 s (five backoffs, a log line
each) before they fall back to the cache or fail. ``probe`` makes one request without retries first: when the
network itself fails (no DNS, no route, timeout), this process switches huggingface_hub and datasets to offline
mode, as ``HF_HUB_OFFLINE=1`` would, so cached files load at once and a missing one fails in one line. An HTTP
answer (404, 401 for a gated repository, ...) means the hub is there: nothing changes and the library reports it.
"""

from __future__ import annotations

import contextlib
from typing import Any

PROBE_TIMEOUT_S = 10.0  # the one request before models, training sets and test sets are read from the hub
_unreachable: dict[tuple[str, str], str | None] = {}  # (repo type, id) -> why the hub could not be reached


def probe(repo_id: str, repo_type: str = "model", revision: str | None = None) -> str | None:
    """Why the hub cannot be reached for ``repo_id`` (one request, once a process), or None if it can.

    Returns the remembered reason without a request once offline mode is on (set by the user or by a probe).
    """
    from huggingface_hub import constants

    key = (repo_type, repo_id)
    if key in _unreachable or constants.is_offline_mode():
        return _unreachable.get(key)
    # An HTTP answer (404, 401 for a gated repository) means the hub is there: the library reports it later.
    with contextlib.suppress(Exception):
        repo_info(repo_id, repo_type, revision)
    return _unreachable.get(key)


def repo_info(repo_id: str, repo_type: str = "model", revision: str | None = None) -> Any:
    """The hub's info on a repository (its ``sha`` is the commit), in one request without retries.

    When the network itself fails (no DNS, no route, timeout), the reason is remembered for ``unreachable`` and this
    process goes offline (``go_offline``) before the error is raised again.
    """
    from huggingface_hub import HfApi

    key = (repo_type, repo_id)
    _unreachable[key] = None
    api = HfApi()
    info = api.dataset_info if repo_type == "dataset" else api.model_info
    try:
        return info(repo_id, revision=revision, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # httpx's transport errors, or OSError, when the network fails
        kinds = {c.__name__ for c in type(e).__mro__}
        if kinds & {"TransportError", "TimeoutException", "ConnectionError"}:
            _unreachable[key] = f"{type(e).__name__}: {' '.join(str(e).split()) or type(e).__name__}"
            go_offline()
        raise


def unreachable(repo_id: str, repo_type: str = "model") -> str | None:
    """The reason a probe of ``repo_id`` found the hub unreachable, or None (no probe, or it answered)."""
    return _unreachable.get((repo_type, repo_id))


def go_offline() -> None:
    """huggingface_hub (and through it transformers) and datasets read the cache only, from now on."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # what huggingface_hub.is_offline_mode() returns, read at every request
    try:
        import datasets.config
    except ImportError:
        return
    datasets.config.HF_HUB_OFFLINE = True
