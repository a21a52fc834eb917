"""`synthmed ui` without a browser: what the page shows equals what the Python API gives; bad input is one line;
the server answers on 127.0.0.1 only."""

from __future__ import annotations

import socket
import urllib.request

import numpy as np
import pytest

from synthmed.core.io import SynthmedError
from synthmed.data.conditioning import colour_mask
from synthmed.data.metadata import read_metadata
from synthmed.testing.cli import run_cli

pytest.importorskip("gradio")


def test_draw_from_a_validation_mask_is_the_python_apis_draw(quick, session, direct):
    sid = session.thumbnails("validation")[1][1]
    src = session.from_data("validation", sid)
    drawn = session.draw(src, session.prompt_for(src.row), [5, 6], session.settings(steps=3))
    image, dice = direct(sid, 5, 3)
    assert np.array_equal(drawn[0].image, image)  # same sampler, seed and settings: the same pixels
    assert drawn[0].mean_dice == pytest.approx(dice, abs=1e-9)
    assert drawn[1].seed == 6 and not np.array_equal(drawn[1].image, drawn[0].image)
    assert src.real is not None and np.array_equal(drawn[0].conditioning, src.conditioning)
    assert set(drawn[0].dice) == set(session.classes)
    assert [n for n, v in drawn[0].dice.items() if v is None] == [n for c, n in enumerate(session.classes, 1) if not (src.mask == c).any()]


def test_uploaded_colours_give_the_masks_own_conditioning(session):
    src = session.from_data("validation", session.thumbnails("validation")[0][1])
    up = session.from_mask_image(colour_mask(src.mask, session.palette), "mask.png")
    assert np.array_equal(up.mask, src.mask) and np.array_equal(up.conditioning, src.conditioning)
    codes = session.from_mask_image(src.mask.astype(np.uint8), "codes.png")  # one channel of class codes
    assert np.array_equal(codes.mask, src.mask)
    painted = colour_mask(src.mask, session.palette).astype(np.int32)
    painted = np.clip(painted + 20 * (painted > 0) - 10, 0, 255).astype(np.uint8)  # brush antialiasing: near the colours
    assert np.array_equal(session.from_mask_image(painted, "painted", exact=False).mask, src.mask)


@pytest.mark.parametrize("bad, message", [
    (lambda m, s: np.pad(colour_mask(m, s.palette), ((0, 4), (0, 0), (0, 0))), r"mask.png: size 64x68, but the model's data set is 64x64"),
    (lambda m, s: np.where(m[..., None] > 0, np.uint8(9), colour_mask(m, s.palette)), r"mask.png: unknown class colour \(9, 9, 9\)"),
    (lambda m, s: (m > 0).astype(np.uint8) * 9, r"mask.png: class code 9 beyond the 5 classes"),
    (lambda m, s: np.zeros((64, 64, 2), np.uint8), r"mask.png: expected a grey or RGB image"),
])
def test_bad_masks_are_one_readable_line(session, bad, message):
    src = session.from_data("validation", session.thumbnails("validation")[0][1])
    with pytest.raises(SynthmedError, match=message):
        session.from_mask_image(bad(src.mask, session), "mask.png")


def test_masks_come_from_train_or_validation_never_test(quick, session):
    test_id = read_metadata(quick / "data" / "test" / "metadata.jsonl")[0]["id"]
    with pytest.raises(SynthmedError, match="train or validation split, not 'test'"):
        session.from_data("test", test_id)
    with pytest.raises(SynthmedError, match="no sample"):
        session.from_data("validation", test_id)


def test_browse_lists_every_sample_with_its_scores(quick, session):
    rows = session.synthetic_rows()
    kept = read_metadata(quick / "synthetic" / "train" / "metadata.jsonl")
    assert [r["id"] for r in rows if r["kept"]] == [r["id"] for r in kept]
    assert all(r["score"] == r["provenance"]["filter_scores"]["dice"] for r in rows)
    assert all(set(r["classes"]) <= set(session.classes) for r in rows)


def test_results_tab_renders_the_reports_html(quick, session):
    from synthmed.report.html import render_report
    from synthmed.core.io import read_json

    page = session.results_html()
    assert page == render_report(read_json(quick / "evaluation" / "results.json"), f"synthmed results: {session.results}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outside_address() -> str | None:
    """This machine's address on a non-loopback interface, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_server_answers_on_localhost_only_by_default(session):
    from synthmed.ui.app import launch

    port = _free_port()
    demo, url = launch(session, port=port, block=False)
    try:
        assert url.startswith(f"http://127.0.0.1:{port}")
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).status == 200
        outside = _outside_address()
        if outside is None:
            pytest.skip("this machine has no non-loopback address to try")
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{outside}:{port}/", timeout=5)
    finally:
        demo.close()


def test_cli_refuses_what_is_not_a_model_in_one_line(tmp_path):
    proc = run_cli("ui", "--model", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert str(tmp_path) in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("ui", "--model", str(tmp_path), "--auth", "nopassword")
    assert proc.returncode == 2 and "--auth expects USER:PASS" in proc.stderr


def test_prompts_follow_the_models_rule(quick, session):
    train = read_metadata(quick / "data" / "train" / "metadata.jsonl")
    assert session.prompt_for(train[0]) == train[0]["text"]  # a text-prompted model reads its data set's prompt
    label = str(train[0]["label"])
    texts = [r["text"] for r in train if str(r["label"]) == label]
    picked = session.prompt_for(None, label)  # a picked class: its commonest training prompt
    assert picked in texts and texts.count(picked) == max(texts.count(t) for t in texts)
