import numpy as np
import pytest
from scipy import ndimage

from synthmed.data.conditioning import ConditioningSpec, build_conditioning, colour_mask
from synthmed.data.phantoms.histology import CLASSES, make_prompt
from synthmed.data.prepared import load_split
from synthmed.generation.layouts import (
    Layout,
    classes_present,
    copy_paste,
    count_objects,
    count_pixels,
    dihedral_ks,
    dihedral_layout,
    elastic_layout,
    prompt_for,
    update_row,
)
from synthmed.core.io import load_png


def _disc(shape, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _layout(shape, discs, spec=None, cond_value=None) -> Layout:
    """Discs (cy, cx, r, class code) as instances 1..n; cond from the spec, or constant per class (image-like)."""
    mask, inst = np.zeros(shape, np.uint8), np.zeros(shape, np.int32)
    for i, (cy, cx, r, code) in enumerate(discs, start=1):
        d = _disc(shape, cy, cx, r)
        mask[d], inst[d] = code, i
    if spec is not None:
        cond = build_conditioning(spec, None, mask, inst)
    else:
        cond = np.full((*shape, 1), cond_value, np.uint8) if cond_value is not None else (mask * 40)[..., None]
    return Layout(mask, inst, cond, {"source_id": f"L{len(discs)}"}, spec)


def _copies(layout: Layout) -> tuple:
    return tuple(None if a is None else a.copy() for a in (layout.mask, layout.instances, layout.cond))


def _unchanged(layout: Layout, before: tuple) -> bool:
    return all((a is None and b is None) or np.array_equal(a, b) for a, b in zip((layout.mask, layout.instances, layout.cond), before))


# ---- dihedral ---------------------------------------------------------------------------------


def test_dihedral_ops_are_distinct_and_keep_a_non_square_shape():
    square = np.zeros((5, 5), np.uint8)
    square[0, :3], square[1, 0] = 1, 2  # no symmetry
    outs = [dihedral_layout(Layout(square), k) for k in range(8)]
    assert len({o.mask.tobytes() for o in outs}) == 8
    assert outs[3].record["ops"] == [{"op": "dihedral", "k": 3}]

    wide = np.zeros((4, 7), np.uint8)
    wide[0, :3], wide[1, 0] = 1, 2
    assert dihedral_ks(wide.shape) == (0, 2, 4, 6)
    kept = [dihedral_layout(Layout(wide), k).mask for k in dihedral_ks(wide.shape)]
    assert all(m.shape == (4, 7) for m in kept) and len({m.tobytes() for m in kept}) == 4
    with pytest.raises(ValueError, match="non-square"):
        dihedral_layout(Layout(wide), 1)


@pytest.mark.parametrize("spec", [None, ConditioningSpec(("colour", "boundary"))])
def test_dihedral_keeps_mask_instances_and_cond_aligned(spec):
    layout = _layout((12, 12), [(3, 3, 2, 1), (8, 6, 3, 2), (2, 9, 1, 3)], spec)
    before = _copies(layout)
    for k in range(8):
        out = dihedral_layout(layout, k)
        if spec is None:  # image-derived: moved, so still 40 x the class code under the new mask
            assert np.array_equal(out.cond[..., 0], out.mask * 40)
        else:
            assert np.array_equal(out.cond, build_conditioning(spec, None, out.mask, out.instances))
        assert count_objects(out.mask, out.instances) == count_objects(layout.mask, layout.instances)
        assert all(np.all(out.mask[out.instances == i] == layout.mask[layout.instances == i][0]) for i in (1, 2, 3))
    assert _unchanged(layout, before)


def test_a_tissue_channel_moves_with_the_mask_and_the_colour_is_rebuilt():
    spec = ConditioningSpec(("colour", "tissue"))
    layout = _layout((12, 12), [(3, 3, 2, 1), (8, 6, 3, 2)], ConditioningSpec(("colour",)))
    tissue = np.arange(144, dtype=np.uint8).reshape(12, 12)[..., None]  # image-derived: no mask rebuilds it
    layout = Layout(layout.mask, layout.instances, np.concatenate([layout.cond, tissue], -1), layout.record, spec)
    for k in range(1, 8):
        out = dihedral_layout(layout, k)
        assert np.array_equal(out.cond[..., :3], colour_mask(out.mask))
        assert sorted(out.cond[..., 3].ravel()) == list(range(144)) and not np.array_equal(out.cond[..., 3], tissue[..., 0])
        assert all(sorted(out.cond[..., 3][out.instances == i]) == sorted(tissue[..., 0][layout.instances == i]) for i in (1, 2))  # moved with it


def test_an_elastic_warp_draws_no_frame_in_a_tissue_channel_and_pads_edges_with_zeros():
    spec = ConditioningSpec(("colour", "tissue", "canny"))
    base = _layout((48, 48), [(24, 24, 5, 1)], ConditioningSpec(("colour",)))
    flat = np.full((48, 48, 2), 150, np.uint8)  # a uniform tissue and a full edge channel, to see what the warp pads
    layout = Layout(base.mask, base.instances, np.concatenate([base.cond, flat], -1), base.record, spec)
    out = elastic_layout(layout, 3, magnitude=(4.0, 4.0))
    assert (out.cond[..., 3] == 150).all()  # the border replicated: no frame a generator would paint
    assert (out.cond[..., 4] == 0).any() and (out.cond[..., 4][12:-12, 12:-12] == 150).all()  # edges: zeros come in at the border
    assert np.array_equal(out.cond[..., :3], colour_mask(out.mask))


# ---- elastic ----------------------------------------------------------------------------------

DISCS = [(10, 10, 4, 1), (12, 40, 5, 2), (40, 14, 4, 3), (44, 44, 6, 1), (28, 28, 3, 2)]


def test_elastic_is_seeded_and_objects_stay_objects():
    layout = _layout((56, 56), DISCS)
    before = _copies(layout)
    a, b, c = elastic_layout(layout, 7), elastic_layout(layout, 7), elastic_layout(layout, 8)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.instances, b.instances)
    assert not np.array_equal(a.mask, c.mask)
    assert not np.array_equal(a.mask, layout.mask)  # it moved something
    assert _unchanged(layout, before)

    rng_out = elastic_layout(layout, np.random.default_rng(3))
    replay = elastic_layout(layout, rng_out.record["ops"][-1]["seed"])  # the record replays a Generator draw
    assert np.array_equal(rng_out.mask, replay.mask)

    for out in (a, c, rng_out):
        assert set(np.unique(out.mask)) <= set(np.unique(layout.mask))
        assert count_objects(out.mask, out.instances) == count_objects(layout.mask, layout.instances)
        for i in np.unique(out.instances[out.instances > 0]):  # every piece of every object is >= min_pixels
            pieces, n = ndimage.label(out.instances == i)
            assert np.bincount(pieces.ravel())[1:].min() >= 4
        fg = out.mask > 0  # image-derived cond moved with the same field
        assert np.array_equal(out.cond[..., 0][fg], out.mask[fg] * 40)


