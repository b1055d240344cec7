# MSR round trip through the VMM's MsrHandler (test_kvm_msr.py).
# Probe offsets: 0/1 = rdmsr 0x179 (eax/edx), 2/3 = rdmsr 0x17a after wrmsr, 4 = marker after
# the #GP'd rdmsr 0x401, 5 = marker after the #GP'd wrmsr 0x402, 8 = #GP error code,
# 9 = #GP RIP (low 32 bits), 10 = the faulting opcode's address it should match.
        .include "stub.inc"
        .text
        .globl _start
_start:
        SET_GATE 13, gp_handler
        LOAD_IDT
        mov $0x179, %ecx
        rdmsr
        PROBE_OUT 0
        mov %edx, %eax
        PROBE_OUT 1
        mov $0x17a, %ecx
        mov $0xdeadbeef, %eax
        mov $0x5, %edx
        wrmsr
        mov $0x17a, %ecx
        rdmsr
        PROBE_OUT 2
        mov %edx, %eax
        PROBE_OUT 3
        lea faulting_rdmsr(%rip), %rax
        PROBE_OUT 10
        mov $0x401, %ecx
faulting_rdmsr:
        rdmsr
        mov $0x4444, %eax
        PROBE_OUT 4
        mov $0x402, %ecx
        mov $1, %eax
        xor %edx, %edx
        wrmsr
        mov $0x5555, %eax
        PROBE_OUT 5
        EXIT 0

# #GP: report the error code and RIP, skip the 2-byte rdmsr/wrmsr, return.
gp_handler:
        mov (%rsp), %rax
        PROBE_OUT 8
        mov 8(%rsp), %rax
        PROBE_OUT 9
        addq $2, 8(%rsp)
        add $8, %rsp
        iretq
