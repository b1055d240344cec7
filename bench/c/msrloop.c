/*
 * The benchmark's baseline VMM in C: one vCPU in 64-bit mode runs guests/bench/msrloop.s and
 * every filtered RDMSR exits to this loop, which answers it with a constant. It prints the
 * nanoseconds per exit. Usage: msrloop STUB.bin ITERATIONS MSR FILTERED(0|1)
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM (4u << 20)
#define CODE 0x100000
#define INFO 0x10000
#define PML4 0x6000

static void die(const char *what) { perror(what); exit(1); }

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void seg(struct kvm_segment *s, uint16_t sel, uint8_t type, int code)
{
	memset(s, 0, sizeof(*s));
	s->selector = sel; s->limit = 0xffffffff; s->present = 1; s->dpl = 0; s->s = 1;
	s->type = type; s->g = 1; s->l = code; s->db = !code;
}

int main(int argc, char **argv)
{
	if (argc != 5) { fprintf(stderr, "usage: %s STUB ITER MSR FILTERED\n", argv[0]); return 2; }
	uint64_t iters = strtoull(argv[2], 0, 0), msr = strtoull(argv[3], 0, 0);
	int filtered = atoi(argv[4]);
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) die("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) die("KVM_CREATE_VM");
	uint8_t *mem = mmap(0, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct kvm_userspace_memory_region region = {0, 0, 0, MEM, (uint64_t)mem};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region)) die("SET_USER_MEMORY_REGION");
	FILE *f = fopen(argv[1], "rb");
	if (!f) die(argv[1]);
	fread(mem + CODE, 1, MEM - CODE, f);
	fclose(f);
	((uint64_t *)(mem + INFO))[0] = iters;
	((uint64_t *)(mem + INFO))[1] = msr;
	/* identity map the first 1 GiB with 2 MiB pages */
	uint64_t *pml4 = (uint64_t *)(mem + PML4), *pdpt = pml4 + 512, *pd = pml4 + 1024;
	pml4[0] = (PML4 + 0x1000) | 3;
	pdpt[0] = (PML4 + 0x2000) | 3;
	for (int i = 0; i < 512; i++) pd[i] = ((uint64_t)i << 21) | 0x83;
	if (filtered) {
		struct kvm_enable_cap cap = {.cap = KVM_CAP_X86_USER_SPACE_MSR};
		cap.args[0] = KVM_MSR_EXIT_REASON_FILTER;
		if (ioctl(vm, KVM_ENABLE_CAP, &cap)) die("USER_SPACE_MSR");
		static uint8_t deny[8];
		struct kvm_msr_filter filter = {.flags = KVM_MSR_FILTER_DEFAULT_ALLOW};
		filter.ranges[0].flags = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE;
		filter.ranges[0].nmsrs = 1; filter.ranges[0].base = (uint32_t)msr;
		filter.ranges[0].bitmap = deny;
		if (ioctl(vm, KVM_X86_SET_MSR_FILTER, &filter)) die("SET_MSR_FILTER");
	}
	int cpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (cpu < 0) die("CREATE_VCPU");
	int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED, cpu, 0);
	struct kvm_sregs sregs;
	ioctl(cpu, KVM_GET_SREGS, &sregs);
	seg(&sregs.cs, 0x10, 11, 1);
	seg(&sregs.ds, 0x18, 3, 0);
	sregs.es = sregs.ss = sregs.fs = sregs.gs = sregs.ds;
	sregs.cr3 = PML4; sregs.cr4 = 1 << 5; sregs.cr0 = 0x80050033;
	sregs.efer = 0x500;
	if (ioctl(cpu, KVM_SET_SREGS, &sregs)) die("SET_SREGS");
	struct kvm_regs regs = {.rip = CODE, .rsi = INFO, .rsp = 0x8000, .rflags = 2};
	if (ioctl(cpu, KVM_SET_REGS, &regs)) die("SET_REGS");
	uint64_t exits = 0, t0 = now_ns();
	for (;;) {
		if (ioctl(cpu, KVM_RUN, 0) < 0) die("KVM_RUN");
		if (run->exit_reason == KVM_EXIT_X86_RDMSR) {
			run->msr.data = 0x1000c02; exits++;
			continue;
		}
		if (run->exit_reason == KVM_EXIT_IO) break;
		fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
		return 1;
	}
	uint64_t ns = now_ns() - t0;
	printf("%llu %llu\n", (unsigned long long)ns, (unsigned long long)exits);
	return 0;
}
