"""The token sets of a ViT sequence: the CLS token (position 0), the patch tokens, or all of them.

Every module that names a token set uses these constants: replacement, evaluation, contributions,
retrieval descriptors and the app.
"""

from __future__ import annotations

CLS, PATCHES, ALL = "cls", "patches", "all"
TOKEN_SETS = (CLS, PATCHES, ALL)
TOKEN_GROUPS = (CLS, PATCHES)  # the two disjoint groups (contribution heatmaps, retrieval descriptors)


def token_index(tokens: str) -> slice:
    """Positions of a token set in a ViT sequence: the CLS token is position 0."""
    if tokens == CLS:
        return slice(0, 1)
    if tokens == PATCHES:
        return slice(1, None)
    if tokens == ALL:
        return slice(None)
    raise ValueError(f"token set must be one of {TOKEN_SETS}, got {tokens!r}")


def other_tokens(tokens: str) -> str | None:
    """The token set of the positions that ``tokens`` leaves out (None for all tokens)."""
    token_index(tokens)  # checks the name
    return {CLS: PATCHES, PATCHES: CLS}.get(tokens)

