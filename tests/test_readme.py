"""README's Quickstart commands are the ones CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quickstart_commands():
  readme = (ROOT / 'README.md').read_text()
  quickstart = readme.split('## Quickstart', 1)[1].split('\n## ', 1)[0]
  return re.findall(r'```bash\n(.*?)\n```', quickstart, re.S)


def test_quickstart_has_the_main_job_and_the_test_command():
  commands = _quickstart_commands()
  assert len(commands) == 2
  assert 'clip_jax.train' in commands[0] and 'configs/demo.py' in commands[0]
  assert 'pytest' in commands[1]


def test_ci_runs_the_readme_test_command():
  ci_script = (ROOT / '.ci' / 'run').read_text()
  assert _quickstart_commands()[1].strip() in ci_script
