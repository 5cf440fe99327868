"""The quickstart: prepare a corpus, pretrain an anchor, co-train memory and a dense baseline
from it, export and evaluate (run); `hmem quickstart` (commands)."""
