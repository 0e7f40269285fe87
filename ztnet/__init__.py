"""ztnet: zero-trust egress for AI agents, enforced in the kernel with eBPF."""

__version__ = "0.1.0"
