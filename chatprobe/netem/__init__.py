"""Network emulation: a fault-injecting TCP proxy (userspace) and a kernel layer
(network namespaces, nftables, tc) where chatprobe runs as root on Linux."""