def test_elastic_drops_fragments_and_rebuilds_mask_derived_cond():
    spec = ConditioningSpec(("colour",))
    layout = _layout((24, 24), [(6, 6, 3, 1), (15, 15, 0, 2)], spec)  # disc 2 is a single pixel
    out = elastic_layout(layout, 0, magnitude=(0.0, 0.0))  # identity field: only the fragment rule acts
    assert count_objects(out.mask, out.instances) == {1: 1}
    assert out.record["ops"][-1]["dropped_fragments"] == 1
    assert np.array_equal(out.cond, colour_mask(out.mask))

    no_instances = Layout(layout.mask, None)  # objects are connected components
    out = elastic_layout(no_instances, 0, magnitude=(0.0, 0.0))
    assert count_objects(out.mask, None) == {1: 1} and count_pixels(out.mask)[1] == count_pixels(layout.mask)[1]


# ---- copy-paste -------------------------------------------------------------------------------


def _donors(spec=None, cond_value=None) -> list[Layout]:
    return [
        _layout((20, 20), [(6, 6, 3, 4), (13, 13, 4, 1)], spec, cond_value),
        _layout((24, 24), [(8, 14, 3, 4), (16, 6, 2, 4), (16, 16, 4, 2)], spec, cond_value),
    ]


def test_copy_paste_adds_exactly_the_pasted_objects():
    target = _layout((40, 40), [(10, 10, 5, 1), (28, 26, 6, 2)])
    donors = _donors()
    before = [_copies(x) for x in (target, *donors)]
    out = copy_paste(target, donors, 3, n_objects=2, classes=[4], max_overlap=0.0)
    op = out.record["ops"][-1]
    assert [p["class"] for p in op["pasted"]] == [4, 4] and op["skipped"] == [] and op["pool"] == 3
    expected = count_objects(target.mask, target.instances)
    expected[4] = 2
    assert count_objects(out.mask, out.instances) == expected
    assert [p["instance"] for p in op["pasted"]] == [3, 4]
    assert all(p["donor_id"] in ("L2", "L3") and p["donor_instance"] is not None for p in op["pasted"])
    assert all(_unchanged(x, b) for x, b in zip((target, *donors), before))
    assert np.array_equal(out.mask[target.mask > 0], target.mask[target.mask > 0])  # overlap 0: nothing covered
    again = copy_paste(target, donors, 3, n_objects=2, classes=[4], max_overlap=0.0)
    assert again.record == out.record and np.array_equal(again.mask, out.mask)


