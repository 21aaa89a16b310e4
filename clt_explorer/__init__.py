"""clt-explorer: Cross-Layer Transcoders on CLIP vision transformers.

The package mirrors the data path, each subpackage importing only the ones listed before it:
``storage``, ``cli`` and ``data`` (ground floor); ``model`` (teacher, sparsifiers, CLT, surrogate,
zero-shot); ``evaluation.metrics``; ``training``; ``evaluation``; ``retrieval``; ``assets`` (bundle,
pipeline, hub); ``app`` (analysis, feature drill-down, uploads, UI).
"""

from .model.clt import CLTConfig, CrossLayerTranscoder
from .model.teacher import Teacher

__all__ = ["CLTConfig", "CrossLayerTranscoder", "Teacher"]
__version__ = "0.1.0"
