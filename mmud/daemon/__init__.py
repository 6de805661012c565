"""The daemon layer: the simulation process, the request/snapshot protocol between it and the
main process, and the lifecycle (mount point, sd_notify, shutdown).  It never imports the
filesystem layer; the CLI hands it the function that serves the mount."""
