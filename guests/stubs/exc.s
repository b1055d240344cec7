# Exception/CPL3 playground for the injection tests and the kvm_pvm experiments.
#
# Boot info: qword 0 = mode, qword 1 = parameter, qword 2 = 1 if handlers return (iretq)
# instead of ending the VM with exit code 0x100 + vector.
# Modes: 0 halt loop, 1 CPL0 spin, 2 int3 at CPL0, 3 enter CPL3 (parameter = user action),
#        4 rdtsc at CPL0, 5 ud2 at CPL0, 6 int $0x80 at CPL0.
# User actions (mode 3): 0 spin (incrementing the qword at SCRATCH + 0x100 + 8 * index),
#        1 int $0x80 (DPL3 gate), 2 hlt, 3 cli, 4 ud2, 5 out with IOPL=3, 6 out with IOPL=0,
#        7 rdtsc twice (stored at SCRATCH + 0x200), then ud2, 8 load from an unmapped
#        address, 9 syscall, 10 spin with IF=1 while the LAPIC timer (vector 0x40, initial
#        count = qword 3) runs, 11 int3, 12 int $0x81 (DPL3 gate), 13 rdtsc qword-3 times
#        (first and last value stored at SCRATCH + 0x200/0x208), then ud2.
# Mode 7: the same rdtsc loop at CPL0, values to probe offsets 20..23, then exit 0.
#
# Handler report (probe offsets): 0 vector, 1 error code, 2/3 saved RIP, 4 saved CS,
# 5 saved RFLAGS, 6/7 saved RSP, 8 saved SS, 9/10 RSP at the hardware frame's top (what
# RSP0 must be after a stack switch), 11 handler CS, 16/17 CR2.
# Guest markers: 12 data from user code, 13 markers, 14 heartbeat, 15 ready (0x600d),
# 18/19 CS/SS seen by the SYSCALL target, 20..23 rdtsc values at CPL0.
        .include "stub.inc"
        .set LAPIC, 0xfee00000
        .set HEARTBEAT_MASK, 0x3ff
        .text
        .globl _start
_start:
        mov %rdi, %r15                  # vCPU index
        mov %rsi, %r14                  # boot info
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        SET_GATE \v, vec\v
        .endr
        SET_GATE 0x40, vec64
        SET_GATE 0x80, vec128, 0xee
        SET_GATE 0x81, vec129, 0xee
        LOAD_IDT
        mov (%r14), %rax
        cmp $0, %rax
        je mode_halt
        cmp $1, %rax
        je mode_spin0
        cmp $2, %rax
        je mode_int3
        cmp $3, %rax
        je mode_user
        cmp $4, %rax
        je mode_rdtsc0
        cmp $5, %rax
        je mode_ud2
        cmp $6, %rax
        je mode_int80
        cmp $7, %rax
        je mode_rdtsc_loop0
        EXIT 0xbad

mode_halt:
        mov $0x600d, %eax
        PROBE_OUT 15
1:      hlt
        mov $1, %eax
        PROBE_OUT 14
        jmp 1b

mode_spin0:
        mov $0x600d, %eax
        PROBE_OUT 15
        xor %rbx, %rbx
1:      inc %rbx
        test $HEARTBEAT_MASK, %rbx
        jnz 1b
        mov %ebx, %eax
        PROBE_OUT 14
        jmp 1b

mode_int3:
        int3
        mov $0x3333, %eax
        PROBE_OUT 13
        EXIT 0

mode_rdtsc0:
        rdtsc
        PROBE_OUT 20
        mov %edx, %eax
        PROBE_OUT 21
        rdtsc
        PROBE_OUT 22
        mov %edx, %eax
        PROBE_OUT 23
        EXIT 0

mode_rdtsc_loop0:
        mov 24(%r14), %rcx
        rdtsc
        PROBE_OUT 20
        mov %edx, %eax
        PROBE_OUT 21
1:      rdtsc
        dec %rcx
        jnz 1b
        PROBE_OUT 22
        mov %edx, %eax
        PROBE_OUT 23
        EXIT 0

mode_ud2:
        ud2
        mov $0x6666, %eax
        PROBE_OUT 13
        EXIT 0

mode_int80:
        int $0x80
        mov $0x8080, %eax
        PROBE_OUT 13
        EXIT 0

mode_user:
        mov 8(%r14), %rax
        cmp $9, %rax
        jne 1f
        call setup_syscall
        mov 8(%r14), %rax
1:      cmp $10, %rax
        jne 2f
        call setup_timer
        mov 8(%r14), %rax
2:      lea user_actions(%rip), %rbx
        mov (%rbx, %rax, 8), %rbx       # user RIP
        lea user_rflags(%rip), %rcx
        mov (%rcx, %rax, 8), %rcx       # user RFLAGS
        mov %r15, %rdx
        shl $14, %rdx
        neg %rdx
        add $0x90000, %rdx              # user stack: 0x90000 - index * 16 KiB
        mov $0x5e7, %eax                # marker: about to iretq to CPL3
        PROBE_OUT 13
        pushq $USER_DS
        push %rdx
        push %rcx
        pushq $USER_CS
        push %rbx
        iretq

