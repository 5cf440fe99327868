"""Scaling-law sweeps: a sweep file expands into runs (spec), which are launched (launch),
then collected into a table, fitted and plotted (collect)."""
