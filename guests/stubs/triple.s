# ud2 with no IDT: the #UD cannot be delivered, the vCPU triple-faults (KVM_EXIT_SHUTDOWN).
        .text
        .globl _start
_start:
        ud2
