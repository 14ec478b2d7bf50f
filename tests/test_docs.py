"""The layout a newcomer reads: the README is a front page, docs/config.md matches the code,
every link resolves, docs cite only files in the repository, and the modules form no cycle."""
import dataclasses
import os
import re
import typing

import grimp

from tools import gen_config_doc
from vlp.config import Config
from vlp.registry import field_comments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + [
    os.path.join(d, f) for d, _, files in os.walk(os.path.join(ROOT, "docs")) for f in files if f.endswith(".md")
]


def test_readme_is_a_front_page():
    assert os.path.getsize(os.path.join(ROOT, "README.md")) <= 12 * 1024


def test_config_doc_is_generated_from_the_code():
    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        assert f.read() == gen_config_doc.render(), "run: python tools/gen_config_doc.py"


def test_every_run_config_key_has_a_meaning():
    missing = []

    def walk(cls, prefix):
        notes = field_comments(cls)
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
            elif not notes.get(f.name) and prefix:
                missing.append(f"{prefix}{f.name}")

    walk(Config, "")
    assert not missing, f"fields without a comment (their meaning in docs/config.md): {missing}"


def test_links_resolve_and_docs_cite_only_the_repository():
    broken, outside = [], []
    for path in DOCS:
        text = open(path).read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), target))):
                broken.append(f"{os.path.relpath(path, ROOT)} -> {target}")
        if "../shared" in text or re.search(r"\bDESIGN\.md|\bSTYLE\.md", text):
            outside.append(os.path.relpath(path, ROOT))
    for d, _, files in os.walk(os.path.join(ROOT, "vlp")):
        for f in files:
            if f.endswith(".py") and re.search(r"\.\./shared|\bDESIGN\.md|\bSTYLE\b", open(os.path.join(d, f)).read()):
                outside.append(os.path.relpath(os.path.join(d, f), ROOT))
    assert not broken and not outside, (broken, outside)


def find_cycle(edges):
    """One cycle of the directed graph ``edges`` (module -> modules it imports) as a list, or [].
    A submodule importing its own package is not counted (the package's __init__ runs first)."""
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open" and not m.startswith(n + "."):
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n, stack + [n])
                if found:
                    return found
        state[m] = "done"
        return []

    for m in sorted(edges):
        found = [] if m in state else visit(m, [m])
        if found:
            return found
    return []


def test_no_import_cycles():
    """Between any two vlp modules, function-level imports included (import-linter checks the layers)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail
    assert find_cycle({"p.x": {"p"}, "p": {"p.x"}}) == []
    graph = grimp.build_graph("vlp")
    edges = {m: graph.find_modules_directly_imported_by(m) & graph.modules for m in graph.modules}
    cycle = find_cycle(edges)
    assert not cycle, " -> ".join(cycle)
