"""Stage cache keys include the code that computes the stage (flows/stages.py: code_digest, stage_key).

Before, editing a model reused the old weights: the key of ``<data_root>/work/train/<key>`` hashed only the inputs.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from towerflow.flows import stages


@pytest.fixture
def fakepkg(tmp_path, monkeypatch):
    """A package ``fakepkg``: a imports b inside a function; b imports c; d is imported by nobody."""
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from fakepkg.b import g\n    return g()\n")
    (pkg / "b.py").write_text("import fakepkg.c\n\ndef g():\n    return 1\n")
    (pkg / "c.py").write_text("X = 1\n")
    (pkg / "d.py").write_text("Y = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for name in [m for m in sys.modules if m == "fakepkg" or m.startswith("fakepkg.")]:
        del sys.modules[name]


def test_editing_a_module_the_stage_imports_changes_the_digest(fakepkg):
    before = stages.code_digest("fakepkg.a", package="fakepkg")
    assert stages.code_digest("fakepkg.a", package="fakepkg") == before  # deterministic
    (fakepkg / "d.py").write_text("Y = 2\n")  # not imported by a: same code
    assert stages.code_digest("fakepkg.a", package="fakepkg") == before
    (fakepkg / "c.py").write_text("X = 2\n")  # a -> (lazily) b -> c
    after_c = stages.code_digest("fakepkg.a", package="fakepkg")
    assert after_c != before
    (fakepkg / "a.py").write_text(textwrap.dedent("""\
        def f():
            from fakepkg.b import g
            return g() + 1
    """))
    assert stages.code_digest("fakepkg.a", package="fakepkg") not in (before, after_c)
    assert "fakepkg.a" not in sys.modules  # found without importing the stage's module


def test_stage_key_follows_the_code_of_the_real_stages(monkeypatch):
    keys = {s: stages.stage_key(s, {"snapshot": "x"}) for s in stages.STAGE_CODE}
    assert keys["train"] != keys["build_examples"]  # the stage's name and code are part of the key
    real = stages.module_source

    def edited(module: str):
        def source(name: str):
            text = real(name)
            return text + b"\n# edited\n" if name == module and text is not None else text
        return source

    # the loss is code the train stage runs (tasks.train -> models.loss), not the example builder
    monkeypatch.setattr(stages, "module_source", edited("towerflow.models.loss"))
    assert stages.stage_key("train", {"snapshot": "x"}) != keys["train"]
    assert stages.stage_key("build_examples", {"snapshot": "x"}) == keys["build_examples"]
    # the example builder is code both run (train loads its examples)
    monkeypatch.setattr(stages, "module_source", edited("towerflow.tasks.build_examples"))
    assert stages.stage_key("build_examples", {"snapshot": "x"}) != keys["build_examples"]
    assert stages.stage_key("train", {"snapshot": "x"}) != keys["train"]
    # the ranker's model is code its training stage runs (tasks.train_ranker -> models.ranker)
    ranker_key = stages.stage_key("train_ranker", {"snapshot": "x"})
    monkeypatch.setattr(stages, "module_source", edited("towerflow.models.ranker"))
    assert stages.stage_key("train_ranker", {"snapshot": "x"}) != ranker_key
    assert stages.stage_key("build_examples", {"snapshot": "x"}) == keys["build_examples"]
    # and the inputs still count
    monkeypatch.setattr(stages, "module_source", real)
    assert stages.stage_key("train", {"snapshot": "y"}) != keys["train"]
