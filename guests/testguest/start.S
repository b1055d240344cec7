/*
 * Entry point and exception entry of the vmce test guest.
 *
 * The VMM starts every vCPU here in 64-bit mode (identity-mapped paging, flat segments) with
 * RDI = CPU index and RSI = the boot-info block; the guest sets up its own stack, GDT and IDT.
 */
	.section .text.entry, "ax"
	.code64
	.globl _start
_start:
	cli
	mov	%rdi, %rax
	inc	%rax
	shl	$14, %rax			/* (cpu + 1) * 16 KiB */
	lea	kstack(%rip), %rsp
	add	%rax, %rsp
	and	$-16, %rsp
	call	kmain
1:	hlt
	jmp	1b

/* enter_user(rip, user_rsp, arg): drop to CPL3 at rip with RDI = arg. */
	.globl enter_user
enter_user:
	pushq	$0x23				/* SS: user data */
	pushq	%rsi				/* RSP */
	pushq	$0x2				/* RFLAGS */
	pushq	$0x2b				/* CS: user code */
	pushq	%rdi				/* RIP */
	mov	%rdx, %rdi
	xor	%eax, %eax
	xor	%esi, %esi
	xor	%edx, %edx
	iretq

.macro ISR_NOERR n
isr\n:
	pushq	$0
	pushq	$\n
	jmp	isr_common
.endm
.macro ISR_ERR n
isr\n:
	pushq	$\n
	jmp	isr_common
.endm

ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
ISR_NOERR 3
ISR_NOERR 4
ISR_NOERR 5
ISR_NOERR 6
ISR_NOERR 7
ISR_ERR   8
ISR_NOERR 9
ISR_ERR   10
ISR_ERR   11
ISR_ERR   12
ISR_ERR   13
ISR_ERR   14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR   17
ISR_NOERR 18
ISR_NOERR 19
ISR_NOERR 20
ISR_ERR   21
ISR_NOERR 22
ISR_NOERR 23
ISR_NOERR 24
ISR_NOERR 25
ISR_NOERR 26
ISR_NOERR 27
ISR_NOERR 28
ISR_ERR   29
ISR_ERR   30
ISR_NOERR 31

/* Saves the general registers as struct frame (kernel.h), calls exception(frame). */
isr_common:
	cld
	push	%rax
	push	%rbx
	push	%rcx
	push	%rdx
	push	%rsi
	push	%rdi
	push	%rbp
	push	%r8
	push	%r9
	push	%r10
	push	%r11
	push	%r12
	push	%r13
	push	%r14
	push	%r15
	mov	%rsp, %rdi
	call	exception
	pop	%r15
	pop	%r14
	pop	%r13
	pop	%r12
	pop	%r11
	pop	%r10
	pop	%r9
	pop	%r8
	pop	%rbp
	pop	%rdi
	pop	%rsi
	pop	%rdx
	pop	%rcx
	pop	%rbx
	pop	%rax
	add	$16, %rsp			/* vector, error code */
	iretq

	.section .rodata
	.globl isr_table
	.balign 8
isr_table:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad isr\n
	.endr

	.section .note.GNU-stack, "", @progbits
