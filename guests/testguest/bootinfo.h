/*
 * The boot-info block the VMM writes into guest memory and passes in RSI.
 * The host side declares the same layout once in vmce/guest/testguest.py; a test compiles
 * this header and compares every offset.
 */
#ifndef BOOTINFO_H
#define BOOTINFO_H

#include <stdint.h>

#define BOOTINFO_MAGIC   0x45434d56u /* "VMCE" */
#define BOOTINFO_VERSION 1u
#define MAX_CPUS         32
#define MAX_PROBES       256

/* flags */
#define BI_NO_CR4_MCE    (1u << 0) /* never set CR4.MCE: a #MC must shut the guest down */
#define BI_KEEP_MCIP     (1u << 1) /* the #MC handler never clears MCG_STATUS */
#define BI_VERBOSE       (1u << 2) /* report every MSR the handler touches */

/* mode */
#define MODE_WORK  0u /* every CPU runs its work item forever */
#define MODE_PROBE 1u /* CPU 0 runs the MSR probe list, then the guest exits */

/* per-CPU work */
#define WORK_KERNEL 0u /* count in a CPL0 loop */
#define WORK_USER   1u /* count in a CPL3 task */
#define WORK_IDLE   2u /* hlt forever */

/* probe ops */
#define PROBE_RDMSR 0u
#define PROBE_WRMSR 1u

/* monarch_timeout_us: like Linux's mce=N; this value means "the vendor default" */
#define MONARCH_DEFAULT 0xffffffffu

struct probe {
	uint32_t op;
	uint32_t msr;
	uint64_t value;
};

struct bootinfo {
	uint32_t magic;
	uint32_t version;
	uint32_t ncpus;
	uint32_t flags;
	uint32_t mode;
	uint32_t monarch_timeout_us;
	uint64_t tsc_khz;
	uint64_t mem_bytes;
	uint8_t  work[MAX_CPUS];
	uint32_t nprobes;
	uint32_t reserved;
	struct probe probes[MAX_PROBES];
};

#endif
