"""The latent cache on disk (training/latent_cache.py): the same numbers as encoding in memory, shared by
processes, reused by later runs, resumed after an interrupt, and keyed by the pixels."""

from __future__ import annotations

import threading

import pytest
import torch

from synthmed.testing.training import data_for
from synthmed.training.latent_cache import cached_latents


def test_disk_cache_holds_exactly_the_in_memory_latents_and_is_reused(tiny, tmp_path):
    load, arrays = tiny
    bb = load()
    memory = data_for(bb, arrays)
    disk = data_for(bb, arrays, cache_dir=tmp_path / "c")
    assert disk.cache_info["reused"] is False and disk.cache_info["encoded_here"] == len(memory) * len(memory.views)
    n, v = memory.latents.shape[:2]
    idx, pos = torch.arange(n).repeat_interleave(v), torch.arange(v).repeat(n)
    assert torch.equal(disk.latents[idx, pos], memory.latents[idx, pos])  # bit for bit
    again = data_for(load(), arrays, cache_dir=tmp_path / "c")
    assert again.cache_info["reused"] is True and again.cache_info["encoded_here"] == 0 and again.cache_info["key"] == disk.cache_info["key"]
    changed = dict(arrays, images=arrays["images"].copy())
    changed["images"][0, 0, 0, 0] ^= 1  # one pixel: another key, never stale latents
    assert data_for(load(), changed, cache_dir=tmp_path / "c").cache_info["key"] != disk.cache_info["key"]


def test_an_interrupted_build_continues_where_it_stopped(tiny, tmp_path):
    load, arrays = tiny
    bb = load()

    def stop_after_3(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_latents(bb, arrays["images"], tuple(range(8)), tmp_path, progress=stop_after_3, batch_size=4)
    store, info = cached_latents(bb, arrays["images"], tuple(range(8)), tmp_path, batch_size=4)
    assert info["encoded_here"] == len(arrays["images"]) * 8 - 3 * 4  # the 3 finished chunks of 4 images are not encoded again
    reference, _ = cached_latents(bb, arrays["images"], tuple(range(8)), tmp_path / "ref", batch_size=4)
    idx = torch.arange(len(store)).repeat_interleave(8)
    pos = torch.arange(8).repeat(len(store))
    assert torch.equal(store[idx, pos], reference[idx, pos])


def test_processes_share_the_work_and_each_chunk_is_encoded_once(tiny, tmp_path):
    load, arrays = tiny
    barrier = threading.Barrier(2)
    results, backbones = {}, [load(), load()]  # loaded here: model loading is not thread-safe

    def worker(rank):
        results[rank] = cached_latents(backbones[rank], arrays["images"], tuple(range(8)), tmp_path, rank, 2, barrier.wait, batch_size=4)

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    counts = [results[r][1]["encoded_here"] for r in (0, 1)]
    assert sum(counts) == len(arrays["images"]) * 8 and min(counts) > 0
    single, _ = cached_latents(load(), arrays["images"], tuple(range(8)), tmp_path / "single", batch_size=4)
    idx = torch.arange(len(single)).repeat_interleave(8)
    pos = torch.arange(8).repeat(len(single))
    for rank in (0, 1):  # both read the one finished cache, equal to what one process makes
        assert torch.equal(results[rank][0][idx, pos], single[idx, pos])
