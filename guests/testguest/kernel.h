/* The vmce test guest: shared declarations and CPU primitives. */
#ifndef KERNEL_H
#define KERNEL_H

#include <stdint.h>
#include "bootinfo.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define COM1        0x3f8
#define EXIT_PORT   0x501 /* a write ends the VM with that exit code */
#define EXIT_DONE   0x01
#define EXIT_PANIC  0x02

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS   0x23
#define USER_CS   0x2b
#define TSS_SEL   0x30

#define CR4_MCE (1ul << 6)

/* The frame the exception entry code builds (see start.S). */
struct frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};

extern struct bootinfo *bi;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void hlt(void) { __asm__ volatile("hlt" ::: "memory"); }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" :: "r"(v) : "memory"); }
static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* MSR access; *_safe variants report a #GP instead of taking it (see trap.c). */
static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr) : "memory");
	return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
int rdmsr_safe(u32 msr, u64 *value); /* 0 ok, -1 #GP */
int wrmsr_safe(u32 msr, u64 value);

static inline u32 atomic_inc(volatile u32 *p) { return __atomic_add_fetch(p, 1, __ATOMIC_SEQ_CST); }
static inline u32 atomic_read(volatile u32 *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void atomic_set(volatile u32 *p, u32 v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }

/* console.c */
void printk(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void console_break_locks(void);
void console_panic_takeover(void);
void console_defer(int on);

/* main.c */
void panic(const char *msg) __attribute__((noreturn));
void guest_exit(u8 code) __attribute__((noreturn));
u32 this_cpu(void);
void restart_user_task(struct frame *f);
extern volatile u64 work_counter[MAX_CPUS];
extern volatile u32 task_generation[MAX_CPUS];

/* cpu.c */
void cpu_setup(u32 cpu);
u64 tsc_deadline_us(u64 us);

/* mce.c */
void mcheck_cpu_init(u32 cpu);
void do_machine_check(struct frame *f);
extern u32 vendor_is_amd;

/* memory.c */
void memory_failure(u64 pfn, int action_required, u32 cpu);

/* trap.c */
void exception(struct frame *f);

#endif
