# Every vCPU prints "hello from vCPU <n>" on COM1 under a spinlock, then counts itself in;
# vCPU 0 waits for all (boot info qword 0 = vCPU count) and exits with code 0. Others halt.
        .include "stub.inc"
        .set LOCK, SCRATCH
        .set ARRIVED, SCRATCH + 8
        .text
        .globl _start
_start:
        mov %rdi, %r15
        mov (%rsi), %r14
1:      mov $1, %eax
        xchg %eax, LOCK                 # implicitly locked
        test %eax, %eax
        jnz 1b
        lea message(%rip), %rsi
2:      movzbl (%rsi), %eax
        test %al, %al
        jz 3f
        call putc
        inc %rsi
        jmp 2b
3:      mov %r15d, %eax
        add $'0', %eax
        call putc
        mov $'\n', %eax
        call putc
        movl $0, LOCK
        lock incl ARRIVED
        test %r15, %r15
        jnz 5f
4:      mov ARRIVED, %eax
        cmp %r14d, %eax
        jne 4b
        EXIT 0
5:      hlt
        jmp 5b

# putc(%al): wait for THRE, then write THR.
putc:
        mov %eax, %r8d
        mov $(COM1 + 5), %dx
6:      in %dx, %al
        test $0x20, %al
        jz 6b
        mov $COM1, %dx
        mov %r8d, %eax
        out %al, %dx
        ret

message:
        .asciz "hello from vCPU "
