"""The control filesystem: typed nodes with kernel I/O semantics, the tree of DESIGN.md §4,
and the one adapter to the FUSE binding."""
