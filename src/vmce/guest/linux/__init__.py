"""Stock Debian Linux as a vmce guest: material, boot protocol, snapshots, verdicts."""
