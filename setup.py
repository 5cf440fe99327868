"""setup.cfg holds the metadata; this installs hmem-lm-eval.pth into site-packages (for
regular and editable installs alike), which lets lm-eval 0.4.13 and earlier find the `hmem`
harness model (hmem/lm_eval_plugin.py says how)."""

import os
import sys
import sysconfig

from setuptools import setup

# Wheel data files are placed relative to the environment's prefix: site-packages' place there.
SITE_PACKAGES = os.path.relpath(sysconfig.get_path('purelib'), sys.prefix)

setup(data_files=[(SITE_PACKAGES, ['hmem-lm-eval.pth'])])
