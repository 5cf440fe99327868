"""Bundles: the exported format, export from a run, open, read rows, edit, and a checkpoint's bank read in place."""
