"""What mmud shows its users, and nothing that runs: the names, formats and parsers of its
control files — module parameters and their kernel parsers, statistic names and kinds, the
injectable bugs, the isolation map syntax.

Like the kernel's include/uapi, it sits below everything else and imports nothing of mmud's
simulation (and no numpy), so the filesystem process can parse a write and refuse it with
the kernel's errno without loading the simulated machine.
"""