setup_syscall:
        mov $0xc0000080, %ecx           # EFER.SCE
        rdmsr
        or $1, %eax
        wrmsr
        mov $0xc0000081, %ecx           # STAR: SYSCALL CS 0x10, SYSRET base 0x20
        xor %eax, %eax
        mov $0x00200010, %edx
        wrmsr
        mov $0xc0000082, %ecx           # LSTAR
        lea syscall_entry(%rip), %rax
        mov %rax, %rdx
        shr $32, %rdx
        wrmsr
        mov $0xc0000084, %ecx           # FMASK: keep every flag
        xor %eax, %eax
        xor %edx, %edx
        wrmsr
        ret

setup_timer:
        mov $LAPIC, %rdi
        movl $0x1ff, 0xf0(%rdi)         # SVR: enable, spurious vector 0xff
        movl $0xb, 0x3e0(%rdi)          # divide by 1
        movl $0x40, 0x320(%rdi)         # LVT timer: one-shot, vector 0x40
        mov 24(%r14), %eax
        mov %eax, 0x380(%rdi)           # initial count
        ret

syscall_entry:
        mov %cs, %eax
        PROBE_OUT 18
        mov %ss, %eax
        PROBE_OUT 19
        EXIT 0x200

# --- user mode (CPL3) code ----------------------------------------------------------------
user_spin:
        lea 0x100(,%r15,8), %rbx
        add $SCRATCH, %rbx              # per-vCPU counter at SCRATCH + 0x100 + 8 * index
1:      incq (%rbx)
        jmp 1b
user_int80:
        int $0x80
        jmp user_int80
user_hlt:
        hlt
        jmp user_hlt
user_cli:
        cli
        int $0x80
user_ud2:
        ud2
user_out3:
        mov $0x5555, %eax
        out %eax, $(PROBE + 12)
        int $0x80
user_out0:
        mov $0x6666, %eax
        out %eax, $(PROBE + 12)
        int $0x80
user_rdtsc:
        rdtsc
        mov %eax, SCRATCH + 0x200
        mov %edx, SCRATCH + 0x204
        rdtsc
        mov %eax, SCRATCH + 0x208
        mov %edx, SCRATCH + 0x20c
        ud2
user_pf:
        movabs 0x200000000, %rax
        int $0x80
user_syscall:
        syscall
        int $0x80
user_timer:
        jmp user_spin
user_int3:
        int3
        int $0x80
user_int81:
        int $0x81
        int $0x80
user_rdtsc_loop:
        mov 24(%r14), %rcx
        rdtsc
        mov %eax, SCRATCH + 0x200
        mov %edx, SCRATCH + 0x204
1:      rdtsc
        dec %rcx
        jnz 1b
        mov %eax, SCRATCH + 0x208
        mov %edx, SCRATCH + 0x20c
        ud2

        .balign 8
user_actions:
        .quad user_spin, user_int80, user_hlt, user_cli, user_ud2, user_out3, user_out0
        .quad user_rdtsc, user_pf, user_syscall, user_timer, user_int3, user_int81
        .quad user_rdtsc_loop
user_rflags:                            # 0x3002 = IOPL 3, 0x0002 = IOPL 0, 0x200 = IF
        .quad 0x0002, 0x0002, 0x0002, 0x0002, 0x0002, 0x3002, 0x0002
        .quad 0x3002, 0x0002, 0x3002, 0x0202, 0x0002, 0x0002
        .quad 0x0002

# --- exception and interrupt entry ----------------------------------------------------------
        .macro VEC_NOERR v
vec\v:  pushq $0
        pushq $\v
        jmp common
        .endm
        .macro VEC_ERR v
vec\v:  pushq $\v
        jmp common
        .endm
        .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31,64,128,129
        VEC_NOERR \v
        .endr
        .irp v, 8,10,11,12,13,14,17,21,29,30
        VEC_ERR \v
        .endr

# Stack: saved RDX, RBX, RAX, then vector, error code, RIP, CS, RFLAGS, RSP, SS.
        .set F, 24
common:
        push %rax
        push %rbx
        push %rdx
        mov F(%rsp), %rax
        PROBE_OUT 0
        mov F+8(%rsp), %rax
        PROBE_OUT 1
        mov F+16(%rsp), %rax
        PROBE_OUT64 2
        mov F+24(%rsp), %rax
        PROBE_OUT 4
        mov F+32(%rsp), %rax
        PROBE_OUT 5
        mov F+40(%rsp), %rax
        PROBE_OUT64 6
        mov F+48(%rsp), %rax
        PROBE_OUT 8
        lea F+56(%rsp), %rax
        PROBE_OUT64 9
        mov %cs, %eax
        PROBE_OUT 11
        mov %cr2, %rax
        PROBE_OUT64 16
        cmpq $0x40, F(%rsp)
        jne 1f
        mov $LAPIC, %rbx
        movl $0, 0xb0(%rbx)             # EOI
1:      cmpq $0, 16(%r14)
        je 2f
        pop %rdx
        pop %rbx
        pop %rax
        add $16, %rsp
        iretq
2:      mov F(%rsp), %rax
        add $0x100, %eax
        mov $DEBUG_EXIT, %dx
        out %eax, %dx
3:      hlt
        jmp 3b
