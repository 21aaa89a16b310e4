"""The Cross-Layer Transcoder: per-layer sparse encoders and triangular cross-layer decoders.

    pre_l  = (x_l * input_scale_l) @ W_enc[l] + b_enc[l]          z_l = sparsify(pre_l)
    yhat_l = b_dec[l] + sum_{s <= l} z_s @ W_dec[s -> l]

The decoders of one source layer s are stored together as ``W_dec[s]`` of shape [F, L - s, d]
(targets s..L-1), so a source's contribution to every target is one matmul (dense path) or one
gather of the k active rows (sparse path: ``F.embedding_bag`` on a CPU, Triton kernels on a GPU); both give the
same yhat.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..storage import (
    AssetError,
    check_keys,
    download_snapshot,
    is_repo_id,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from . import huge_pages
from .sparsifiers import SparseCodes, Sparsifier, paired_codes, sparsifier_class
from .surrogate import CLTSurrogate

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LEGACY_TENSOR_NAMES = {"log_threshold": "sparsifier.log_threshold"}  # files of the first release


@dataclass(frozen=True)
class CLTConfig:
    """Shape and sparsifier of a CLT (the file format of ``config.json``)."""

    n_layers: int
    """Residual blocks of the teacher, L."""
    d_model: int
    """Width of the teacher's residual stream, d."""
    expansion: int = 16
    """Features per layer F = expansion x d."""
    sparsifier: str = "relu_topk"
    """Name of the sparsifier kind (see ``sparsifiers.SPARSIFIERS``)."""
    k: int = 128
    """Active features per token (TopK kinds) or the target mean L0 (JumpReLU)."""
    jumprelu_bandwidth: float = 0.1
    """Width of JumpReLU's straight-through rectangle kernel."""
    teacher: str = ""
    """The teacher it was trained on (``Teacher.identity``); empty when unknown."""

    def __post_init__(self):
        sparsifier_class(self.sparsifier)
        if min(self.n_layers, self.d_model, self.expansion, self.k) < 1:
            raise ValueError(f"n_layers, d_model, expansion and k must be positive: {self}")
        if self.k > self.n_features:
            raise ValueError(f"k = {self.k} exceeds the {self.n_features} features per layer")
        if self.jumprelu_bandwidth <= 0:
            raise ValueError("jumprelu_bandwidth must be positive")

    @property
    def n_features(self) -> int:
        return self.expansion * self.d_model

    @property
    def n_parameters(self) -> int:
        """Learned parameters (counted on the meta device: nothing is allocated)."""
        with torch.device("meta"):
            return sum(p.numel() for p in CrossLayerTranscoder(self).parameters())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "CLTConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        check_keys(data, {"n_layers", "d_model", "sparsifier"}, fields, where)
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise AssetError(f"{where}: {error}") from error


