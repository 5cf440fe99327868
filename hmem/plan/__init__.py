"""Planning a run before the devices exist: the real train step compiled for N devices
from abstract shapes (plan), its per-device bytes, collectives and FLOPs, and the layout
search; `hmem plan` (commands)."""
