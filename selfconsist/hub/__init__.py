"""Hugging Face Hub integration, in two halves.

* :mod:`selfconsist.hub.pull`: resolve ``owner/name[:subfolder]`` (``revision`` picks a
  branch, tag or commit) to local files through huggingface_hub's cache;
* :mod:`selfconsist.hub.publish`: bundle a tuned model with its eval run and card, and upload it.

Secrets: the token is only ever handed to huggingface_hub; every message we build passes
through :func:`scrub`, so an error never echoes it.
"""

from __future__ import annotations

from .common import scrub
from .publish import (
    Bundle,
    PushResult,
    find_bundle,
    plan_upload,
    push,
    push_after_tune,
    push_bundle,
    read_model_metadata,
    write_plan,
)
from .pull import (
    RepoRef,
    Resolved,
    attach_source,
    check_repo_id,
    default_subfolder,
    is_repo_ref,
    parse_repo_ref,
    read_front_matter,
    resolve,
    resolve_model,
    select_files,
    source_info,
)

__all__ = [
    "Bundle",
    "PushResult",
    "RepoRef",
    "Resolved",
    "attach_source",
    "check_repo_id",
    "default_subfolder",
    "find_bundle",
    "is_repo_ref",
    "parse_repo_ref",
    "plan_upload",
    "push",
    "push_after_tune",
    "push_bundle",
    "read_front_matter",
    "read_model_metadata",
    "resolve",
    "resolve_model",
    "scrub",
    "select_files",
    "source_info",
    "write_plan",
]
