"""The pod network: published ports on host loopback (forward.py); the pod itself is the pod zygote's."""
