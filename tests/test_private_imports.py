"""A helper one module of train, instruct, eval or corpus shares with another is public: no module
there imports another module's ``_private`` name, nor reads one through an imported interleaf module
(``from interleaf.corpus import engine as E`` then ``E._helper``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import interleaf

PACKAGES = ("train", "instruct", "eval", "corpus")


def test_no_module_imports_a_private_name_of_another():
    root = Path(interleaf.__file__).parent
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("interleaf"):
                    found += [
                        f"{path.relative_to(root)}:{node.lineno}: {node.module}.{alias.name}"
                        for alias in node.names
                        if alias.name.startswith("_") and not alias.name.startswith("__")
                    ]
    assert not found, found


def _is_module(root: Path, dotted: str) -> bool:
    """Whether ``dotted`` names a module or package of interleaf."""
    head, *parts = dotted.split(".")
    path = root.joinpath(*parts)
    return head == "interleaf" and (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file())


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; None for anything but a chain of names."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return [node.id, *reversed(names)] if isinstance(node, ast.Name) else None


def _private_module_attributes(root: Path, path: Path, source: str) -> list[str]:
    """The ``module._name`` reads in ``source`` (module ``path``) of another interleaf module's private name."""
    rel = path.relative_to(root)
    this = ".".join(("interleaf", *rel.with_suffix("").parts)).removesuffix(".__init__")
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    tree = ast.parse(source)
    modules: dict[str, str] = {}  # local name -> the interleaf module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "interleaf":
                    modules[alias.asname or "interleaf"] = alias.name if alias.asname else "interleaf"
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: package.count(".") + 2 - node.level]
                base = ".".join([*up, base] if base else up)
            if base.split(".")[0] == "interleaf":
                for alias in node.names:
                    if _is_module(root, f"{base}.{alias.name}"):
                        modules[alias.asname or alias.name] = f"{base}.{alias.name}"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain = _dotted(node.value)
            if chain and chain[0] in modules:
                module = ".".join([modules[chain[0]], *chain[1:]])
                if module != this and _is_module(root, module):
                    found.append(f"{rel}:{node.lineno}: {module}.{node.attr}")
    return found


def test_no_module_reads_a_private_name_through_another_module():
    root = Path(interleaf.__file__).parent
    found = [
        hit
        for package in PACKAGES
        for path in sorted((root / package).rglob("*.py"))
        for hit in _private_module_attributes(root, path, path.read_text(encoding="utf-8"))
    ]
    assert not found, found


def test_the_private_attribute_check_sees_every_import_form():
    root = Path(interleaf.__file__).parent
    source = (
        "import interleaf.corpus.engine as E\n"
        "import interleaf.corpus.dedup\n"
        "from interleaf.corpus import pipeline as P\n"
        "from . import filters\n"
        "from .engine import shard_name\n"
        "from interleaf.corpus import fetch\n"
        "E._a()\n"
        "interleaf.corpus.dedup._b\n"
        "P._c\n"
        "filters._d\n"
        "E.public, E.__name__, shard_name._e, other._f, fetch._g\n"
    )
    # as though it were corpus/fetch.py: ``from . import`` resolves in corpus, fetch._g is its own
    hits = _private_module_attributes(root, root / "corpus" / "fetch.py", source)
    assert sorted(hit.split(": ", 1)[1] for hit in hits) == [
        "interleaf.corpus.dedup._b",
        "interleaf.corpus.engine._a",
        "interleaf.corpus.filters._d",
        "interleaf.corpus.pipeline._c",
    ]


def test_the_helpers_lcl_shares_with_train_data_are_public(tmp_path):
    from interleaf.train.data import SkipSample, image_file, parse_line, row_id

    assert parse_line('{"id": 3}') == {"id": 3}
    with pytest.raises(SkipSample) as exc:
        parse_line("{")
    assert exc.value.reason == "bad_json"
    assert row_id({"general_metadata": '{"id": "d1"}', "id": "x"}) == "d1"
    assert image_file("a.png", {"bytes_path": "images/ab"}, tmp_path / "f", tmp_path) == (
        str(tmp_path / "images/ab"),
        True,
    )
    assert image_file("a.png", None, tmp_path, tmp_path / "build") == (str(tmp_path / "a.png"), False)
