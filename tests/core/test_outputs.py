"""The one output protocol: a folder is refused unless it is empty or (to resume) an earlier run of the same kind."""

from __future__ import annotations

import pytest

from synthmed.core.io import RUN_MARKER, SynthmedError
from synthmed.core.outputs import check_output, open_output, output_kind


def test_open_output_marks_and_resumes_only_its_own_kind(tmp_path):
    out = tmp_path / "run"
    open_output(out, "run")
    assert output_kind(out) == "run" and (out / RUN_MARKER).read_text() == "run\n"
    (out / "run_config.yaml").write_text("x: 1\n")
    open_output(out, "run")  # the same kind resumes
    with pytest.raises(SynthmedError, match=r"holds another kind of synthmed output \(run\), not downstream"):
        open_output(out, "downstream")
    with pytest.raises(SynthmedError, match="not empty"):
        open_output(out, "run", resume=False)


def test_check_output_refuses_files_and_foreign_folders_and_writes_nothing(tmp_path):
    a_file = tmp_path / "results.json"
    a_file.write_text("{}")
    with pytest.raises(SynthmedError, match="exists and is not a folder"):
        check_output(a_file, "run")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not synthmed's")
    with pytest.raises(SynthmedError, match="not empty"):
        check_output(foreign, "run", resume=True)  # no marker: never taken over, even to resume
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    check_output(tmp_path / "new", "run")  # a missing folder is fine, and stays missing
    assert not (tmp_path / "new").exists()


def test_a_train_controlnet_folder_cannot_be_resumed_as_a_run(tmp_path):
    from synthmed import pipelines
    from synthmed.config import RunConfig

    out = tmp_path / "model"
    open_output(out, "controlnet")
    (out / "train_config.yaml").write_text("steps: 1\n")
    with pytest.raises(SynthmedError, match=r"\(controlnet\), not run"):
        pipelines.run(RunConfig(data=str(tmp_path / "absent")), out)
    assert sorted(p.name for p in out.iterdir()) == [RUN_MARKER, "train_config.yaml"]
