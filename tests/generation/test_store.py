"""The generation store: what a resumed run sees."""

import numpy as np

from synthmed.generation.store import GenerationStore


def test_rejected_attempts_are_counted_per_sample_in_one_scan(tmp_path):
    store = GenerationStore(tmp_path / "syn.partial")
    image = np.zeros((4, 4, 3), np.uint8)
    for sid, attempts in (("syn_000001", 2), ("syn_000012", 1)):
        for a in range(attempts):
            store.reject({"id": sid}, image, {"attempt": a, "seed": a, "prompt": "", "scores": {"dice": 0.1}}, final=False)
    counts = store.rejected_attempts()
    assert counts["syn_000001"] == 2 and counts["syn_000012"] == 1 and counts["syn_000002"] == 0
    assert store.finished() == set()
    store.reject({"id": "syn_000012"}, image, {"attempt": 1, "seed": 1, "prompt": "", "scores": {"dice": 0.1}}, final=True)
    assert store.finished() == {"syn_000012"} and store.rejected_attempts()["syn_000012"] == 2
