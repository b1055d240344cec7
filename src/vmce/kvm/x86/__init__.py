"""x86-64 specifics: CPUID, boot layout, page tables, GDT and long-mode entry state."""
