"""The README's code runs, and CI runs the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_python_blocks_run(standard_promotion):
  blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
  assert len(blocks) >= 2  # the training step and a hook
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
  assert namespace["opt_state"] is not None and namespace["psgd_state"] is not None


def test_ci_runs_the_readme_test_command():
  commands = re.findall(r"^(pip install .*?)\s+#", README, flags=re.M)
  test_command = [c for c in commands if "pytest" in c]
  assert len(test_command) == 1
  ci = (ROOT / ".ci" / "run").read_text()
  assert test_command[0].strip() in ci


def test_ci_builds_the_docs_with_the_readme_command():
  """The docs site is built in CI with warnings as errors, by the command the README gives."""
  commands = re.findall(r"^(pip install .*?)\s+#", README, flags=re.M)
  docs_command = [c for c in commands if "sphinx-build" in c]
  assert len(docs_command) == 1 and " -W " in docs_command[0]
  assert docs_command[0].strip() in (ROOT / ".ci" / "run").read_text()