def test_copy_paste_respects_max_overlap_and_records_skips():
    full = Layout(np.ones((30, 30), np.uint8), np.ones((30, 30), np.int32))
    full.mask[10:14, 10:14] = full.instances[10:14, 10:14] = 0  # a hole too small for any donor object
    out = copy_paste(full, _donors(), 0, n_objects=3, classes=[4, 1], max_overlap=0.1)
    op = out.record["ops"][-1]
    assert op["pasted"] == [] and len(op["skipped"]) == 3 and {s["reason"] for s in op["skipped"]} == {"no room"}
    assert np.array_equal(out.mask, full.mask)

    half = _layout((40, 40), [(20, 10, 9, 1)])
    out = copy_paste(half, _donors(), 1, n_objects=6, max_overlap=0.1)
    pasted = out.record["ops"][-1]["pasted"]
    assert pasted
    for p in pasted:
        assert p["overlap"] <= 0.1
        where = out.instances == p["instance"]
        assert (half.mask[where] > 0).mean() <= 0.1 + 1e-9  # measured on the result, not just the record


def test_copy_paste_rebuilds_mask_cond_and_pastes_image_cond():
    spec = ConditioningSpec(("colour", "onehot"))
    target = _layout((32, 32), [(8, 8, 4, 1)], spec)
    out = copy_paste(target, _donors(spec), 2, n_objects=2, classes=[4])
    assert len(out.record["ops"][-1]["pasted"]) == 2
    assert np.array_equal(out.cond, build_conditioning(spec, None, out.mask, out.instances))

    mixed = ConditioningSpec(("colour", "canny"))  # colour rebuilt, the edge channel pasted from the donor

    def with_edges(x: Layout, value: int) -> Layout:
        edges = np.full((*x.mask.shape, 1), value, np.uint8)
        return Layout(x.mask, x.instances, np.concatenate([colour_mask(x.mask), edges], -1), x.record, mixed)

    target = with_edges(_layout((32, 32), [(8, 8, 4, 1)]), 0)
    donors = [with_edges(d, 200) for d in _donors()]
    out = copy_paste(target, donors, 5, n_objects=1, classes=[4], max_overlap=0.0)
    (p,) = out.record["ops"][-1]["pasted"]
    assert np.array_equal(out.cond[..., :3], colour_mask(out.mask))
    pasted_at = ndimage.binary_dilation(out.instances == p["instance"], iterations=2)
    assert np.array_equal(out.cond[..., 3] == 200, pasted_at)
    assert not target.cond[..., 3].any()


