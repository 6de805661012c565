"""The control filesystem: typed nodes with kernel I/O semantics, the tree of docs/control-files.md §10,
and the one adapter to the FUSE binding."""
