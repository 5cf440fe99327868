"""Inference bundles: the format and its checksums (format), writing one from a run's
checkpoint (export), opening one (open), reading its rows (reader), editing its bank
(edit), and a checkpoint's bank rows caught up to its step (stored); `hmem export` and
`hmem bank` (commands)."""
