"""The old name of :mod:`~selfconsist.adapters.ldm_convert`, kept so existing imports work.

Key conversion now lives in :mod:`~selfconsist.adapters.ldm_convert` and config inference in
:mod:`~selfconsist.adapters.diffusers_config`; nothing in selfconsist imports this module.
"""

from __future__ import annotations

from .diffusers_config import KNOWN_VAES, KnownVAE, infer_config, known_vae, match_known
from .ldm_convert import (
    KNOWN_PREFIXES,
    detect_layout,
    diffusers_key_alias,
    diffusers_to_ldm_key,
    file_to_model_keys,
    find_prefix,
    ldm_state_dict,
    ldm_to_diffusers_key,
    num_blocks,
    to_file_layout,
    to_model_shape,
)

__all__ = [
    "KNOWN_PREFIXES", "KNOWN_VAES", "KnownVAE", "detect_layout", "diffusers_key_alias",
    "diffusers_to_ldm_key", "file_to_model_keys", "find_prefix", "infer_config", "known_vae",
    "ldm_state_dict", "ldm_to_diffusers_key", "match_known", "num_blocks", "to_file_layout",
    "to_model_shape",
]
