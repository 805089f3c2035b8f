"""The media agent: serves backed-up disks over NBD from a read-cache filled from the repository."""
