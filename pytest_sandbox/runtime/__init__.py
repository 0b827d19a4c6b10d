"""The processes of a sandbox: the zygote, the test process, pid 1 and cgroups."""
