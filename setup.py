"""setup.cfg holds the metadata. This file adds two things setup.cfg cannot say:
- configs/ and launch/ stay at the repository root, where users name them (configs/tiny.py,
  launch/slurm.sbatch); a wheel ships them inside the package as hmem/configs and
  hmem/launch, where `hmem.resources` finds them (`--config 160m` from any directory);
- hmem-lm-eval.pth goes into site-packages, for regular and editable installs alike, which
  lets lm-eval 0.4.13 and earlier find the `hmem` harness model (hmem/lm_eval_plugin.py
  says how)."""

import os
import sys
import sysconfig

import setuptools
from setuptools.command.editable_wheel import editable_wheel

PTH = 'hmem-lm-eval.pth'
# Wheel data files are placed relative to the environment's prefix: site-packages' place there.
SITE_PACKAGES = os.path.relpath(sysconfig.get_path('purelib'), sys.prefix)


class _WithPth:
  """An editable-install strategy that also writes the .pth at the wheel's root (editable
  wheels leave data files out)."""

  def __init__(self, strategy):
    self.strategy = strategy

  def __call__(self, wheel, files, mapping):
    self.strategy(wheel, files, mapping)
    with open(PTH) as f:
      wheel.writestr(PTH, f.read())

  def __enter__(self):
    self.strategy.__enter__()
    return self

  def __exit__(self, *exc):
    return self.strategy.__exit__(*exc)


class EditableWithPth(editable_wheel):

  def _select_strategy(self, *args, **kwargs):
    return _WithPth(super()._select_strategy(*args, **kwargs))


setuptools.setup(
    packages=[*setuptools.find_packages(include=['hmem', 'hmem.*']), 'hmem.configs', 'hmem.launch'],
    package_dir={'hmem.configs': 'configs', 'hmem.launch': 'launch'},
    package_data={'hmem.configs': ['*.py', 'paper/*.py', 'sweeps/*.py'], 'hmem.tasks': ['*.yaml', 'data/*.jsonl'],
                  'hmem.launch': ['*.sh', '*.sbatch', 'gke/*', 'beam/*']},
    data_files=[(SITE_PACKAGES, [PTH])],
    cmdclass={'editable_wheel': EditableWithPth},
)