class CrossLayerTranscoder(nn.Module):
    """A CLT over L layers of width d with F = expansion * d features per layer."""

    def __init__(self, config: CLTConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        L, d, n = config.n_layers, config.d_model, config.n_features
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(L, d, n, **kw))
        self.b_enc = nn.Parameter(torch.empty(L, n, **kw))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.empty(n, L - s, d, **kw)) for s in range(L)])
        self.b_dec = nn.Parameter(torch.empty(L, d, **kw))
        self.sparsifier: Sparsifier = sparsifier_class(config.sparsifier).from_config(config, device)
        self.register_buffer("input_scale", torch.empty(L, device=device, dtype=torch.float32))
        if self.W_enc.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """In-place initialisation (no temporary copies: a ViT-B-scale CLT needs only its own size)."""
        L, d, n = self.config.n_layers, self.config.d_model, self.config.n_features
        self.W_enc.uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d))
        bound = 1 / math.sqrt(L * n)
        for W in self.W_dec:
            W.uniform_(-bound, bound)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.input_scale.fill_(1.0)
        self.sparsifier.reset_parameters()

    # ---- encoding -------------------------------------------------------------------------

    def preactivations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """pre_l = (x_l * input_scale_l) @ W_enc[l] + b_enc[l], for x of shape [..., d]: one fused product (in bfloat16
        on a CPU, a separate bias add took a quarter of the encode's time)."""
        x = (x * self.input_scale[layer]).to(self.W_enc.dtype)
        pre = torch.addmm(self.b_enc[layer], x.reshape(-1, x.shape[-1]), self.W_enc[layer])
        return pre.view(*x.shape[:-1], pre.shape[-1])

    def encode_layer(self, layer: int, x: torch.Tensor) -> SparseCodes:
        return self.sparsifier(layer, self.preactivations(layer, x))

    def encode_sparse(self, xs: torch.Tensor) -> list[SparseCodes]:
        """Codes of every layer for xs [L, ..., d]."""
        self._check_layers(xs, "xs")
        return [self.encode_layer(layer, xs[layer]) for layer in range(self.config.n_layers)]

    def encode(self, xs: torch.Tensor) -> torch.Tensor:
        """Dense codes [L, ..., F] (zeros where inactive) for xs [L, ..., d]."""
        return torch.stack([codes.dense() for codes in self.encode_sparse(xs)])

    # ---- decoding -------------------------------------------------------------------------

    def decode_source(self, source: int, codes: SparseCodes, sparse: bool | None = None) -> torch.Tensor:
        """What source layer s writes to every target l >= s: [..., L - s, d] (no bias)."""
        weight = self.W_dec[source]
        out = _apply_decoder(weight.view(weight.shape[0], -1), codes, sparse)
        return out.view(*out.shape[:-1], weight.shape[1], weight.shape[2])

    def decode_source_pair(self, source: int, first: SparseCodes, second: SparseCodes, sparse: bool | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode_source` of two sets of codes of the same tokens (a replaced pass's and the teacher's), in one
        gather whose bags alternate between the sets token by token: a decoder row that both use at a token is
        read from memory once and then from the cache. On a CPU the decode is bound by reading W_dec."""
        both = paired_codes(first, second)
        if both is None:
            return self.decode_source(source, first, sparse), self.decode_source(source, second, sparse)
        terms = self.decode_source(source, both, sparse)  # [..., T, 2, L - s, d]
        return terms.select(-3, 0), terms.select(-3, 1)

    def decode(self, codes: torch.Tensor | list[SparseCodes], sparse: bool | None = None) -> torch.Tensor:
        """yhat [L, ..., d] from dense codes [L, ..., F] or a list of per-layer SparseCodes."""
        return self.sum_terms(self.source_terms(self._as_sparse(codes), sparse))

    def source_terms(self, codes: list[SparseCodes], sparse: bool | None = None) -> Iterator[torch.Tensor]:
        """The terms of every source s in order, each [..., L - s, d] (:meth:`decode_source`), decoded one source at a
        time as they are read."""
        return (self.decode_source(source, c, sparse) for source, c in enumerate(codes))

    def sum_terms(self, terms: Iterable[torch.Tensor]) -> torch.Tensor:
        """yhat [L, ..., d]: b_dec plus the terms of every source, given in source order (a list, or a generator that
        decodes one source at a time)."""
        L = self.config.n_layers
        yhat = None
        for source, part in enumerate(terms):
            part = part.movedim(-2, 0)  # [L - s, ..., d]
            if yhat is None:  # source 0 writes to all L targets
                yhat = torch.zeros_like(part)
            yhat[source:] += part
        return yhat + self.b_dec.view(L, *([1] * (yhat.dim() - 2)), -1).to(yhat.dtype)

    def contribution_norms(self, codes: torch.Tensor | list[SparseCodes], sparse: bool | None = None,
                           per_image: bool = False) -> torch.Tensor:
        """N[l, s] = sum over tokens of ||z_s(t) @ W_dec[s -> l]||_2 (zero above the diagonal): [L, L], or with
        ``per_image`` one matrix per image [B, L, L] (codes [B, T, ...] per layer)."""
        return self.term_norms(self.source_terms(self._as_sparse(codes), sparse), per_image=per_image)

    def term_norms(self, terms: Iterable[torch.Tensor], tokens: slice | torch.Tensor = slice(None),
                   per_image: bool = False) -> torch.Tensor:
        """:meth:`contribution_norms` from the terms of every source in source order, each [B, T, L - s, d] (or
        without the token axis [N, L - s, d] when ``tokens`` is all of them), over the tokens ``tokens``."""
        L = self.config.n_layers
        norms = None
        for source, part in enumerate(terms):
            part = part[:, tokens].float().norm(dim=-1)  # [B, T', L - s]
            if norms is None:
                norms = torch.zeros(*(part.shape[:1] if per_image else ()), L, L, dtype=torch.float64,
                                    device=part.device)
            if per_image:
                norms[:, source:, source] = part.reshape(part.shape[0], -1, L - source).sum(1).double()
            else:
                norms[source:, source] = part.reshape(-1, L - source).sum(0).double()
        return norms

    def contributions(self, codes: torch.Tensor | list[SparseCodes], sparse: bool | None = None,
                      per_image: bool = False) -> torch.Tensor:
        """C[l, s] = E_t ||u_{s->l}(t)|| / sum_{s' <= l} E_t ||u_{s'->l}(t)||: rows sum to 1 ([L, L], or
        [B, L, L] with ``per_image``)."""
        return normalize_contributions(self.contribution_norms(codes, sparse, per_image))

    def forward(self, xs: torch.Tensor, sparse: bool | None = None) -> "CLTOutput":
        """Training pass with teacher forcing: every layer's codes come from the given xs [L, N, d] (in the form a
        decoder that gathers needs, where it gathers)."""
        self._check_layers(xs, "xs")
        pre = [self.preactivations(layer, xs[layer]) for layer in range(self.config.n_layers)]
        gathers = _gathers_by_default(self.W_enc.device) if sparse is None else sparse
        sparsify = self.sparsifier.codes_to_gather if gathers else self.sparsifier
        codes = [sparsify(layer, p) for layer, p in enumerate(pre)]
        return CLTOutput(self.decode(codes, sparse), codes, pre)

    def decode_diagonal(self, layer: int, codes: SparseCodes, sparse: bool | None = None) -> torch.Tensor:
        """z_l @ W_dec[l -> l] (no bias): what a layer's codes write to their own layer."""
        return _apply_decoder(self.W_dec[layer][:, 0, :], codes, sparse)

    def surrogate(self, sparse: bool | None = None, term_weights: torch.Tensor | None = None,
                  feature_scales: dict[tuple[int, int], float] | None = None,
                  error_term: bool = False, teacher_xs: torch.Tensor | None = None,
                  decode_teacher: bool = False) -> CLTSurrogate:
        """This CLT as the MLP replacement of :meth:`Teacher.replace_mlps`, optionally with its codes edited
        between encode and decode (see :class:`CLTSurrogate`): ``term_weights`` [L, L] or [B, L, L] scale each
        term u_{s->l}; ``feature_scales`` {(layer, feature): scale} scale single codes; ``error_term`` adds the
        teacher's own MLP output minus the unedited reconstruction, so that without edits it is the teacher;
        ``teacher_xs`` [L, B, T, d] are encoded alongside, into ``teacher_codes``, and with ``decode_teacher``
        decoded alongside where every token is replaced, into ``teacher_terms``."""
        return CLTSurrogate(self, sparse, term_weights, feature_scales, error_term, teacher_xs, decode_teacher)

    def _as_sparse(self, codes: torch.Tensor | list[SparseCodes]) -> list[SparseCodes]:
        if isinstance(codes, torch.Tensor):
            self._check_layers(codes, "codes")
            if codes.shape[-1] != self.config.n_features:
                raise ValueError(f"codes have {codes.shape[-1]} features, the CLT has {self.config.n_features}")
            return [SparseCodes.from_dense(z) for z in codes]
        if len(codes) != self.config.n_layers:
            raise ValueError(f"expected codes for {self.config.n_layers} layers, got {len(codes)}")
        return list(codes)

    def _check_layers(self, tensor: torch.Tensor, name: str) -> None:
        if tensor.shape[0] != self.config.n_layers:
            raise ValueError(f"{name} must have the layer axis first with {self.config.n_layers} layers, "
                             f"got shape {tuple(tensor.shape)}")

    # ---- precision --------------------------------------------------------------------------

    @staticmethod
    def keeps_fp32(name: str) -> bool:
        """The sparsifier's parameters (JumpReLU thresholds) and the input scales stay fp32 whatever the
        weights' dtype."""
        return name == "input_scale" or name.startswith("sparsifier.")

    # ---- checkpoints --------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (atomically) into ``directory``."""
        directory = Path(directory)
        save_tensors(directory / WEIGHTS_FILE, self.state_dict(), metadata={"format": "pt"})
        write_json(directory / CONFIG_FILE, self.config.to_dict())

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, revision: str | None = None,
                        device: torch.device | str = "cpu", cache_dir: str | None = None,
                        dtype: torch.dtype | None = None) -> "CrossLayerTranscoder":
        """Load from a folder, or from a Hugging Face Hub repo id (``owner/name``) through huggingface_hub.
        ``dtype`` casts the weights (not thresholds and input scales) while loading, one tensor at a time, on a CPU
        into memory backed by huge pages where Linux allows (:mod:`.huge_pages`)."""
        directory = Path(path_or_repo)
        if not directory.is_dir():
            directory = _download_from_hub(str(path_or_repo), revision, cache_dir)
        config = CLTConfig.from_dict(read_json(directory / CONFIG_FILE), str(directory / CONFIG_FILE))
        on_cpu = torch.device(device).type == "cpu"

        def cast(name: str, tensor: torch.Tensor) -> torch.Tensor:
            if cls.keeps_fp32(name):
                return tensor
            return huge_pages.empty(tensor.shape, dtype).copy_(tensor) if on_cpu else tensor.to(dtype)

        tensors = load_tensors(directory / WEIGHTS_FILE, device=device, cast=None if dtype is None else cast)
        tensors = {LEGACY_TENSOR_NAMES.get(name, name): t for name, t in tensors.items()}
        with torch.device("meta"):
            clt = cls(config)
        expected = {name: tuple(t.shape) for name, t in clt.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in tensors.items()}
        if expected != found:
            diff = sorted(set(expected.items()) ^ set(found.items()))
            raise AssetError(f"{directory / WEIGHTS_FILE}: tensors do not match {CONFIG_FILE} "
                             f"(expected vs found differ in {diff[:6]})")
        clt.load_state_dict(tensors, assign=True)
        return clt


@dataclass
class CLTOutput:
    """A training pass: yhat [L, N, d], and per layer the codes and the pre-activations [N, F]."""

    yhat: torch.Tensor
    codes: list[SparseCodes]
    pre: list[torch.Tensor]


def _download_from_hub(repo_id: str, revision: str | None, cache_dir: str | None) -> Path:
    """Fetch a CLT's two files from the Hub (or its cache when offline)."""
    if not is_repo_id(repo_id):
        raise AssetError(f"{repo_id!r} is neither a CLT folder nor a Hub repo id of the form owner/name")
    return download_snapshot(repo_id, revision, cache_dir, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE])


def _apply_decoder(weight: torch.Tensor, codes: SparseCodes, sparse: bool | None) -> torch.Tensor:
    """codes @ weight for a decoder weight [F, D]: a gather of the active rows (``F.embedding_bag``) or a dense
    matmul. By default a CPU gathers, where the matmul would do ~F/k times the arithmetic: codes held sparse (TopK
    kinds, and JumpReLU's in training: :meth:`Sparsifier.codes_to_gather`) as they are, codes held dense (JumpReLU's
    otherwise) through their nonzero entries, one bag of its own length per token (at ViT-B/32 size in bfloat16, 100
    tokens at a mean L0 of 157 through the 12 layers' decoders: 0.11-0.15 against 0.45 s for the matmuls on 2
    cores). The matmul runs by default on a GPU (see LEADS.md), where a gather of codes held sparse, asked for with
    ``sparse=True``, runs in Triton kernels; and for codes held dense that need a gradient, which a gather of their
    nonzero entries would not give the zero ones."""
    needs_every_gradient = not codes.held_sparse and torch.is_grad_enabled() and codes.dense().requires_grad
    if sparse is None:
        sparse = _gathers_by_default(weight.device) and not needs_every_gradient
    if not sparse:
        return codes.dense().to(weight.dtype) @ weight
    if needs_every_gradient:
        raise ValueError("the sparse decoder gathers the nonzero codes of codes held dense, and would not give the "
                         "zero ones their gradient: hold them sparse with every code that needs one (as "
                         "Sparsifier.codes_to_gather does), or decode dense (sparse=False or None)")
    if not codes.held_sparse:
        return _gather_nonzero(weight, codes.dense())
    indices, values = codes.indices, codes.values
    if _gathers_in_triton(weight):
        return _gather_in_triton(weight, indices, values)
    out = F.embedding_bag(indices.reshape(-1, indices.shape[-1]), weight.contiguous(),
                          per_sample_weights=values.reshape(-1, values.shape[-1]).to(weight.dtype), mode="sum")
    return out.view(*indices.shape[:-1], weight.shape[1])


def _gathers_by_default(device: torch.device) -> bool:
    """Whether a decode on ``device`` gathers the active rows unless told otherwise (a CPU) or multiplies (a GPU)."""
    return device.type == "cpu"


def _gathers_in_triton(weight: torch.Tensor) -> bool:
    """Whether a gather of codes held sparse runs in Triton kernels (on a CUDA device) rather than embedding_bag."""
    return weight.device.type == "cuda"


def _gather_in_triton(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The gather of :func:`_apply_decoder` through the Triton kernels of :mod:`.triton_gather`, from the weight cast
    to the autocast dtype where autocast is on (as the matmul would be: half the bytes to read, and the weight's
    gradient rounded as the matmul's would be)."""
    try:
        from .triton_gather import gather_decode
    except ImportError as error:
        raise RuntimeError("the sparse decoder on a GPU needs Triton (pip install triton); or decode dense "
                           "(sparse=False)") from error
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        weight = weight.to(torch.get_autocast_dtype(device))
    return gather_decode(weight, indices, values.to(weight.dtype))


def _gather_nonzero(weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """z @ weight for dense codes z [..., F]: the rows of each token's nonzero codes, summed in a bag of that
    token's length (no padding to the longest, whose zero entries would still be read)."""
    flat = z.reshape(-1, z.shape[-1])
    tokens, features = flat.nonzero(as_tuple=True)  # token-major: each token's entries are contiguous
    counts = torch.bincount(tokens, minlength=flat.shape[0])
    out = F.embedding_bag(features, weight.contiguous(), torch.cumsum(counts, 0) - counts,
                          per_sample_weights=flat[tokens, features].to(weight.dtype), mode="sum")
    return out.view(*z.shape[:-1], weight.shape[1])


def normalize_contributions(norms: torch.Tensor) -> torch.Tensor:
    """Divide each target row of summed contribution norms by its total (rows then sum to 1)."""
    return (norms / norms.sum(-1, keepdim=True).clamp_min(1e-30)).float()
