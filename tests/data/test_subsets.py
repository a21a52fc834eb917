
import pytest

from synthmed.data.prepared import load_split, read_card
from synthmed.data.subsets import nested_fractions, write_subset
from synthmed.data.metadata import read_metadata


def _rows(sizes: dict[str, int]) -> list[dict]:
    return [{"id": f"{p}_{i}", "patient_id": p} for p, n in sizes.items() for i in range(n)]


def test_fractions_are_nested_whole_patients_and_large_enough():
    rows = _rows({f"P{k}": 1 + k % 4 for k in range(30)})
    subsets = nested_fractions(rows, [0.05, 0.1, 0.25, 0.5, 1.0], seed=3)
    patient = {r["id"]: r["patient_id"] for r in rows}
    previous = set()
    for f, ids in subsets.items():
        assert len(ids) >= f * len(rows)  # at least the share asked for ...
        patients = {patient[i] for i in ids}
        assert {r["id"] for r in rows if r["patient_id"] in patients} == set(ids)  # ... in whole patients
        assert previous <= set(ids)  # nested
        previous = set(ids)
    assert set(subsets[1.0]) == {r["id"] for r in rows}
    assert nested_fractions(rows, [0.25], seed=3)[0.25] == subsets[0.25]  # one order whatever else is asked
    assert nested_fractions(rows, [0.25], seed=4)[0.25] != subsets[0.25]


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="fractions in"):
        nested_fractions(_rows({"P": 2}), [0.0, 0.5], seed=0)


def test_subset_is_a_prepared_set_with_only_its_train_rows(phantom_data, tmp_path):
    rows = read_metadata(phantom_data / "train" / "metadata.jsonl")
    ids = nested_fractions(rows, [0.3], seed=0)[0.3]
    out = write_subset(phantom_data, ids, tmp_path / "sub", 0.3)
    card = read_card(out)
    assert card["splits"]["train"]["n"] == len(ids) and card["subset_of"]["fraction"] == 0.3
    assert sorted(load_split(out, "train").ids) == sorted(ids)
    assert load_split(out, "test").ids == load_split(phantom_data, "test").ids  # held-out splits unchanged
    full = read_card(phantom_data)["splits"]["train"]["pixels_per_class"]
    assert sum(card["splits"]["train"]["pixels_per_class"].values()) < sum(full.values())
