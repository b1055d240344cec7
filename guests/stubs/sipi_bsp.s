# BSP boot: vCPU 0 wakes the AP with APIC ID 1 by INIT-SIPI-SIPI (start vector 0x30, i.e. the
# real-mode trampoline sipi_ap.s at 0x30000), reports on probe offset 0 and halts.
        .include "stub.inc"
        .set LAPIC, 0xfee00000
        .text
        .globl _start
_start:
        mov $LAPIC, %rdi
        movl $0x1ff, 0xf0(%rdi)         # SVR: software-enable the LAPIC
        movl $(1 << 24), 0x310(%rdi)    # ICR high: destination APIC ID 1
        movl $0x4500, 0x300(%rdi)       # ICR low: INIT, level assert
        movl $0x4630, 0x300(%rdi)       # STARTUP, vector 0x30
        movl $0x4630, 0x300(%rdi)       # STARTUP again, as the MP spec says
        mov $0xb5, %eax
        PROBE_OUT 0
1:      hlt
        jmp 1b
