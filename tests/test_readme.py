"""README's Quickstart commands are the ones CI runs; the commands of README and docs/ exist.

The README is the front page and `docs/*.md` the manual. The commands they show are
followed: every `python -m clip_jax.X` names a module that exists and flags it defines,
every `--config.KEY` a key of the base config, every repository path a file that is there,
and every relative link (with its `#anchor`) a page and heading that are there.
"""

import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / 'docs').glob('*.md'))
PAGES = [ROOT / 'README.md', *DOCS]


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


def test_ci_runs_the_cuda_lowering_test_in_its_own_venv_and_the_main_run_leaves_it_out():
  """tests/test_cuda_lowering.py needs a CUDA jaxlib the test extra lacks: collected by the
  main run it would fail, so pytest.ini leaves it out there and CI runs it in .venv-cuda
  with jax[cuda13] at the main venv's jax version."""
  ci_script = (ROOT / '.ci' / 'run').read_text()
  cuda_line = next(line for line in ci_script.splitlines() if 'tests/test_cuda_lowering.py' in line
                   and not line.startswith('#'))
  assert '.venv-cuda/bin/python -m pytest' in cuda_line
  assert '"jax[cuda13]==$JAX_VERSION"' in cuda_line
  assert "JAX_VERSION=$(.venv/bin/python -c 'import jax; print(jax.__version__)')" in ci_script
  ini = (ROOT / 'pytest.ini').read_text()
  assert re.search(r'^addopts\s*=.*--ignore=tests/test_cuda_lowering\.py', ini, re.M)
  assert '.venv*/' in (ROOT / '.gitignore').read_text().splitlines()


def test_readme_is_a_front_page_that_links_every_doc_page():
  readme = (ROOT / 'README.md').read_text()
  assert len(readme.splitlines()) <= 250
  assert DOCS, 'docs/ holds no page'
  for page in DOCS:
    assert f'](docs/{page.name}' in readme, f'README does not link docs/{page.name}'
  # The README's Tests section keeps the test command (CI runs the Quickstart's form).
  tests = readme.split('\n## Tests', 1)[1].split('\n## ', 1)[0]
  assert 'ruff check . && mypy && python -m pytest -n 2 -q' in tests


def _slug(heading):
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
  text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
  return text.replace(' ', '-')


def _anchors(page):
  text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)
  return {_slug(h) for h in re.findall(r'^#{1,6} (.+)$', text, re.M)}


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page):
  for target in re.findall(r'\]\(([^)\s]+)\)', page.read_text()):
    if re.match(r'[a-z]+:', target):
      continue  # https:, local-dir:, ...
    path, _, anchor = target.partition('#')
    linked = (page.parent / path).resolve() if path else page
    assert linked.exists(), f'{page.name}: link to missing {target}'
    if anchor:
      assert anchor in _anchors(linked), f'{page.name}: no heading for #{anchor} in {path}'


def _commands(text):
  """Shell commands of the fenced bash blocks and of inline code spans, one string each."""
  blocks = re.findall(r'```bash\n(.*?)```', text, re.S)
  inline = re.findall(r'(?<!`)`([^`]+)`(?!`)', re.sub(r'```.*?```', '', text, flags=re.S))
  commands = []
  for chunk in [*blocks, *inline]:
    chunk = chunk.replace('\\\n', ' ')
    for line in chunk.splitlines():
      line = re.sub(r'(^|\s)#.*$', '', line)  # comments
      commands += [c.strip() for c in re.split(r'&&|;|\|', line) if c.strip()]
  return commands


def _clip_jax_calls():
  """(page, module, [args]) for every `python -m clip_jax.X ...` of README and docs/."""
  calls = []
  for page in PAGES:
    for command in _commands(page.read_text()):
      match = re.search(r'python3? -m (clip_jax(?:\.\w+)*)(.*)', command)
      if not match:
        continue
      try:
        args = shlex.split(match.group(2))
      except ValueError:  # an unbalanced quote of a code span cut at a line
        args = match.group(2).split()
      calls.append((page.name, match.group(1), args))
  return calls


