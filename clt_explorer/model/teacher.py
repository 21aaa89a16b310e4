"""The frozen open_clip teacher: loading, activation capture and cascaded MLP replacement.

For every residual block l of the image tower, ``x_l`` is the output of ``ln_2`` (the MLP's input)
and ``y_l = mlp(x_l)`` (before ``ls_2``). One forward pass with hooks on the MLPs captures both.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import open_clip
import torch
from PIL import Image

from . import onednn_products
from .tokens import ALL, other_tokens, token_index

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
OPEN_CLIP_WEIGHTS, OPEN_CLIP_CONFIG = "open_clip_model.safetensors", "open_clip_config.json"
OPEN_CLIP_FILES = (OPEN_CLIP_WEIGHTS, OPEN_CLIP_CONFIG)  # open_clip's folder format (written in this order)


class MLPSurrogate(Protocol):
    """What replaces the MLPs of a forward pass: called block by block, in order, on one pass. One that sets
    ``reads_teacher_output = False`` never reads ``y`` at the tokens it replaces: the teacher's MLP runs on the other
    tokens only (``y``'s replaced rows unset), and not at all where it replaces every token (``y`` None)."""

    def begin(self) -> None:
        """Forget the previous pass (a new image batch starts)."""

    def resume(self, codes: list, terms: list, index: slice, y: torch.Tensor) -> torch.Tensor:
        """Take the teacher's own pass up to the MLP of block s = ``len(codes) - 1`` (:class:`PassBelow`) as this
        pass's, and return the replacement of block s's MLP output for the tokens ``index``, given the teacher's
        ``y`` there (what a call at block s would return); the pass goes on at block s + 1."""

    def __call__(self, layer: int, x: torch.Tensor, index: slice, y: torch.Tensor) -> torch.Tensor:
        """The replacement MLP output of block ``layer`` for the tokens ``x[:, index]``, given the
        block's whole MLP input ``x`` [B, T, d] and the teacher's own MLP output ``y`` = mlp(x); shape [B, T', d]."""


@dataclass
class Capture:
    """Activations of one forward pass: xs, ys [L, B, T, d], the final residual stream at the CLS token (the
    input of the final LayerNorm) [B, d], the image embeddings [B, D] and, for the blocks asked for, the residual
    stream leaving the block (in the blocks' own layout, for :meth:`Teacher.encode_from`)."""

    xs: torch.Tensor
    ys: torch.Tensor
    final_cls: torch.Tensor
    embeddings: torch.Tensor
    residuals: dict[int, torch.Tensor] = field(default_factory=dict)

    def below(self, start: int, codes: list, terms: list) -> "PassBelow":
        """What a replacement starting at block ``start`` takes from this pass (its residual stream leaving
        ``start`` captured), given the surrogate's codes and terms of this pass at every layer up to ``start`` at
        least."""
        if start not in self.residuals:
            raise ValueError(f"this capture holds no residual stream leaving block {start}: capture it with "
                             f"residuals_at=[{start}]")
        return PassBelow(self.residuals[start], self.ys[start], codes[:start + 1], terms[:start + 1])


@dataclass
class PassBelow:
    """The teacher's pass up to the MLP of a first replaced block s, which a replacement starting at s leaves as it
    is (block s's MLP input is still the teacher's): the residual stream leaving block s and the MLP output y_s there
    [B, T, d], and the surrogate's codes and decoded terms of blocks 0..s (all tokens)."""

    residual: torch.Tensor
    y: torch.Tensor
    codes: list
    terms: list


def file_digest(path: Path) -> str:
    """First 16 hex digits of a file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _check_local_weights(model_name: str, pretrained: str | None) -> None:
    """Refuse local weight files that would be unpickled: only safetensors are loaded from disk."""
    if model_name.startswith(LOCAL_DIR):
        folder = Path(model_name[len(LOCAL_DIR):])
        if not (folder / OPEN_CLIP_CONFIG).is_file():
            raise FileNotFoundError(f"teacher folder {folder} has no {OPEN_CLIP_CONFIG}")
        if not (folder / OPEN_CLIP_WEIGHTS).is_file():
            raise FileNotFoundError(
                f"teacher folder {folder} has no {OPEN_CLIP_WEIGHTS} (other weight formats are refused)"
            )
    if pretrained and (Path(pretrained).suffix or "/" in pretrained):
        path = Path(pretrained)
        if path.suffix != ".safetensors":
            raise ValueError(f"teacher weights {pretrained} must be a .safetensors file (pickles are refused)")
        if not path.is_file():
            raise FileNotFoundError(f"teacher weights file {pretrained} does not exist")


def patch_product(conv: torch.nn.Conv2d):
    """``conv``'s forward as one matrix product where its kernel is its stride (a ViT's patch embedding): each
    output is a patch's pixels times the flattened weight, the same numbers to float rounding. oneDNN's convolution
    reorders its weight on every call: 5.7-13 ms an image at ViT-B/32 size on 2 cores, against 2.3 ms for the product.
    Other convolutions, inputs the patches do not tile, and inputs on an accelerator (whose convolution needs no copy
    of the patches) keep the convolution."""
    convolve = conv.forward
    if conv.kernel_size != conv.stride or any(conv.padding) or conv.dilation != (1, 1) or conv.groups != 1:
        return convolve
    ph, pw = conv.kernel_size

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or x.shape[-2] % ph or x.shape[-1] % pw:
            return convolve(x)
        b, c, h, w = x.shape
        patches = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * ph * pw)
        out = onednn_products.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)
        return out.transpose(1, 2).view(b, conv.out_channels, h // ph, w // pw)  # conv's layout, no copy
    return run


class Teacher:
    """A frozen open_clip CLIP: hooks into its image tower and its text tower for zero-shot.

    Each MLP carries one permanent forward hook that defers to a per-thread action (capture or
    replacement), so concurrent requests in a web server never see each other's replacement.
    """

    def __init__(self, model: open_clip.CLIP, preprocess, tokenizer, name: str, pretrained: str | None = None):
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name, self.pretrained = name, pretrained
        self.has_text_tower = True
        visual = model.visual
        if not hasattr(visual, "transformer") or getattr(visual, "attn_pool", None) is not None:
            raise ValueError(f"{name}: only open_clip ViT image towers with a CLS token are supported")
        if getattr(visual, "pool_type", "tok") != "tok":
            raise ValueError(f"{name}: the image tower pools with {visual.pool_type!r}, a CLS token is needed")
        self.blocks = list(visual.transformer.resblocks)
        self.n_layers = len(self.blocks)
        self.d_model = visual.transformer.width
        self.grid = tuple(visual.grid_size)  # patch rows x columns; patch token 1 + i is row i // columns
        self.n_tokens = 1 + self.grid[0] * self.grid[1]
        self.resize_mode = getattr(visual, "preprocess_cfg", {}).get("resize_mode", "shortest")
        self.image_size = visual.image_size
        self._thread = threading.local()
        visual.conv1.forward = patch_product(visual.conv1)
        onednn_products.route_products(visual.transformer)  # its float32 products through oneDNN on a CPU
        for layer, block in enumerate(self.blocks):
            block.mlp.register_forward_hook(self._hook(layer))
            block.mlp.forward = self._skippable(layer, block.mlp.forward)
            block.register_forward_hook(self._residual_hook(layer))
        visual.ln_post.register_forward_hook(self._final_hook)

    def _residual_hook(self, layer: int):
        """During a capture that asks for it, record the residual stream leaving block ``layer``."""
        def record(module, inputs, output) -> None:
            sink = getattr(self._thread, "residual_sink", None)
            if sink is not None and layer in sink:
                sink[layer] = output
        return record

    def _final_hook(self, module, inputs, output) -> None:
        """During a capture, record the CLS token of the final residual stream (ln_post's input)."""
        sink = getattr(self._thread, "final_sink", None)
        if sink is not None:
            x = inputs[0]
            sink.append(x[:, 0] if x.dim() == 3 else x)  # all tokens, or (final_ln_after_pool) the pooled CLS

    def _skippable(self, layer: int, forward):
        """The MLP's own forward, run only on the tokens whose output this thread's action reads: where it replaces a
        token set without reading the teacher's output there, on the other tokens (the output's replaced rows left
        unset), or not at all (the output None) where it replaces every token; the action's hook then gives the block
        its output."""
        def run(x: torch.Tensor) -> torch.Tensor | None:
            action = getattr(self._thread, "action", None)
            read = getattr(action, "tokens_read", {})
            if layer not in read:
                return forward(x)
            if read[layer] is None:
                return None
            index = token_index(read[layer])
            part = forward(x[:, index])
            y = part.new_empty(*x.shape[:-1], part.shape[-1])
            y[:, index] = part
            return y
        return run

    def _hook(self, layer: int):
        def run_action(module, inputs, output):
            action = getattr(self._thread, "action", None)
            if action is None:
                return None
            self._thread.action = None  # what the action itself runs through an MLP is not hooked
            try:
                return action(layer, inputs[0], output)
            finally:
                self._thread.action = action
        return run_action

    @contextlib.contextmanager
    def _acting(self, action) -> Iterator[None]:
        if getattr(self._thread, "action", None) is not None:
            raise RuntimeError("a capture or replacement is already active in this thread")
        self._thread.action = action
        try:
            yield
        finally:
            self._thread.action = None

    @classmethod
    def load(cls, model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
             cache_dir: str | None = None) -> "Teacher":
        """Load an open_clip model by architecture + pretrained tag (``ViT-B-32-quickgelu``, ``openai``),
        architecture + local ``.safetensors`` file, ``local-dir:PATH`` or ``hf-hub:owner/repo``."""
        _check_local_weights(model_name, pretrained)
        schema = model_name.startswith((LOCAL_DIR, HF_HUB))
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None if schema else pretrained, device=device, cache_dir=cache_dir,
            require_pretrained=bool(pretrained) or schema,
        )
        tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        return cls(model, preprocess, tokenizer, model_name, pretrained)

    def drop_text_tower(self) -> None:
        """Free the text tower (a third of ViT-B/32 CLIP's weights): an app whose zero-shot classifier is built needs
        the image tower only. The logit scale stays."""
        for name, _ in list(self.model.named_children()):
            if name != "visual":
                setattr(self.model, name, None)
        for name, _ in list(self.model.named_parameters(recurse=False)):
            if not name.startswith("logit_"):
                setattr(self.model, name, None)
        self.has_text_tower = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @functools.cached_property
    def identity(self) -> str:
        """A string naming this teacher's architecture and weights, stored with the CLTs trained on it.
        Local weights are named by their content (not their path), so a bundle can move."""
        if self.name.startswith(LOCAL_DIR):
            folder = Path(self.name[len(LOCAL_DIR):])
            return f"local:{file_digest(folder / OPEN_CLIP_WEIGHTS)}"
        if self.pretrained and Path(self.pretrained).is_file():
            return f"{self.name}@local:{file_digest(Path(self.pretrained))}"
        return f"{self.name}@{self.pretrained}" if self.pretrained else self.name

    def pixel_bytes(self, images: int) -> int:
        """Bytes of ``images`` preprocessed images (float32, 3 channels at the tower's input size)."""
        height, width = (self.image_size,) * 2 if isinstance(self.image_size, int) else self.image_size
        return images * 3 * height * width * 4

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> the normalised batch tensor the image tower expects."""
        return torch.stack([self.preprocess(image.convert("RGB")) for image in images])

    def on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` on the teacher's device. A batch in pinned memory (the loaders pin for a CUDA device:
        :func:`data.grouped_image_batches`) is copied there without waiting for the work queued on the device."""
        return pixels.to(self.device, non_blocking=self.device.type != "cpu")

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, D] (not normalised) of a preprocessed batch."""
        return self.model.encode_image(self.on_device(pixels))

    @torch.no_grad()
    def capture(self, pixels: torch.Tensor, residuals_at: Sequence[int] = ()) -> Capture:
        """One forward pass that records x_l and y_l of every block for every token (and the residual stream
        leaving each block of ``residuals_at``)."""
        xs: list[torch.Tensor] = [None] * self.n_layers  # type: ignore[list-item]
        ys: list[torch.Tensor] = [None] * self.n_layers  # type: ignore[list-item]

        def record(layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
            xs[layer], ys[layer] = x, y

        self._thread.residual_sink = residuals = dict.fromkeys(residuals_at)
        try:
            with self._acting(record):
                embeddings, final_cls = self.encode_with_final(pixels)
        finally:
            self._thread.residual_sink = None
        return Capture(torch.stack(xs), torch.stack(ys), final_cls, embeddings, residuals)

    @torch.no_grad()
    def encode_with_final(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image embeddings [B, D] and the final residual stream at the CLS token [B, d] (the final LayerNorm's
        input) of one pass; inside :meth:`replace_mlps`, of the replaced pass."""
        self._thread.final_sink = final = []
        try:
            embeddings = self.model.encode_image(self.on_device(pixels))
        finally:
            self._thread.final_sink = None
        return embeddings, final[0]

    @torch.no_grad()
    def encode_from(self, residual: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_with_final` of a pass whose residual stream entering block ``start`` is ``residual`` (the one
        leaving block ``start - 1``, as :meth:`capture` records it; ``start`` = L runs no block): blocks below
        ``start`` are not run again, which is exact when the pass would change nothing there."""
        visual = self.model.visual
        self._thread.final_sink = final = []
        try:
            x = residual
            for block in self.blocks[start:]:
                x = block(x)
            if not visual.transformer.batch_first:
                x = x.transpose(0, 1)
            pooled, _ = visual._pool(x)  # what VisionTransformer.forward does after its blocks
            embeddings = pooled @ visual.proj if visual.proj is not None else pooled
        finally:
            self._thread.final_sink = None
        return embeddings, final[0]

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The residual stream entering block 0 (patch, class and position embeddings after ``ln_pre``): [B, T, d]."""
        return self.model.visual._embeds(self.on_device(pixels))

    def readout(self, final_cls: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, D] from the final residual stream at the CLS token [B, d]: all that follows the
        last block is the final LayerNorm and the projection (a CLS-pooled tower without attention pooling).
        Differentiable in ``final_cls`` (the readout's gradient linearises it around one image)."""
        visual = self.model.visual
        out = visual.ln_post(final_cls)
        return out @ visual.proj if visual.proj is not None else out

    def readout_with_last_mlp(self, capture: Capture, cls_output: torch.Tensor) -> torch.Tensor:
        """The embeddings of a captured pass had the last block's MLP written ``cls_output`` [B, d] at the CLS
        token instead of its own y: the residual changes by LayerScale(cls_output - y), nothing else does."""
        last = self.n_layers - 1
        change = self.blocks[last].ls_2(cls_output.to(capture.final_cls.dtype) - capture.ys[last, :, 0])
        return self.readout(capture.final_cls + change)

    @contextlib.contextmanager
    def replace_mlps(self, surrogate: MLPSurrogate, start: int, tokens: str = ALL) -> Iterator[None]:
        """Cascade ``start -> L-1``: in every block l >= start, the MLP output of the chosen tokens is
        replaced by ``surrogate(l, x_l)``, where x_l comes from this same (modified) forward pass.
        The surrogate sees every block from 0 so that it can keep state (e.g. the CLT's codes z_i, i <= l). Where it
        does not read the teacher's output, the teacher's MLP runs on the other tokens only (not at all for all
        tokens)."""
        if not 0 <= start < self.n_layers:
            raise ValueError(f"start layer must be in [0, {self.n_layers - 1}], got {start}")
        index = token_index(tokens)

        def replace(layer: int, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor | None:
            if layer == 0:
                surrogate.begin()
            replacement = surrogate(layer, x, index, y)
            if layer < start:
                return None
            if y is None:  # the teacher's MLP was skipped: the replacement is the whole output
                return replacement.to(x.dtype)
            out = y.clone()
            out[:, index] = replacement.to(out.dtype)
            return out

        if not getattr(surrogate, "reads_teacher_output", True):
            replace.tokens_read = dict.fromkeys(range(start, self.n_layers), other_tokens(tokens))
        with self._acting(replace):
            yield

    @torch.no_grad()
    def encode_resumed(self, surrogate: MLPSurrogate, below: PassBelow, tokens: str = ALL
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_with_final` of the cascade ``s -> L-1`` (s = ``len(below.codes) - 1``) that replaces the MLP
        output of ``tokens`` by ``surrogate``'s, run from block s + 1 on: up to block s's MLP that pass is the
        teacher's own, ``below``, and block s's output differs from the teacher's by LayerScale(replacement - y_s) on
        the replaced tokens (the same result as the whole pass to float rounding, without its first s + 1 blocks and
        their codes)."""
        start, index = len(below.codes) - 1, token_index(tokens)
        with self.replace_mlps(surrogate, start, tokens):
            output = surrogate.resume(below.codes, below.terms, index, below.y)
            residual = below.residual.clone()
            y = below.y[:, index]
            residual[:, index] += self.blocks[start].ls_2(output.to(y.dtype) - y).to(residual.dtype)
            return self.encode_from(residual, start + 1)


class TeacherMLPs:
    """The identity surrogate: the teacher's own MLPs. Replacing with it must change nothing."""

    reads_teacher_output = False  # it runs the MLP itself

    def __init__(self, teacher: Teacher):
        self.teacher = teacher

    def begin(self) -> None:
        pass

    def resume(self, codes: list, terms: list, index: slice, y: torch.Tensor) -> torch.Tensor:
        return y[:, index]

    def __call__(self, layer: int, x: torch.Tensor, index: slice, y: torch.Tensor) -> torch.Tensor:
        return self.teacher.blocks[layer].mlp(x)[:, index]
