"""clt-explorer: Cross-Layer Transcoders on CLIP vision transformers."""

from .clt import CLTConfig, CrossLayerTranscoder

__all__ = ["CLTConfig", "CrossLayerTranscoder"]
__version__ = "0.1.0"
