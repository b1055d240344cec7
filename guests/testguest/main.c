/*
 * The vmce test guest: a small 64-bit kernel in the spirit of kvm-unit-tests and Xen's XTF.
 *
 * Every CPU sets up its tables and MCA as Linux does, then runs its work (a CPL3 task, a CPL0
 * loop, or idle) while the host injects machine checks; or CPU 0 runs an MSR probe list.
 * Everything the guest does is reported to the host as "@vmce <event> key=value..." lines.
 */
#include "kernel.h"

#define USTACK 8192
#define MSR_GS_BASE 0xc0000101

struct bootinfo *bi;
u8 kstack[MAX_CPUS][16384] __attribute__((aligned(16)));
static u8 ustack[MAX_CPUS][USTACK] __attribute__((aligned(16)));
volatile u64 work_counter[MAX_CPUS];
volatile u32 task_generation[MAX_CPUS];
static volatile u32 booted, all_booted;
static struct { u32 cpu; } percpu[MAX_CPUS];

void enter_user(u64 rip, u64 rsp, u64 arg) __attribute__((noreturn));

u32 this_cpu(void)
{
	u32 c;
	__asm__ volatile("movl %%gs:0, %0" : "=r"(c));
	return c;
}

void guest_exit(u8 code)
{
	for (;;) {
		outb(EXIT_PORT, code);
		hlt();
	}
}

void panic(const char *msg)
{
	console_panic_takeover();
	printk("Kernel panic - not syncing: %s\n", msg);
	printk("@vmce panic cpu=%u msg=\"%s\"\n", this_cpu(), msg);
	guest_exit(EXIT_PANIC);
}

/* The CPL3 task: counts forever. Runs from the kernel image, which is mapped user-accessible. */
static void __attribute__((noreturn, used)) user_task(volatile u64 *counter)
{
	for (;;)
		(*counter)++;
}

/* Replace the interrupted user task with a fresh one (the old one was killed). */
void restart_user_task(struct frame *f)
{
	u32 cpu = this_cpu();
	task_generation[cpu]++;
	f->rip = (u64)user_task;
	f->rsp = (u64)&ustack[cpu][USTACK];
	f->rdi = (u64)&work_counter[cpu];
	f->cs = USER_CS;
	f->ss = USER_DS;
	f->rflags = 0x2;
	printk("@vmce task cpu=%u generation=%u\n", cpu, task_generation[cpu]);
}

static void run_probes(void)
{
	for (u32 i = 0; i < bi->nprobes && i < MAX_PROBES; i++) {
		const struct probe *p = &bi->probes[i];
		u64 v = 0;
		int gp;
		if (p->op == PROBE_RDMSR) {
			gp = rdmsr_safe(p->msr, &v);
			if (gp)
				printk("@vmce probe index=%u op=rd msr=%#x result=gp\n", i, p->msr);
			else
				printk("@vmce probe index=%u op=rd msr=%#x result=ok value=%#lx\n", i,
				       p->msr, v);
		} else {
			gp = wrmsr_safe(p->msr, p->value);
			printk("@vmce probe index=%u op=wr msr=%#x value=%#lx result=%s\n", i, p->msr,
			       p->value, gp ? "gp" : "ok");
		}
	}
	printk("@vmce probes-done count=%u\n", bi->nprobes);
}

static void __attribute__((noreturn)) work(u32 cpu)
{
	switch (bi->work[cpu]) {
	case WORK_USER:
		printk("@vmce work cpu=%u kind=user counter=%#lx\n", cpu, (u64)&work_counter[cpu]);
		enter_user((u64)user_task, (u64)&ustack[cpu][USTACK], (u64)&work_counter[cpu]);
	case WORK_IDLE:
		printk("@vmce work cpu=%u kind=idle\n", cpu);
		for (;;)
			hlt();
	default:
		printk("@vmce work cpu=%u kind=kernel counter=%#lx\n", cpu, (u64)&work_counter[cpu]);
		for (;;) {
			work_counter[cpu]++;
			cpu_relax();
		}
	}
}

void __attribute__((noreturn)) kmain(u32 cpu, struct bootinfo *info)
{
	bi = info;
	cpu_setup(cpu);
	percpu[cpu].cpu = cpu;
	wrmsr(MSR_GS_BASE, (u64)&percpu[cpu]);
	if (bi->magic != BOOTINFO_MAGIC || bi->version != BOOTINFO_VERSION || cpu >= MAX_CPUS)
		panic("bad boot info");
	printk("@vmce boot cpu=%u ncpus=%u\n", cpu, bi->ncpus);
	mcheck_cpu_init(cpu);
	if (atomic_inc(&booted) == bi->ncpus) {
		printk("@vmce ready ncpus=%u mode=%s\n", bi->ncpus,
		       bi->mode == MODE_PROBE ? "probe" : "work");
		atomic_set(&all_booted, 1);
	}
	while (!atomic_read(&all_booted))
		cpu_relax();
	if (bi->mode == MODE_PROBE) {
		if (cpu == 0) {
			run_probes();
			guest_exit(EXIT_DONE);
		}
		for (;;)
			hlt();
	}
	work(cpu);
}
