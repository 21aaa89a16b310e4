"""Per-feature statistics of a CLT over the retrieval corpus: what the app's feature cards show.

For every source layer s and feature f, over the indexed training images (row r = thumbnail r), in the
unmodified teacher's pass:

- ``token_rate``, ``image_rate``, ``cls_rate``: the share of tokens (CLS and patches) where z_s[f] != 0, of images
  where it is active on at least one token, and of images where it is active on the CLS token;
- ``mean``: the mean of z_s[f] over the tokens where it is active (signed: Abs-TopK codes can be negative);
  ``max_abs``: its largest |z_s[f]| over all tokens;
- the top-N images by the feature's largest |activation| over the image's tokens, with that peak (signed) and the
  feature's activation on every patch token of each, as int8 with one scale per map (value = q * scale), for heat
  overlays on the thumbnails (images where the feature never fires are not listed: id -1, peak 0);
- ``final_cls_mean``: the corpus's mean final residual at the CLS token, where a feature card linearises the
  readout when it has no image of its own (see :mod:`..model.attribution`).

On disk (``Bundle.features_dir``): ``stats.safetensors`` (per feature), ``top.safetensors`` (top images and patch
maps) and ``meta.json``, written last. One pass of the teacher and the CLT over the corpus; memory holds the running
top-N (the store's own size) and one batch of dense codes of one layer. At ViT-B/32 scale (12 x 12288 features,
N = 16, 49 patches) the store is about 147 MB, 116 MB of it the patch maps (``scripts/bench_app.py`` builds one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from ..data import image_batches
from ..model.clt import CrossLayerTranscoder
from ..model.surrogate import check_feature
from ..model.teacher import Teacher
from ..progress import tqdm
from ..storage import AssetError, check_keys, load_tensors, read_json, save_tensors, write_json

FORMAT, VERSION = "clt-explorer-features", 1
STATS, TOP, META = "stats.safetensors", "top.safetensors", "meta.json"
STAT_NAMES = ("token_rate", "image_rate", "cls_rate", "mean", "max_abs")
TOP_N = 16


@dataclass
class TopImages:
    """The top images of one feature, strongest first: thumbnail ids [n], signed peaks [n] and patch maps [n, P]."""

    ids: list[int]
    peaks: list[float]
    maps: torch.Tensor


def quantize_maps(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 maps and one scale per map (value ~ q * scale, the largest |value| exact) for maps [..., P]."""
    scale = maps.abs().amax(-1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (maps / scale[..., None]).round().clamp(-127, 127).to(torch.int8), scale.float()


class FeatureStatistics:
    """The running statistics of every feature, fed one batch of codes at a time (:meth:`add`)."""

    def __init__(self, n_layers: int, n_features: int, n_patches: int, d_model: int, top_n: int = TOP_N):
        L, F, N = n_layers, n_features, top_n
        self.top_n, self.n_images, self.n_tokens = top_n, 0, 0
        self.token_count = torch.zeros(L, F, dtype=torch.long)
        self.image_count = torch.zeros(L, F, dtype=torch.long)
        self.cls_count = torch.zeros(L, F, dtype=torch.long)
        self.sum = torch.zeros(L, F, dtype=torch.float64)
        self.max_abs = torch.zeros(L, F)
        self.top_score = torch.full((L, F, N), float("-inf"))  # |peak|, -inf for an empty slot
        self.top_peak = torch.zeros(L, F, N)
        self.top_ids = torch.full((L, F, N), -1, dtype=torch.long)
        self.maps = torch.zeros(L, F, N, n_patches, dtype=torch.int8)
        self.scales = torch.ones(L, F, N)
        self.final_sum = torch.zeros(d_model, dtype=torch.float64)

    def add(self, codes: Sequence, final_cls: torch.Tensor) -> None:
        """The codes of the next images (per layer SparseCodes [B, T, ...], position 0 the CLS token) and their
        final residual at the CLS token [B, d]; they get the next thumbnail ids."""
        for layer, layer_codes in enumerate(codes):
            self._add_layer(layer, layer_codes.dense().float().cpu())
        batch = final_cls.shape[0]
        self.final_sum += final_cls.double().sum(0).cpu()
        self.n_images += batch
        self.n_tokens += batch * codes[0].dense().shape[1]

    def _add_layer(self, layer: int, z: torch.Tensor) -> None:
        """Fold dense codes [B, T, F] of one layer into the counts and the running top-N."""
        active = z != 0
        self.token_count[layer] += active.sum((0, 1))
        self.image_count[layer] += active.any(1).sum(0)
        self.cls_count[layer] += active[:, 0].sum(0)
        self.sum[layer] += z.double().sum((0, 1))
        magnitude, token = z.abs().max(1)  # per image and feature: [B, F]
        self.max_abs[layer] = torch.maximum(self.max_abs[layer], magnitude.max(0).values)
        peak = z.gather(1, token[:, None]).squeeze(1)  # signed [B, F]
        scores = torch.cat([self.top_score[layer], magnitude.masked_fill(magnitude == 0, float("-inf")).T], 1)
        best, pick = scores.topk(self.top_n, dim=1)  # [F, N], sorted: empty slots (-inf) last
        new = (pick >= self.top_n) & (best > float("-inf"))  # filled from this batch, by images where f fires
        # an old slot moves to its new place; an empty one gathers the old last slot, empty too
        kept = pick.clamp(max=self.top_n - 1)
        ids = self.top_ids[layer].gather(1, kept)
        peaks = self.top_peak[layer].gather(1, kept)
        maps = self.maps[layer].gather(1, kept[..., None].expand(-1, -1, self.maps.shape[-1]))
        scales = self.scales[layer].gather(1, kept)
        feature, slot = new.nonzero(as_tuple=True)
        image = pick[feature, slot] - self.top_n
        ids[feature, slot] = self.n_images + image
        peaks[feature, slot] = peak[image, feature]
        maps[feature, slot], scales[feature, slot] = quantize_maps(z[image, 1:, feature])  # [M, P]
        self.top_score[layer], self.top_ids[layer], self.top_peak[layer] = best, ids, peaks
        self.maps[layer], self.scales[layer] = maps, scales

    def save(self, folder: str | Path, grid: tuple[int, int]) -> None:
        """Write the store (``meta.json`` last: a folder without it holds no store)."""
        folder = Path(folder)
        (folder / META).unlink(missing_ok=True)
        n = max(self.n_images, 1)
        stats = {"token_rate": self.token_count.double() / max(self.n_tokens, 1), "image_rate": self.image_count / n,
                 "cls_rate": self.cls_count / n, "mean": self.sum / self.token_count.clamp_min(1),
                 "max_abs": self.max_abs, "final_cls_mean": self.final_sum / n}
        save_tensors(folder / STATS, {name: t.float() for name, t in stats.items()})
        save_tensors(folder / TOP, {"ids": self.top_ids.int(), "peaks": self.top_peak, "maps": self.maps,
                                    "scales": self.scales})
        L, F, N, P = self.maps.shape
        write_json(folder / META, {"format": FORMAT, "version": VERSION, "n_layers": L, "n_features": F,
                                   "n_images": self.n_images, "top_n": N, "grid": list(grid)})


@torch.no_grad()
def build_feature_store(teacher: Teacher, clt: CrossLayerTranscoder, dataset: Dataset, indices: Sequence[int],
                        folder: str | Path, top_n: int = TOP_N, batch_size: int = 64, num_workers: int = 0,
                        progress: bool = True) -> "FeatureStore":
    """Stream ``dataset[indices]`` (row r = thumbnail r) through the teacher and the CLT into the store at
    ``folder``."""
    c = clt.config
    statistics = FeatureStatistics(c.n_layers, c.n_features, teacher.n_tokens - 1, teacher.d_model, top_n)
    batches = image_batches(dataset, teacher.preprocess, batch_size, indices, num_workers, teacher.device)
    for pixels, _, _ in tqdm(batches, desc=f"feature statistics of {c.sparsifier}", disable=not progress):
        capture = teacher.capture(pixels)
        statistics.add(clt.encode_sparse(capture.xs), capture.final_cls)
    statistics.save(folder, teacher.grid)
    return FeatureStore(folder)


class FeatureStore:
    """The saved statistics: per-feature arrays in memory, each feature's top images read on demand."""

    def __init__(self, folder: str | Path, n_layers: int | None = None, n_features: int | None = None,
                 n_images: int | None = None):
        self.folder = Path(folder)
        where = str(self.folder / META)
        meta = read_json(self.folder / META)
        check_keys(meta, {"format", "version", "n_layers", "n_features", "n_images", "top_n", "grid"}, set(), where)
        if (meta["format"], meta["version"]) != (FORMAT, VERSION):
            raise AssetError(f"{where}: {meta['format']} version {meta['version']}, this version reads {FORMAT} "
                             f"version {VERSION}")
        for key, value in {"n_layers": n_layers, "n_features": n_features, "n_images": n_images}.items():
            if value is not None and meta[key] != value:
                raise AssetError(f"{where}: {key} is {meta[key]}, expected {value}")
        self.n_layers, self.n_features, self.n_images = meta["n_layers"], meta["n_features"], meta["n_images"]
        self.top_n, self.grid = meta["top_n"], tuple(meta["grid"])
        stats = load_tensors(self.folder / STATS)
        shape = (self.n_layers, self.n_features)
        for name in STAT_NAMES:
            if tuple(stats.get(name, torch.empty(0)).shape) != shape:
                raise AssetError(f"{self.folder / STATS}: {name} must have shape {list(shape)}")
        self.stats = {name: stats[name] for name in STAT_NAMES}
        self.final_cls_mean = stats["final_cls_mean"]
        with safe_open(str(self.folder / TOP), "pt") as f:
            found = {name: f.get_slice(name).get_shape() for name in f.keys()}
        patches = self.grid[0] * self.grid[1]
        expected = {"ids": [*shape, self.top_n], "peaks": [*shape, self.top_n], "scales": [*shape, self.top_n],
                    "maps": [*shape, self.top_n, patches]}
        if found != expected:
            raise AssetError(f"{self.folder / TOP}: arrays {found}, expected {expected}")

    @staticmethod
    def exists(folder: str | Path) -> bool:
        """Whether ``folder`` holds a store of this version (an older one counts as none and is built again)."""
        path = Path(folder) / META
        try:
            meta = read_json(path) if path.is_file() else {}
        except AssetError:
            return False
        return (meta.get("format"), meta.get("version")) == (FORMAT, VERSION)

    @property
    def nbytes(self) -> int:
        return sum(path.stat().st_size for path in (self.folder / STATS, self.folder / TOP, self.folder / META))

    def stat(self, name: str, layer: int) -> torch.Tensor:
        """One statistic (``STAT_NAMES``) of every feature of ``layer``: [F]."""
        return self.stats[name][layer]

    def top_images(self, layer: int, feature: int) -> TopImages:
        """The feature's top images (only those where it fires), with their patch maps dequantised."""
        check_feature(layer, feature, self.n_layers, self.n_features)
        with safe_open(str(self.folder / TOP), "pt") as f:
            ids = f.get_slice("ids")[layer:layer + 1, feature:feature + 1][0, 0]
            peaks = f.get_slice("peaks")[layer:layer + 1, feature:feature + 1][0, 0]
            scales = f.get_slice("scales")[layer:layer + 1, feature:feature + 1][0, 0]
            maps = f.get_slice("maps")[layer:layer + 1, feature:feature + 1][0, 0]
        n = int((ids >= 0).sum())
        return TopImages(ids[:n].tolist(), peaks[:n].tolist(), maps[:n].float() * scales[:n, None])
