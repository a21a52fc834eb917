"""The VAE latent cache on disk: each training image encoded once per view, in total across processes, and
reused by later runs on the same images and VAE encoder.

    ROOT/<key>/latents.npy    (N, V, C, h, w) in the precision the VAE computed them in (fp32 on CPU, fp16 on a
                              fp16 GPU VAE: nothing is rounded that the encoder did not already round)
    ROOT/<key>/meta.json      shape, dtype, views, the chunks each process encoded

The key hashes the VAE encoder's weights and dtype, the scaling factor, the views and the training images'
pixels, so a changed image or a fine-tuned encoder never reads stale latents (a fine-tuned decoder does not
change the key: latents come from the encoder). While it is built the folder is `<key>.partial/`: the work is
cut into chunks (one view of up to `batch_size` consecutive images, the batches a single process would encode,
so the latents do not depend on the number of processes), process r encodes pending chunks r, r + P, ...,
writes their rows in place and records each finished chunk, so an interrupted build continues where it stopped.
Rows are read back with positioned reads, not a memory map: a training step's resident memory is one batch.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch

from synthmed.core.environment import cache_root
from synthmed.core.io import write_json
from synthmed.core.outputs import OutputLock
from synthmed.data.arrays import npy_header
from synthmed.training.common import dihedral, to_model_range


def default_root() -> Path:
    """The latents' folder in the synthmed cache (core.environment.cache_root)."""
    return cache_root() / "latents"


class LatentStore:
    """Rows of an (N, V, C, h, w) .npy file read with positioned reads; `store[idx, pos]` -> float32 (b, C, h, w)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.shape, self.dtype, self.offset = npy_header(self.path)
        self.row = int(np.prod(self.shape[2:])) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> torch.Tensor:
        idx, pos = key
        idx, pos = torch.as_tensor(idx).reshape(-1).tolist(), torch.as_tensor(pos).reshape(-1).tolist()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            rows = [np.frombuffer(os.pread(fd, self.row, self.offset + (i * self.shape[1] + v) * self.row), self.dtype) for i, v in zip(idx, pos)]
        finally:
            os.close(fd)
        return torch.from_numpy(np.stack(rows).reshape(len(rows), *self.shape[2:]).astype(np.float32))


def cache_key(vae, images: np.ndarray, views: tuple[int, ...]) -> str:
    """What the cached latents depend on: encoder weights and dtype, scaling factor, views, the images' pixels."""
    h = hashlib.sha256()
    for part in (vae.encoder, vae.quant_conv):
        if part is None:
            continue
        for name, t in sorted(part.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(repr((str(vae.dtype), float(vae.config.scaling_factor), tuple(views), tuple(images.shape))).encode())
    h.update(pixel_digest(images).encode())
    return h.hexdigest()[:20]


def pixel_digest(images) -> str:
    """sha256 of the images' bytes: a large split's DiskArray carries it (hashed as it was written), an array in
    memory is hashed now; both give the same value for the same pixels."""
    digest = getattr(images, "digest", None)
    return digest if digest else hashlib.sha256(np.ascontiguousarray(images).data).hexdigest()


def cached_latents(backbone, images: np.ndarray, views: tuple[int, ...], root: Path, process_index: int = 0, num_processes: int = 1,
                   barrier=lambda: None, progress=None, batch_size: int = 32) -> tuple[LatentStore, dict]:
    """The latents of uint8 images (N, H, W, 3) in every view, from ROOT's cache or encoded into it now.

    Every process calls this with the same arguments; `barrier` is the processes' wait_for_everyone.
    Returns the store and what happened: key, reused, images encoded by this process, seconds.
    """
    started = time.time()
    key = cache_key(backbone.vae, images, views)
    final, work = Path(root) / key, Path(root) / f"{key}.partial"
    info = {"path": str(final), "key": key, "reused": True, "encoded_here": 0}
    if not (final / "meta.json").is_file():
        # One builder per key: another run (not another process of this one) building it makes this one wait, then read it.
        lock = OutputLock(final).acquire(wait=f"waiting for another run that is building the same latent cache ({final})") if process_index == 0 else None
        try:
            barrier()
            if not (final / "meta.json").is_file():
                info["reused"] = False
                info["encoded_here"] = _build(backbone, images, views, final, work, process_index, num_processes, barrier, progress, batch_size)
        finally:
            if lock is not None:
                lock.release()
    info["seconds"] = round(time.time() - started, 1)
    return LatentStore(final / "latents.npy"), info


def _chunks(n: int, views: tuple[int, ...], batch_size: int) -> list[tuple[int, int, int]]:
    """(chunk id, view position, first row): the batches one process encodes, in its order."""
    starts = range(0, n, batch_size)
    return [(j, p, s) for j, (p, s) in enumerate((p, s) for p in range(len(views)) for s in starts)]


def _build(backbone, images, views, final: Path, work: Path, rank: int, world: int, barrier, progress, batch_size: int) -> int:
    n = len(images)
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "latents.npy").is_file():
            with torch.no_grad():
                probe = backbone.encode_images(to_model_range(images[:1]).to(backbone.vae.dtype))  # (1, C, h, w)
            tmp = work / ".latents.npy.tmp"
            dtype = np.float16 if probe.dtype == torch.float16 else np.float32  # bf16 widens to fp32 exactly
            np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, len(views), *probe.shape[1:])).flush()
            os.replace(tmp, work / "latents.npy")
    barrier()
    done = {int(line) for f in work.glob("done-*.txt") for line in f.read_text().split()}
    pending = [c for c in _chunks(n, views, batch_size) if c[0] not in done]
    mine = pending[rank::world]
    store = LatentStore(work / "latents.npy")
    total, encoded = len(mine), 0
    fd = os.open(work / "latents.npy", os.O_WRONLY)
    try:
        with open(work / f"done-{rank}.txt", "a") as log:
            for k, (chunk, p, s) in enumerate(mine):
                x = dihedral(to_model_range(images[s : s + batch_size]), views[p])
                with torch.no_grad():
                    z = backbone.encode_images(x.to(backbone.vae.dtype)).float().cpu().numpy()  # (b, C, h, w)
                for r, row in enumerate(z):
                    os.pwrite(fd, np.ascontiguousarray(row, dtype=store.dtype).tobytes(), store.offset + ((s + r) * len(views) + p) * store.row)
                log.write(f"{chunk}\n")
                log.flush()
                encoded += len(z)
                if progress:
                    progress(k + 1, total)
    finally:
        os.close(fd)
    barrier()
    if rank == 0:
        counts = {f.stem: len(f.read_text().split()) for f in sorted(work.glob("done-*.txt"))}
        write_json(work / "meta.json", {"shape": list(store.shape), "dtype": str(store.dtype), "views": list(views), "chunks_done_by": counts})
        for f in work.glob("done-*.txt"):
            f.unlink()
        os.replace(work, final)  # under the key's lock: no other run can have made it meanwhile
    barrier()
    return encoded
