"""The README's method table, docs/methods.md and docs/nodes.md are what the specs generate."""
import os

from mergelab import REPO_ROOT, gen_docs


def test_generated_docs_are_current(harness):
    import nodes  # ComfyUI's, with the pack loaded

    stale = [os.path.relpath(p, REPO_ROOT) for p, text in gen_docs.generated(nodes.NODE_CLASS_MAPPINGS).items()
             if open(p, encoding="utf-8").read() != text]
    assert not stale, f"regenerate with `.venv/bin/python -m mergelab.gen_docs`: {stale}"


def test_method_table_lists_every_method(harness):
    import merge_methods
    table = gen_docs.method_table()
    for name in merge_methods.names():
        assert f"[`{name}`]" in table
    assert len(merge_methods.names()) >= 25
