"""The README is a user's document: its method example runs as printed, and it stays short."""

import os
import re
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_the_adding_a_method_example_merges():
    section = readme().split("## Adding a method", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("my_pkg_soup")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    soup = module.HalfSoup.create(lam="0.5")
    pretrained = {"w": torch.zeros(3), "b": torch.ones(2)}
    finetuned = {"a": {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.ones(2)},
                 "c": {"w": torch.tensor([3.0, 2.0, 1.0]), "b": torch.full((2,), 3.0)}}
    result = soup.merge(pretrained, finetuned)
    assert torch.equal(result.base["w"], torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(result.base["b"], torch.full((2,), 1.5))


def test_the_readme_is_at_most_350_lines_and_names_only_files_in_the_repository():
    text = readme()
    assert len(text.splitlines()) <= 350
    for path in re.findall(r"\]\(([^)#]+)\)", text):
        assert os.path.exists(os.path.join(ROOT, path)), path
    assert "shared/" not in text
