"""The data system's key rule, shared by every plane that stores objects (weights, KV blocks)."""

from __future__ import annotations

import re

# REFERENCE.md: no '.' and no '/', at most 255 characters.
_KEY_RULE = re.compile(r"^[a-zA-Z0-9\-_!@#%\^\*\(\)\+\=\:;]{1,255}$")
#: Every key the App writes starts with this, so its objects are recognisable in a shared data system.
KEY_PREFIX = "yrllm"


def check_key(key: str) -> str:
    if not _KEY_RULE.match(key):
        raise ValueError(f"invalid data system key {key!r}: at most 255 characters of "
                         "letters, digits and -_!@#%^*()+=:; (no '.' or '/')")
    return key
