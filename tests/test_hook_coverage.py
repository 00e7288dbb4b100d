"""Every hook a user can name is tested by the shared battery and documented: adding a hook
means one file, one battery entry and one row of the hook table in docs/hooks.md, and this fails
when either of the last two is missing."""

import inspect
import re
from pathlib import Path

import pytest

from ddp_jax import hooks
from tests.test_hooks import HOOKS

HOOKS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "hooks.md"

# Factories the 1-D battery cannot run, and where they are tested instead.
ELSEWHERE = {
    "hierarchical": "tests/test_hierarchical.py (needs a 2-D mesh)",
    "noop": "no communication: nothing to compare with the mean (tests/test_sync.py)",
}


@pytest.mark.parametrize("name", hooks.FACTORIES)
def test_every_hook_is_in_the_battery(name):
  if name in ELSEWHERE:
    pytest.skip(ELSEWHERE[name])
  used = {key for key, (f, _) in HOOKS.items()
          if f is getattr(hooks, name) or re.search(rf"\bhooks\.{name}\(", inspect.getsource(f)
                                                    if f.__name__ == "<lambda>" else "")}
  assert used, (f"hooks.{name} is exported but not in tests/test_hooks.py's HOOKS battery; "
                "add an entry (factory, tolerance).")


@pytest.mark.parametrize("name", hooks.FACTORIES)
def test_every_hook_is_in_the_docs_hook_table(name):
  table = HOOKS_PAGE.read_text().split("| hook | what it does |", 1)[1].split("\n\n", 1)[0]
  assert re.search(rf"`{name}\(", table), (
      f"hooks.{name} is missing from the hook table in docs/hooks.md (| hook | what it does | ...).")


def test_exceptions_are_real_hooks():
  assert set(ELSEWHERE) <= set(hooks.FACTORIES)
