"""Teacher activations -> shuffled batches of tokens (CLS and patches together) for CLT training.

The stream is deterministic and resumable. Epoch e visits the images in a permutation drawn from
(seed, e), in chunks of ``chunk_images``; the tokens of a chunk are shuffled together (a shuffle
buffer of chunk_images x T tokens). An epoch's token stream is the chunks' shuffled tokens one after
the other, cut into full batches: the tokens a chunk leaves over start the next batch, so every step
sees exactly ``batch_tokens`` tokens (the epoch's last, partial batch, fewer than batch_tokens
tokens, is dropped). A position is (epoch, batch): resuming there recomputes the teacher only from
the chunk that holds the batch's first token. Under DDP every chunk is split evenly across ranks by
image, so all ranks see the same number of batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import grouped_image_batches
from ..model.teacher import Teacher


@dataclass(frozen=True)
class Position:
    """Where a stream stands: the next batch to yield (its index within the epoch)."""

    epoch: int = 0
    batch: int = 0


@dataclass
class TokenBatch:
    """One training batch: MLP inputs and outputs [L, N, d] and where it comes from."""

    xs: torch.Tensor
    ys: torch.Tensor
    position: Position


class ActivationStream:
    """Deterministic shuffled token batches from a frozen teacher."""

    def __init__(self, teacher: Teacher, dataset: Dataset, batch_tokens: int, chunk_images: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, image_batch_size: int = 64, num_workers: int = 0,
                 autocast_dtype: torch.dtype | None = None, store_dtype: torch.dtype | None = None):
        if batch_tokens % world_size:
            raise ValueError(f"batch_tokens ({batch_tokens}) must be divisible by the world size ({world_size})")
        self.teacher, self.dataset, self.seed = teacher, dataset, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_tokens // world_size
        self.chunk_images = math.ceil(chunk_images / world_size) * world_size
        self.n_images = len(dataset) // world_size * world_size
        if self.n_images == 0:
            raise ValueError(f"the dataset has {len(dataset)} images, fewer than the {world_size} ranks")
        self.image_batch_size, self.num_workers = image_batch_size, num_workers
        self.autocast_dtype, self.store_dtype = autocast_dtype, store_dtype
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.n_images} images x {teacher.n_tokens} tokens are fewer than one batch of "
                             f"{batch_tokens} tokens: use more images or smaller batches")

    @property
    def chunks_per_epoch(self) -> int:
        return math.ceil(self.n_images / self.chunk_images)

    def _chunk_images(self, chunk: int) -> int:
        return min(self.chunk_images, self.n_images - chunk * self.chunk_images)

    def _chunk_tokens_count(self, chunk: int) -> int:
        """Tokens of this rank in a chunk."""
        return self._chunk_images(chunk) // self.world_size * self.teacher.n_tokens

    @property
    def batches_per_epoch(self) -> int:
        total = sum(self._chunk_tokens_count(c) for c in range(self.chunks_per_epoch))
        return total // self.local_batch

    def next_position(self, position: Position) -> Position:
        """The position after ``position``: the next batch, or the next epoch's first."""
        if position.batch + 1 < self.batches_per_epoch:
            return Position(position.epoch, position.batch + 1)
        return Position(position.epoch + 1, 0)

    def _generator(self, *keys: int) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed(int(np.random.SeedSequence([self.seed, *keys]).generate_state(1)[0]))
        return generator

    def _local_indices(self, epoch: int, chunks: range) -> list[list[int]]:
        """This rank's images of each chunk of ``chunks`` in epoch ``epoch``."""
        order = torch.randperm(len(self.dataset), generator=self._generator(epoch))[: self.n_images]
        return [order[chunk * self.chunk_images:chunk * self.chunk_images + self._chunk_images(chunk)]
                [self.rank::self.world_size].tolist() for chunk in chunks]

    @torch.no_grad()
    def _chunk_tokens(self, epoch: int, chunks: range) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Teacher activations of this rank's images in each chunk of ``chunks``, as [L, tokens, d] each; the images
        of them all come through one loader (see :func:`grouped_image_batches`)."""
        groups = self._local_indices(epoch, chunks)
        device = self.teacher.device
        batches = iter(grouped_image_batches(self.dataset, self.teacher.preprocess, self.image_batch_size, groups,
                                             self.num_workers, device))
        for group in groups:
            xs, ys, images = [], [], 0
            while images < len(group):
                pixels, _, _ = next(batches)
                with torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32,
                                    enabled=self.autocast_dtype is not None):
                    capture = self.teacher.capture(pixels)
                dtype = self.store_dtype or capture.xs.dtype
                xs.append(capture.xs.flatten(1, 2).to(dtype))
                ys.append(capture.ys.flatten(1, 2).to(dtype))
                images += len(pixels)
            yield torch.cat(xs, 1), torch.cat(ys, 1)

    def iterate(self, start: Position = Position()) -> Iterator[TokenBatch]:
        """Full batches of one epoch from ``start`` to the end of that epoch."""
        first_token, offset, chunk = start.batch * self.local_batch, 0, 0
        while chunk < self.chunks_per_epoch and offset + self._chunk_tokens_count(chunk) <= first_token:
            # the chunk that holds the first token
            offset += self._chunk_tokens_count(chunk)
            chunk += 1
        skip, batch, carry = first_token - offset, start.batch, None
        chunks = range(chunk, self.chunks_per_epoch)
        for chunk, (xs, ys) in zip(chunks, self._chunk_tokens(start.epoch, chunks)):
            order = torch.randperm(xs.shape[1], generator=self._generator(start.epoch, chunk, self.rank))
            order = order[skip:].to(xs.device)
            xs, ys, skip = xs[:, order], ys[:, order], 0
            if carry is not None:
                xs, ys = torch.cat([carry[0], xs], 1), torch.cat([carry[1], ys], 1)
            full = xs.shape[1] // self.local_batch
            for i in range(full):
                if batch >= self.batches_per_epoch:
                    return
                rows = slice(i * self.local_batch, (i + 1) * self.local_batch)
                yield TokenBatch(xs[:, rows], ys[:, rows], Position(start.epoch, batch))
                batch += 1
            carry = xs[:, full * self.local_batch:], ys[:, full * self.local_batch:]
