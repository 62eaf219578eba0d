"""Network emulation: a fault-injecting TCP proxy (userspace) and, later, kernel layers."""
