"""`python -m hmem.tasks`: prints the directory to pass to `lm_eval --include_path`."""

from hmem.tasks import DIR

print(DIR)
