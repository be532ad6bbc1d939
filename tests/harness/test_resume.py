"""A long merge's saved progress: the resume file's rules (untrusted when read back), AdaMerging
continuing from it with the bits of a run never stopped, and the runner's use of it."""

import os

import pytest
import torch

from harness import get_method
from harness.bench import runner
from harness.io.resume import ResumeFileError, ResumeState
from tests.conftest import make_models, task_inputs


def test_a_state_comes_back_whole_for_its_own_merge_only(tmp_path):
    path = str(tmp_path / "state.safetensors")
    state = {"lam": torch.randn(3, 5), "next_step": torch.tensor(7)}
    ResumeState(path, "abc").save(state, final=True)
    loaded = ResumeState(path, "abc").load()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    assert ResumeState(path, "another merge").load() is None
    ResumeState(path, "another merge").save({"lam": torch.zeros(2)}, final=True)   # replaced
    assert ResumeState(path, "abc").load() is None
    assert ResumeState(str(tmp_path / "none.safetensors"), "abc").load() is None


def test_saves_are_spaced_unless_final(tmp_path):
    path = str(tmp_path / "state.safetensors")
    resume = ResumeState(path, "abc", interval=3600)
    resume.save({"x": torch.ones(1)})
    assert not os.path.exists(path)
    resume.save({"x": torch.ones(1)}, final=True)
    assert os.path.exists(path)
    ResumeState(path, "abc", interval=0).save({"x": torch.zeros(1)})
    assert torch.equal(ResumeState(path, "abc").load()["x"], torch.zeros(1))


@pytest.mark.parametrize("content,problem", [
    (b"\x80\x04K\x01.", "not a readable safetensors file"),          # a pickle
    (b"", "not a readable safetensors file"),
    (None, "not a resume file of merge-harness"),                     # another safetensors file
])
def test_a_file_not_ours_is_named_and_left_alone(tmp_path, content, problem):
    path = str(tmp_path / "state.safetensors")
    if content is None:
        from safetensors.torch import save_file

        save_file({"weight": torch.ones(2)}, path, metadata={"format": "pt"})
    else:
        with open(path, "wb") as f:
            f.write(content)
    before = open(path, "rb").read()
    resume = ResumeState(path, "abc", interval=0)
    for attempt in (resume.load, lambda: resume.save({"x": torch.ones(1)}, final=True)):
        with pytest.raises(ResumeFileError, match=problem) as error:
            attempt()
        assert path in str(error.value)
    resume.discard()
    assert open(path, "rb").read() == before


def test_discard_removes_only_a_resume_file(tmp_path):
    path = str(tmp_path / "state.safetensors")
    ResumeState(path, "abc").save({"x": torch.ones(1)}, final=True)
    ResumeState(path, "abc").discard()
    assert not os.path.exists(path)
    ResumeState(path, "abc").discard()                  # nothing there: nothing happens


class Stopped(Exception):
    pass


class StopsAfter(ResumeState):
    """A resume file whose run is stopped (as a killed job is) once ``step`` steps are saved."""

    def __init__(self, path, fingerprint, step):
        super().__init__(path, fingerprint, interval=0)
        self.step = step

    def save(self, tensors, *, final=False):
        super().save(tensors, final=final)
        if int(tensors["next_step"]) == self.step:
            raise Stopped


@pytest.mark.parametrize("name", ["adamerging", "adamerging-layer"])
def test_a_stopped_merge_resumes_with_the_bits_of_one_never_stopped(tmp_path, name):
    pretrained, finetuned = make_models(n_tasks=3)
    data = task_inputs(finetuned, examples=16, batch_size=8)
    method = get_method(name, steps=6, lr=0.05)
    whole = method.merge(pretrained, finetuned, data=data)
    path = str(tmp_path / "state.safetensors")
    with pytest.raises(Stopped):
        method.merge(pretrained, finetuned, data=data, resume=StopsAfter(path, "m", 4))
    resumed = method.merge(pretrained, finetuned, data=data, resume=ResumeState(path, "m"))
    assert resumed.info["resumed_from_step"] == 4 and "resumed_from_step" not in whole.info
    assert resumed.info["coefficients"] == whole.info["coefficients"]
    assert all(torch.equal(resumed.base[k], whole.base[k]) for k in whole.base)
    again = method.merge(pretrained, finetuned, data=data, resume=ResumeState(path, "m"))
    assert again.info["resumed_from_step"] == 6                  # all steps saved: none rerun
    assert all(torch.equal(again.base[k], whole.base[k]) for k in whole.base)


def test_a_state_of_another_shape_is_an_error_naming_the_file(tmp_path):
    pretrained, finetuned = make_models(n_tasks=3)
    path = str(tmp_path / "state.safetensors")
    ResumeState(path, "m").save({"lam": torch.zeros(7), "next_step": torch.tensor(2)},
                                final=True)
    with pytest.raises(ResumeFileError, match="not a state of this merge") as error:
        get_method("adamerging", steps=6).merge(pretrained, finetuned,
                                                data=task_inputs(finetuned),
                                                resume=ResumeState(path, "m"))
    assert path in str(error.value)


def test_a_run_stopped_part_way_resumes_and_writes_the_same_record(tmp_path, tiny_cache,
                                                                   monkeypatch):
    config = runner.RunConfig("adamerging", "tiny", overrides={"steps": 5},
                              results_dir=str(tmp_path / "whole"), cache_dir=tiny_cache,
                              quiet=True)
    whole = runner.run(config)
    resume_folder = os.path.join(tiny_cache, "resume", "tiny")
    assert os.listdir(resume_folder) == []               # discarded once the record is written
    made = runner.resume_state
    monkeypatch.setattr(runner, "resume_state", lambda *a: StopsAfter(
        made(*a).path, made(*a).fingerprint, 3))
    stopped = runner.RunConfig("adamerging", "tiny", overrides={"steps": 5},
                               results_dir=str(tmp_path / "stopped"), cache_dir=tiny_cache,
                               quiet=True)
    with pytest.raises(Stopped):
        runner.run(stopped)
    assert len(os.listdir(resume_folder)) == 1
    monkeypatch.setattr(runner, "resume_state", made)
    resumed = runner.run(stopped)
    assert resumed.merge_info["resumed_from_step"] == 3
    assert resumed.merge_info["coefficients"] == whole.merge_info["coefficients"]
    assert {t: s.value for t, s in resumed.tasks.items()} == {
        t: s.value for t, s in whole.tasks.items()}
    assert os.listdir(resume_folder) == []

    from harness.bench.leaderboard import render_suite

    page = render_suite("tiny", [resumed], str(tmp_path / "stopped"))
    assert "resumed at step 3" in page          # its merge time is the last run's only


def test_the_state_is_tied_to_the_methods_code(tiny_cache, tmp_path, monkeypatch):
    from harness.bench.lookup import build_method, get_suite

    suite = get_suite("tiny", cache_dir=tiny_cache)
    config = runner.RunConfig("adamerging", "tiny", cache_dir=tiny_cache, quiet=True)
    method, path = build_method(suite, "adamerging", {}), str(tmp_path / "adamerging-seed0.json")
    before = runner.resume_state(suite, method, config, path)
    monkeypatch.setattr(runner, "sha256_file", lambda file: "edited")
    after = runner.resume_state(suite, method, config, path)
    assert before.path == after.path and before.fingerprint != after.fingerprint
    assert runner.resume_state(suite, build_method(suite, "task-arithmetic", {}), config,
                               path) is None
