"""Campaigns: many simulation jobs (sweeps, fuzzing, the access-rights matrix) on Dask.

The heavy dependencies (dask, pyarrow, matplotlib) are the optional `campaign` extra; only
the modules that run or report a campaign import them.
"""
