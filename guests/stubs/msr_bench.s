# Exit-cost loops (experiments). Boot info: qword 0 = iterations. Probe offset 0 gets a marker
# (1..5) before each phase and 6 at the end; the VMM timestamps them. Then the vCPU halts
# (the VMM stops the VM once every vCPU has reported 6).
        .include "stub.inc"
        .text
        .globl _start
_start:
        mov (%rsi), %r12
        # 1: filtered RDMSR (MCG_CAP) -> user space
        mov $1, %eax
        PROBE_OUT 0
        mov %r12, %rbx
1:      mov $0x179, %ecx
        rdmsr
        dec %rbx
        jnz 1b
        # 2: OUT to an unclaimed port -> user space
        mov $2, %eax
        PROBE_OUT 0
        mov %r12, %rbx
2:      out %al, $0x81
        dec %rbx
        jnz 2b
        # 3: RDMSR of IA32_TSC, answered in the kernel
        mov $3, %eax
        PROBE_OUT 0
        mov %r12, %rbx
3:      mov $0x10, %ecx
        rdmsr
        dec %rbx
        jnz 3b
        # 4: filtered WRMSR (MCG_STATUS) -> user space
        mov $4, %eax
        PROBE_OUT 0
        mov %r12, %rbx
4:      mov $0x17a, %ecx
        xor %eax, %eax
        xor %edx, %edx
        wrmsr
        dec %rbx
        jnz 4b
        # 5: an emulated dec/jnz loop with no exit, 10x the iterations
        mov $5, %eax
        PROBE_OUT 0
        imul $10, %r12, %rbx
5:      dec %rbx
        jnz 5b
        mov $6, %eax
        PROBE_OUT 0
6:      hlt
        jmp 6b
