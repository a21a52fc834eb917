"""The one output protocol: a folder is refused unless it is empty or (to resume) an earlier run of the same kind."""

from __future__ import annotations

import os

import pytest

from synthmed.core.io import RUN_MARKER, SynthmedError
from synthmed.core.outputs import OutputLock, check_output, guarded_output, kept_work, lock_of, open_output, output_kind, partial_of


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


# --- one writer per output, and nothing left by a refusal ---------------------------------------------------


def _write_work(out):
    (out.parent / (out.name + ".partial")).mkdir()
    (out.parent / (out.name + ".partial") / "sample.png").write_bytes(b"x")
    out.mkdir(exist_ok=True)
    (out / "run_config.yaml").write_text("x: 1\n")


def test_a_refusal_removes_what_the_command_created_and_keeps_what_was_there(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SynthmedError):
        with guarded_output(out):
            _write_work(out)
            raise SynthmedError("refused")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # OUT, OUT.partial and OUT.lock all gone

    deep = tmp_path / "new" / "nested" / "out"  # folders made for OUT's lock go too
    with pytest.raises(SynthmedError):
        with guarded_output(deep):
            _write_work(deep)
            raise SynthmedError("refused")
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    out.mkdir()  # an empty folder the user made: emptied again, not removed
    with pytest.raises(SynthmedError):
        with guarded_output(out):
            _write_work(out)
            raise SynthmedError("refused")
    assert out.is_dir() and not any(out.iterdir()) and not partial_of(out).exists()

    (out / "earlier.txt").write_text("an earlier run's work")  # a folder with content is left as it is
    partial_of(out).mkdir()
    with pytest.raises(SynthmedError):
        with guarded_output(out):
            (out / "new.txt").write_text("y")
            raise SynthmedError("refused")
    assert sorted(p.name for p in out.iterdir()) == ["earlier.txt", "new.txt"] and partial_of(out).is_dir()


@pytest.mark.parametrize("crash", [RuntimeError("a bug"), KeyboardInterrupt()])
def test_a_crash_or_interrupt_keeps_the_partial_work_to_resume_from(tmp_path, crash):
    out = tmp_path / "out"
    with pytest.raises(type(crash)):
        with guarded_output(out):
            _write_work(out)
            raise crash
    assert (partial_of(out) / "sample.png").is_file() and kept_work(out) == partial_of(out)
    assert not lock_of(out).exists()


def test_a_held_lock_refuses_a_second_writer_and_names_the_holder(tmp_path):
    out = tmp_path / "out"
    first = OutputLock(out).acquire()
    try:
        assert lock_of(out).read_text().strip() == str(os.getpid())
        with pytest.raises(SynthmedError, match=rf"another synthmed command is writing it \(pid {os.getpid()}, lock "):
            OutputLock(out).acquire()
        with pytest.raises(SynthmedError, match="another synthmed command"):
            with guarded_output(out):
                pass
    finally:
        first.release()
    assert not lock_of(out).exists()
    second = OutputLock(out).acquire()  # free again once released
    assert second.stale_pid is None
    second.release()


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    lock_of(out).write_text("999999\n")  # what kill -9 leaves: the file, with no process holding its flock
    with guarded_output(out):
        assert lock_of(out).read_text().strip() == str(os.getpid())
    assert capsys.readouterr().err == "note: took over the lock of pid 999999, which is no longer running; its finished work is kept\n"
    assert not lock_of(out).exists()
