# The guest loop of the MSR-exit benchmark: [RSI] = iterations, [RSI+8] = the MSR to read.
# It reads the MSR that many times, then writes 1 to port 0x80 and halts. The same flat binary
# runs under vmce and under the benchmark's C program, so both answer the same exits.
        .text
        .globl _start
_start:
        mov     (%rsi), %rbx
        mov     8(%rsi), %rcx
1:      rdmsr
        dec     %rbx
        jnz     1b
        mov     $1, %eax
        out     %al, $0x80
2:      hlt
        jmp     2b
