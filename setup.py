"""configs/ and launch/ stay at the repository root, where users name them (configs/tiny.py,
launch/slurm.sbatch); a wheel ships them inside the package as hmem/configs and hmem/launch,
where `hmem.resources` finds them (`--config 160m` from any directory). Everything else is in
setup.cfg."""

import setuptools

setuptools.setup(
    packages=[*setuptools.find_packages(include=['hmem', 'hmem.*']), 'hmem.configs', 'hmem.launch'],
    package_dir={'hmem.configs': 'configs', 'hmem.launch': 'launch'},
    package_data={'hmem.configs': ['*.py', 'paper/*.py', 'sweeps/*.py'],
                  'hmem.launch': ['*.sh', '*.sbatch', 'gke/*']},
)
