/* Exceptions: #MC to the machine-check handler, #GP with the MSR probe fix-up, the rest fatal. */
#include "kernel.h"

static volatile u32 probe_armed[MAX_CPUS];
static volatile u32 probe_faulted[MAX_CPUS];

static const char *const names[32] = {
	"divide error", "debug", "NMI", "breakpoint", "overflow", "bound range",
	"invalid opcode", "device not available", "double fault", "coprocessor overrun",
	"invalid TSS", "segment not present", "stack fault", "general protection fault",
	"page fault", "reserved", "x87 FPU error", "alignment check", "machine check",
	"SIMD error", "virtualization", "control protection",
};

/* A #GP on an armed RDMSR/WRMSR (0f 32 / 0f 30) is recorded and the instruction skipped. */
static int probe_fixup(struct frame *f)
{
	u32 cpu = this_cpu();
	const u8 *ip = (const u8 *)f->rip;
	if (!probe_armed[cpu] || (f->cs & 3) || ip[0] != 0x0f || (ip[1] != 0x32 && ip[1] != 0x30))
		return 0;
	probe_faulted[cpu] = 1;
	f->rip += 2;
	return 1;
}

/*
 * The #MC handler uses these too, and may interrupt a probe between arming and checking:
 * each call saves the CPU's probe state and puts it back, so the interrupted probe still
 * sees its own fault (or its absence).
 */
int rdmsr_safe(u32 msr, u64 *value)
{
	u32 cpu = this_cpu(), lo = 0, hi = 0;
	u32 armed = probe_armed[cpu], faulted = probe_faulted[cpu];
	probe_faulted[cpu] = 0;
	probe_armed[cpu] = 1;
	__asm__ volatile("rdmsr" : "+a"(lo), "+d"(hi) : "c"(msr) : "memory");
	probe_armed[cpu] = 0;
	int gp = probe_faulted[cpu];
	probe_faulted[cpu] = faulted;
	probe_armed[cpu] = armed;
	if (gp)
		return -1;
	*value = ((u64)hi << 32) | lo;
	return 0;
}

int wrmsr_safe(u32 msr, u64 value)
{
	u32 cpu = this_cpu();
	u32 armed = probe_armed[cpu], faulted = probe_faulted[cpu];
	probe_faulted[cpu] = 0;
	probe_armed[cpu] = 1;
	__asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)value), "d"((u32)(value >> 32)) : "memory");
	probe_armed[cpu] = 0;
	int gp = probe_faulted[cpu];
	probe_faulted[cpu] = faulted;
	probe_armed[cpu] = armed;
	return gp ? -1 : 0;
}

void exception(struct frame *f)
{
	if (f->vector == 18) {
		do_machine_check(f);
		return;
	}
	if (f->vector == 13 && probe_fixup(f))
		return;
	printk("@vmce exception cpu=%u vector=%lu error=%#lx rip=%#lx cs=%#lx\n", this_cpu(),
	       f->vector, f->error, f->rip, f->cs);
	panic(f->vector < 32 && names[f->vector] ? names[f->vector] : "unknown exception");
}
