"""vmce: a Xen-style virtual Machine Check Architecture for KVM guests, in Python.

Layers, each importing only the ones before it:
``mca`` (architecture) -> ``vmce`` (the model) -> ``host`` (host error sources)
-> ``save`` (Xen save formats) -> ``kvm`` (the VMM) -> ``guest`` (guest images) -> ``cli``.
"""

__version__ = "0.1.0"
