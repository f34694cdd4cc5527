"""What pulling and publishing share: token scrubbing and one-line Hub errors.

The token is only ever handed to huggingface_hub (which puts it in the ``Authorization``
header). Every message we build passes through :func:`scrub`, so an error never echoes it.
"""

from __future__ import annotations

import os
import re

from ..errors import SelfconsistError

_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{16,}")


def _known_tokens() -> list[str]:
    """Token values that may be in use (environment and huggingface_hub's stored login)."""
    values = [os.environ.get(k) for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import get_token

        values.append(get_token())
    except Exception:  # noqa: BLE001 - a broken login must not break error reporting
        pass
    return [v for v in values if v and len(v) >= 8]


def scrub(text: str) -> str:
    """``text`` with every known token value and anything shaped like an HF token masked."""
    for tok in _known_tokens():
        text = text.replace(tok, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def _network_error() -> type[Exception]:
    """The base class of connection failures (refused, reset, timed out) under huggingface_hub's
    HTTP client; they must end as one line, like any other Hub failure."""
    import httpx2

    return httpx2.TransportError


def _hub_error(action: str, err: BaseException) -> SelfconsistError:
    """A one-line, token-free SelfconsistError for a huggingface_hub failure."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, GatedRepoError):
        hint = "the repo is gated: accept its terms on the Hub and set HF_TOKEN"
    elif isinstance(err, RepositoryNotFoundError):
        hint = "no such repo, or it is private: check the id and set HF_TOKEN (or run `hf auth login`)"
    elif isinstance(err, RevisionNotFoundError):
        hint = "no such revision: check --revision"
    elif isinstance(err, HfHubHTTPError) and err.response is not None and \
            err.response.status_code in (401, 403):
        hint = "not allowed: set HF_TOKEN to a token with write access (or run `hf auth login`)"
    else:
        hint = first
    return SelfconsistError(scrub(f"{action}: {hint}"))
