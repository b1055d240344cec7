/* Per-CPU descriptor tables: GDT with user segments and a TSS, the shared IDT. */
#include "kernel.h"

struct tss {
	u32 reserved0;
	u64 rsp[3];
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} __attribute__((packed));

struct idt_entry {
	u16 offset_lo;
	u16 selector;
	u8 ist;
	u8 type_attr;
	u16 offset_mid;
	u32 offset_hi;
	u32 zero;
} __attribute__((packed));

struct table_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));

#define IST_MCE 1
#define IST_DF  2
#define STACK   16384

static u64 gdt[MAX_CPUS][8] __attribute__((aligned(16)));
static struct tss tss[MAX_CPUS] __attribute__((aligned(16)));
static struct idt_entry idt[32] __attribute__((aligned(16)));
static u8 mce_stack[MAX_CPUS][STACK] __attribute__((aligned(16)));
static u8 df_stack[MAX_CPUS][STACK] __attribute__((aligned(16)));
extern u8 kstack[MAX_CPUS][STACK];
extern const u64 isr_table[32];
static volatile u32 idt_ready;

static void idt_init(void)
{
	for (u32 v = 0; v < 32; v++) {
		u64 h = isr_table[v];
		idt[v].offset_lo = (u16)h;
		idt[v].selector = KERNEL_CS;
		idt[v].ist = v == 18 ? IST_MCE : v == 8 ? IST_DF : 0;
		idt[v].type_attr = 0x8e; /* present, DPL0, 64-bit interrupt gate */
		idt[v].offset_mid = (u16)(h >> 16);
		idt[v].offset_hi = (u32)(h >> 32);
		idt[v].zero = 0;
	}
}

static void gdt_init(u32 cpu)
{
	u64 *g = gdt[cpu];
	u64 base = (u64)&tss[cpu];
	u64 limit = sizeof(struct tss) - 1;
	g[0] = 0;
	g[1] = 0x00af9a000000ffffull; /* 0x08 kernel code, 64-bit */
	g[2] = 0x00cf92000000ffffull; /* 0x10 kernel data */
	g[3] = 0x00cffa000000ffffull; /* 0x18 user code, 32-bit (unused) */
	g[4] = 0x00cff2000000ffffull; /* 0x20 user data */
	g[5] = 0x00affa000000ffffull; /* 0x28 user code, 64-bit */
	g[6] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) |
	       (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
	g[7] = base >> 32;
	tss[cpu].rsp[0] = (u64)&kstack[cpu][STACK];
	tss[cpu].ist[IST_MCE - 1] = (u64)&mce_stack[cpu][STACK];
	tss[cpu].ist[IST_DF - 1] = (u64)&df_stack[cpu][STACK];
	tss[cpu].iomap_base = sizeof(struct tss);
}

void cpu_setup(u32 cpu)
{
	if (cpu == 0) {
		idt_init();
		atomic_set(&idt_ready, 1);
	}
	while (!atomic_read(&idt_ready))
		cpu_relax();
	gdt_init(cpu);
	struct table_ptr gp = {sizeof(gdt[cpu]) - 1, (u64)gdt[cpu]};
	struct table_ptr ip = {sizeof(idt) - 1, (u64)idt};
	__asm__ volatile(
		"lgdt %0\n\t"
		"pushq $0x08\n\t"
		"leaq 1f(%%rip), %%rax\n\t"
		"pushq %%rax\n\t"
		"lretq\n"
		"1:\n\t"
		"mov $0x10, %%ax\n\t"
		"mov %%ax, %%ds\n\t"
		"mov %%ax, %%es\n\t"
		"mov %%ax, %%ss\n\t"
		"xor %%eax, %%eax\n\t"
		"mov %%ax, %%fs\n\t"
		"mov %%ax, %%gs\n\t"
		"lidt %1\n\t"
		"mov $0x30, %%ax\n\t"
		"ltr %%ax\n\t"
		:: "m"(gp), "m"(ip) : "rax", "memory");
}

/* A TSC deadline `us` microseconds from now (the host tells the guest its TSC rate). */
u64 tsc_deadline_us(u64 us)
{
	u64 khz = bi->tsc_khz ? bi->tsc_khz : 1000000;
	return rdtsc() + us * khz / 1000;
}