def _module_source(module):
  """The module's source, with clip_jax/cli.py's (flags the binaries share, e.g. --config)."""
  path = ROOT / pathlib.Path(*module.split('.'))
  for candidate in (path.with_suffix('.py'), path / '__main__.py'):
    if candidate.exists():
      return candidate.read_text() + (ROOT / 'clip_jax' / 'cli.py').read_text()
  return None


def _flag_names(args):
  for arg in args:
    match = re.match(r'\[?--([\w.]+)', arg)
    if match:
      yield match.group(1)


def _placeholder(name):
  """KEY, NAME, X: a name the reader fills in."""
  return name.isupper()


def _config_keys():
  from clip_jax.config_base import base_config

  def flatten(config, prefix=''):
    keys = set()
    for name, value in config.items():
      keys.add(prefix + name)
      if hasattr(value, 'items') and not isinstance(value, dict):
        keys |= flatten(value, f'{prefix}{name}.')
    return keys

  return flatten(base_config())


def test_documented_commands_name_modules_and_flags_that_exist():
  calls = _clip_jax_calls()
  assert len(calls) > 30  # the README's and the docs' commands are all read
  config_keys = _config_keys()
  problems = []
  for page, module, args in calls:
    if _placeholder(module.rpartition('.')[2]):
      continue  # python -m clip_jax.X
    source = _module_source(module)
    if source is None:
      problems.append(f'{page}: python -m {module}: no such module')
      continue
    for flag in _flag_names(args):
      if flag.startswith('config.'):
        key = flag[len('config.'):]
        if not _placeholder(key) and key not in config_keys:
          problems.append(f'{page}: {module} --{flag}: no such config key')
        continue
      names = {flag, flag[2:]} if flag.startswith('no') else {flag}
      if not any(f"'--{n}'" in source or f"'{n}'" in source for n in names):
        problems.append(f'{page}: {module} --{flag}: the module defines no such flag')
  assert not problems, '\n'.join(problems)


def test_every_config_key_named_in_the_text_exists():
  keys = _config_keys()
  for page in PAGES:
    text = re.sub(r'```\n.*?```', '', page.read_text(), flags=re.S)  # sample output: typos
    named = set(re.findall(r'--config\.([\w.]+)=', text))
    unknown = sorted(k for k in named if not _placeholder(k) and k not in keys)
    assert not unknown, f'{page.name}: no such config keys: {unknown}'


def test_every_command_line_tool_is_documented():
  documented = {module for _, module, _ in _clip_jax_calls()}
  tools = {'.'.join(p.relative_to(ROOT).with_suffix('').parts)
           for p in (ROOT / 'clip_jax').rglob('*.py') if "__name__ == '__main__'" in p.read_text()}
  assert tools and tools <= documented, sorted(tools - documented)


# Paths to repository files named in the text: configs/demo.py, launch/tpu_vm.sh, ...
_PATH = re.compile(r'(?<![\w/.~$-])((?:configs|launch|bench|tests|clip_jax|colabs|docs)/'
                   r'[\w./-]*\w\.(?:py|sh|sbatch|md|ipynb))')


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_repository_paths_exist(page):
  named = {p for p in _PATH.findall(page.read_text())
           if not any(_placeholder(pathlib.Path(part).stem) for part in p.split('/'))}
  missing = sorted(p for p in named if not (ROOT / p).exists())
  assert not missing, f'{page.name} names missing files: {missing}'


def test_launch_scripts_are_documented_with_their_settings():
  launching = (ROOT / 'docs' / 'launching.md').read_text()
  for setting in ('TPU_SPOT', 'REPO_REF', 'VENV', '--gpus-per-node', '.venv/bin/python',
                  'PYTHON', 'git push'):
    assert setting in launching, setting
