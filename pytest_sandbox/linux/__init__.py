"""The Linux layer: syscalls, user namespaces, mounts, overlays, the root filesystem.

Imports nothing above it and nothing of pytest (only the image format constants).
"""
