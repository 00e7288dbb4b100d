"""The documentation: every page's code runs, and every public name is documented.

Each page under docs/ is run on its own (its ```python blocks in order, in one namespace);
a page that starts with ``<!-- continues: other.md -->`` runs that page's blocks first, as
its text says. The coverage check is optax's: a public name without a docstring, or without
an autodoc entry on an API page, fails the suite.
"""

import re
from pathlib import Path

import pytest

import ddp_jax
from ddp_jax import hooks, inspect

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")
               if "_build" not in p.parts)
PYTHON = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
CONTINUES = re.compile(r"<!-- continues: (\S+) -->")


def _blocks(page: str) -> list[tuple[str, str]]:
  text = (DOCS / page).read_text()
  before = []
  for parent in CONTINUES.findall(text):
    before += _blocks(parent)
  return before + [(page, block) for block in PYTHON.findall(text)]


@pytest.mark.parametrize("page", [p for p in PAGES if PYTHON.search((DOCS / p).read_text())])
def test_page_code_runs(page, standard_promotion):
  namespace: dict = {}
  for source, block in _blocks(page):
    exec(compile(block, f"docs/{source}", "exec"), namespace)  # noqa: S102


def test_the_guides_have_code():
  """The pages that teach an API show it (and so run it)."""
  for page in ("getting_started.md", "training_step.md", "hooks.md", "semantics.md",
               "checkpoints.md", "how_it_works.md"):
    assert PYTHON.search((DOCS / page).read_text()), page


def _public():
  names = [(f"ddp_jax.{n}", getattr(ddp_jax, n)) for n in ddp_jax.__all__
           if n not in ("hooks", "inspect")]
  names += [(f"ddp_jax.hooks.{n}", getattr(hooks, n)) for n in hooks.__all__]
  names += [(f"ddp_jax.inspect.{n}", getattr(inspect, n)) for n in inspect.__all__]
  return names


def _api_entries() -> set[str]:
  """Fully qualified names with an autodoc entry, each under its page's currentmodule."""
  found = set()
  for page in (DOCS / "api").glob("*.md"):
    module = ""
    for line in page.read_text().splitlines():
      if m := re.match(r"\.\. currentmodule:: (\S+)", line):
        module = m.group(1)
      elif m := re.match(r"\.\. auto(?:function|class):: (\S+)", line):
        found.add(m.group(1) if m.group(1).startswith("ddp_jax.") else f"{module}.{m.group(1)}")
  return found


@pytest.mark.parametrize("name,obj", _public(), ids=[n for n, _ in _public()])
def test_public_name_has_a_docstring_and_an_api_entry(name, obj):
  doc = (obj.__doc__ or "").strip()
  assert len(doc) >= 20, f"{name} has no docstring (or a stub): write one."
  module, short = name.rsplit(".", 1)
  assert name in _api_entries(), (
      f"{name} has no entry on the API pages (docs/api/*.md): add '.. autofunction:: {short}' "
      f"(or autoclass) under '.. currentmodule:: {module}'.")


def test_every_page_is_in_a_toctree():
  index = (DOCS / "index.md").read_text() + (DOCS / "api" / "index.md").read_text()
  for page in PAGES:
    stem = page[:-3]
    if stem in ("index", "api/index"):
      continue
    assert re.search(rf"^{re.escape(stem.split('/')[-1])}$", index, flags=re.M), (
        f"docs/{page} is in no toctree (docs/index.md or docs/api/index.md).")
