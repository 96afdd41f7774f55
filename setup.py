"""clip_jax: CLIP and SigLIP training in JAX/Flax, interchangeable with OpenCLIP."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent


def requirements(name: str) -> list[str]:
  lines = (HERE / name).read_text().splitlines()
  return [line.strip() for line in lines if line.strip() and not line.startswith(('#', '-r'))]


setup(
    name='clip_jax',
    version='0.1.0',
    description=__doc__,
    long_description=(HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['clip_jax', 'clip_jax.*']),
    package_data={'clip_jax.data': ['assets/*'], 'clip_jax.eval': ['assets/*']},
    python_requires='>=3.10',
    install_requires=requirements('requirements.txt'),
    extras_require={'test': requirements('requirements-test.txt')},
    license='Apache-2.0',
)