def test_a_rebuild_function_replaces_cond_and_a_cond_only_layout_moves():
    spec = ConditioningSpec(("onehot",), n_classes=4)
    rebuild = lambda mask, inst: build_conditioning(spec, None, mask, inst)  # noqa: E731 (as the planner passes it)
    target = _layout((32, 32), [(8, 8, 4, 1)], spec)
    plain = Layout(target.mask, target.instances, target.cond)  # no spec: only `rebuild` knows the cond is mask-made
    for out in (dihedral_layout(plain, 5, rebuild=rebuild), elastic_layout(plain, 1, rebuild=rebuild),
                copy_paste(plain, _donors(spec), 0, 2, classes=[4], rebuild=rebuild)):
        assert np.array_equal(out.cond, rebuild(out.mask, out.instances))

    image_cond = np.arange(6 * 6 * 3, dtype=np.uint8).reshape(6, 6, 3)
    cond_only = Layout(None, None, image_cond)  # classification: no mask, the cond itself moves
    assert np.array_equal(dihedral_layout(cond_only, 1).cond, np.rot90(image_cond))
    assert elastic_layout(cond_only, 0, magnitude=(0.0, 0.0)).mask is None
    with pytest.raises(ValueError, match="copy_paste expects a target and donors with masks"):
        copy_paste(cond_only, [target], 0, 1)


def test_copy_paste_without_instances_counts_components():
    target = Layout(_layout((40, 40), [(10, 10, 5, 1)]).mask)
    donors = [Layout(d.mask) for d in _donors()]
    out = copy_paste(target, donors, np.random.default_rng(4), n_objects=3, classes=[4], max_overlap=0.0)
    assert out.instances is None and out.record["ops"][-1]["seed"] is None
    assert count_objects(out.mask, None) == {1: 1, 4: len(out.record["ops"][-1]["pasted"])} == {1: 1, 4: 3}


# ---- counts and prompts -----------------------------------------------------------------------


def test_counts_and_prompts_for_generic_rows():
    mask = np.array([[0, 2, 2, 0], [0, 0, 0, 0], [2, 0, 3, 0]], np.uint8)
    assert count_objects(mask) == {2: 2, 3: 1} and count_pixels(mask) == {0: 8, 2: 3, 3: 1}
    names = ["benign", "malignant", "cyst"]
    assert classes_present(mask, names) == ["malignant", "cyst"]
    row = {"text": "ultrasound, lesions: benign, malignant", "classes": ["benign", "malignant"]}
    assert prompt_for(row, mask, names) == "ultrasound, lesions: malignant, cyst"
    assert update_row(row, mask, names)["classes"] == ["malignant", "cyst"] and row["classes"] == ["benign", "malignant"]
    assert prompt_for({"text": "a chest x-ray"}, mask, names) == "a chest x-ray"
    with pytest.raises(ValueError, match="classes_present expects"):
        classes_present(mask, ["benign"])


def test_prompt_names_a_pasted_dead_nucleus_on_phantom_data(phantom_data):
    split = load_split(phantom_data, "train", need_masks=True)

    def layout(i: int) -> Layout:
        inst = load_png(split.root / "train" / split.rows[i]["instance_mask"])
        return Layout(split.masks[i], inst, None, {"source_id": split.ids[i]})

    no_dead = next(i for i, r in enumerate(split.rows) if "dead" not in r["classes"])
    donors = [layout(i) for i, r in enumerate(split.rows) if "dead" in r["classes"]]
    row = split.rows[no_dead]
    assert prompt_for(row, split.masks[no_dead], CLASSES) == row["text"]  # the rule reproduces the stored prompt

    out = copy_paste(layout(no_dead), donors, 0, n_objects=1, classes=[CLASSES.index("dead") + 1], max_overlap=0.5)
    assert len(out.record["ops"][-1]["pasted"]) == 1
    wanted = [c for c in CLASSES if c in row["classes"] or c == "dead"]
    assert prompt_for(row, out.mask, CLASSES) == make_prompt(row["tissue"], wanted)
    assert "dead" in update_row(row, out.mask, CLASSES)["classes"]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda L: dihedral_layout(L, 8), "dihedral_layout expects k"),
        (lambda L: elastic_layout(L, 0, magnitude=(3.0, 1.0)), "elastic_layout expects magnitude"),
        (lambda L: elastic_layout(L, -1), "elastic_layout expects a numpy Generator"),
        (lambda L: copy_paste(L, [L], 0, 1, max_overlap=2.0), "copy_paste expects max_overlap"),
        (lambda L: Layout(L.mask, None, np.zeros((3, 3, 1), np.uint8)), "Layout expects cond"),
        (lambda L: Layout(L.mask, None, np.zeros((8, 8, 2), np.uint8), spec=ConditioningSpec(("colour",))), "match builders"),
    ],
)
def test_bad_arguments_are_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call(Layout(np.zeros((8, 8), np.uint8)))
