"""Xen save formats: HVM context records and (later) the libxc migration stream."""
