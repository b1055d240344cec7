# Real-mode AP trampoline (linked at 0x30000): the first instructions an AP runs after its
# SIPI. It ends the VM with exit code 0x1234.
        .code16
        .text
        .globl _start
_start:
        mov $0x501, %dx
        mov $0x1234, %ax
        out %ax, %dx
1:      hlt
        jmp 1b
