/*
 * Machine-check architecture, the way Linux 6.1 uses it (arch/x86/kernel/cpu/mce/).
 *
 * Boot: read MCG_CAP, poll and clear leftover errors, set CR4.MCE, claim CMCI banks through
 * CTL2, enable every bank (MCi_CTL = ~0, STATUS = 0) and read CTL back.
 * #MC: read MCG_STATUS, grade every bank with Linux's severity table (Intel) or procedure (AMD),
 * rendezvous all CPUs under a monarch with a timeout (unless LMCE, or AMD), log, clear, reign,
 * then recover (offline a page, kill a user task) or panic with Linux's words.
 */
#include "kernel.h"

#define MSR_MCG_CAP        0x179
#define MSR_MCG_STATUS     0x17a
#define MSR_MCG_CTL        0x17b
#define MSR_MC0_CTL2       0x280
#define MSR_MC0_CTL        0x400
#define MSR_MCG_EXT_CTL    0x4d0
#define MSR_FEATURE_CONTROL 0x3a

#define MCG_CTL_P   (1ull << 8)
#define MCG_CMCI_P  (1ull << 10)
#define MCG_SER_P   (1ull << 24)
#define MCG_LMCE_P  (1ull << 27)
#define MCG_RIPV    (1ull << 0)
#define MCG_EIPV    (1ull << 1)
#define MCG_MCIP    (1ull << 2)
#define MCG_LMCES   (1ull << 3)

#define ST_VAL   (1ull << 63)
#define ST_OVER  (1ull << 62)
#define ST_UC    (1ull << 61)
#define ST_EN    (1ull << 60)
#define ST_MISCV (1ull << 59)
#define ST_ADDRV (1ull << 58)
#define ST_PCC   (1ull << 57)
#define ST_S     (1ull << 56)
#define ST_AR    (1ull << 55)
#define ST_DEFERRED (1ull << 44) /* AMD */
#define UC_S     (ST_UC | ST_S)
#define UC_AR    (ST_UC | ST_AR)
#define UC_SAR   (ST_UC | ST_S | ST_AR)
#define ADDR_OK  (ST_ADDRV | ST_MISCV)
#define MCACOD   0xefffull
#define SCRUBMSK 0xeff0ull

#define CMCI_EN  (1ull << 30)

enum sev { SEV_NO, SEV_UCNA, SEV_KEEP, SEV_SOME, SEV_AO, SEV_UC, SEV_AR, SEV_PANIC };
static const char *const sev_name[] = {"NO", "UCNA", "KEEP", "SOME", "AO", "UC", "AR", "PANIC"};
enum ctx { CTX_ANY, IN_USER, IN_KERNEL, IN_KERNEL_RECOV };
enum ser { SER_ANY, SER_REQUIRED, NO_SER };

struct severity {
	u64 mask, result;
	u64 mcgmask, mcgres;
	u8 sev, ser, ctx, excp;
	const char *msg;
};

#define MASK(m, r) .mask = (m), .result = (r)
#define BITCLR(x) MASK(x, 0)
#define BITSET(x) MASK(x, x)
#define MCG(m, r) .mcgmask = (m), .mcgres = (r)

/* Linux 6.1 severities[] for Intel, first match wins (CONFIG_MEMORY_FAILURE rows included). */
static const struct severity severities[] = {
	{BITCLR(ST_VAL), .sev = SEV_NO, .msg = "Invalid"},
	{BITCLR(ST_EN), .sev = SEV_NO, .excp = 1, .msg = "Not enabled"},
	{BITSET(ST_PCC), .sev = SEV_PANIC, .msg = "Processor context corrupt"},
	{MCG(MCG_MCIP, 0), .sev = SEV_PANIC, .excp = 1, .msg = "MCIP not set in MCA handler"},
	{MCG(MCG_RIPV | MCG_EIPV, 0), .sev = SEV_PANIC, .excp = 1,
	 .msg = "Neither restart nor error IP"},
	{MCG(MCG_RIPV, 0), .sev = SEV_PANIC, .excp = 1, .ctx = IN_KERNEL,
	 .msg = "In kernel and no restart IP"},
	{MCG(MCG_RIPV, 0), .sev = SEV_PANIC, .excp = 1, .ctx = IN_KERNEL_RECOV,
	 .msg = "In kernel and no restart IP"},
	{BITCLR(ST_UC), .sev = SEV_KEEP, .ser = NO_SER, .msg = "Corrected error"},
	{MASK(UC_AR | SCRUBMSK, ST_UC | 0xc0), .sev = SEV_AO, .ser = SER_REQUIRED,
	 .msg = "Action optional: memory scrubbing error"},
	{MASK(UC_AR | MCACOD, ST_UC | 0x17a), .sev = SEV_AO, .ser = SER_REQUIRED,
	 .msg = "Action optional: last level cache writeback error"},
	{MASK(UC_SAR, ST_UC), .sev = SEV_UCNA, .ser = SER_REQUIRED,
	 .msg = "Uncorrected no action required"},
	{MASK(ST_OVER | UC_SAR, ST_UC | ST_AR), .sev = SEV_PANIC, .ser = SER_REQUIRED,
	 .msg = "Illegal combination (UCNA with AR=1)"},
	{BITCLR(ST_S), .sev = SEV_KEEP, .ser = SER_REQUIRED, .msg = "Non signaled machine check"},
	{BITSET(ST_OVER | UC_SAR), .sev = SEV_PANIC, .ser = SER_REQUIRED,
	 .msg = "Action required with lost events"},
	{MASK(ST_OVER | UC_SAR | ADDR_OK, UC_SAR | ADDR_OK), MCG(MCG_RIPV | MCG_EIPV, MCG_RIPV),
	 .sev = SEV_KEEP, .ser = SER_REQUIRED,
	 .msg = "Action required but unaffected thread is continuable"},
	{MASK(ST_OVER | UC_SAR | ADDR_OK | MCACOD, UC_SAR | ADDR_OK | 0x134), .sev = SEV_AR,
	 .ser = SER_REQUIRED, .ctx = IN_KERNEL_RECOV,
	 .msg = "Action required: data load in error recoverable area of kernel"},
	{MASK(ST_OVER | UC_SAR | ADDR_OK | MCACOD, UC_SAR | ADDR_OK | 0x134), .sev = SEV_AR,
	 .ser = SER_REQUIRED, .ctx = IN_USER, .msg = "Action required: data load error in a user process"},
	{MASK(ST_OVER | UC_SAR | ADDR_OK | MCACOD, UC_SAR | ADDR_OK | 0x150), .sev = SEV_AR,
	 .ser = SER_REQUIRED, .ctx = IN_USER,
	 .msg = "Action required: instruction fetch error in a user process"},
	{MASK(ST_OVER | UC_SAR | ADDR_OK | MCACOD, UC_SAR | ADDR_OK | 0x134), .sev = SEV_PANIC,
	 .ser = SER_REQUIRED, .ctx = IN_KERNEL, .msg = "Data load in unrecoverable area of kernel"},
	{MASK(ST_OVER | UC_SAR | ADDR_OK | MCACOD, UC_SAR | ADDR_OK | 0x150), .sev = SEV_PANIC,
	 .ser = SER_REQUIRED, .ctx = IN_KERNEL, .msg = "Instruction fetch error in kernel"},
	{MASK(ST_OVER | UC_SAR, UC_SAR), .sev = SEV_PANIC, .ser = SER_REQUIRED,
	 .msg = "Action required: unknown MCACOD"},
	{MASK(ST_OVER | UC_SAR, UC_S), .sev = SEV_SOME, .ser = SER_REQUIRED,
	 .msg = "Action optional: unknown MCACOD"},
	{MASK(ST_OVER | UC_SAR, ST_OVER | UC_S), .sev = SEV_SOME, .ser = SER_REQUIRED,
	 .msg = "Action optional with lost events"},
	{BITSET(ST_OVER | ST_UC), .sev = SEV_PANIC, .msg = "Overflowed uncorrected"},
	{BITSET(ST_UC), .sev = SEV_UC, .msg = "Uncorrected"},
	{BITSET(0), .sev = SEV_SOME, .msg = "No match"},
};

struct mce_rec {
	u64 status, addr, misc, mcg_status, rip, cs;
	u32 bank, cpu;
	u8 sev;
	const char *msg;
};

u32 vendor_is_amd;
static u32 amd_succor, amd_overflow_recov;
static u64 mcg_cap;
static u32 nbanks;
static u32 ser;
static u64 monarch_timeout_us;
static u8 bank_on[32];
static volatile u32 mca_ready[MAX_CPUS];

/* rendezvous state */
static volatile u32 mce_callin, mce_executing, global_nwo, mce_paniced;
static volatile u32 cpu_entered[MAX_CPUS];
static u8 cpu_worst[MAX_CPUS];
static const char *cpu_msg[MAX_CPUS];
static struct mce_rec cpu_rec[MAX_CPUS];
static u32 cpu_has_rec[MAX_CPUS];
static volatile u32 taint_printed;

/* -- MSR access inside the handler: a #GP there is an architectural violation (Linux) ----- */

static void mce_violation(const char *op, u32 msr)
{
	console_panic_takeover();
	printk("mce: MSR access error: %s from %#x in #MC handler\n", op, msr);
	panic("MCA architectural violation!");
}

static u64 mce_rdmsr(u32 msr)
{
	u64 v;
	if (rdmsr_safe(msr, &v))
		mce_violation("RDMSR", msr);
	return v;
}

static void mce_wrmsr(u32 msr, u64 v)
{
	if (wrmsr_safe(msr, v))
		mce_violation("WRMSR", msr);
}

/* Normal-context accesses: a #GP only warns and reads as 0, like Linux's rdmsrl. */
static u64 rdmsr_warn(u32 msr)
{
	u64 v;
	if (rdmsr_safe(msr, &v)) {
		printk("unchecked MSR access error: RDMSR from %#x\n", msr);
		return 0;
	}
	return v;
}

static void wrmsr_warn(u32 msr, u64 v)
{
	if (wrmsr_safe(msr, v))
		printk("unchecked MSR access error: WRMSR to %#x (tried to write %#lx)\n", msr, v);
}

/* -- boot ------------------------------------------------------------------------------ */

static void identify(u32 *family, u32 *model)
{
	u32 a, b, c, d;
	cpuid(0, &a, &b, &c, &d);
	vendor_is_amd = (b == 0x68747541 /* "Auth" */ || b == 0x6f677948 /* "Hygo" */);
	cpuid(1, &a, &b, &c, &d);
	*family = (a >> 8) & 0xf;
	*model = (a >> 4) & 0xf;
	if (*family == 0xf)
		*family += (a >> 20) & 0xff;
	if (*family >= 6)
		*model += ((a >> 16) & 0xf) << 4;
	if (vendor_is_amd) {
		cpuid(0x80000000, &a, &b, &c, &d);
		if (a >= 0x80000007) {
			cpuid(0x80000007, &a, &b, &c, &d);
			amd_overflow_recov = b & 1;
			amd_succor = (b >> 1) & 1;
		}
	}
}

static void poll_boot_errors(u32 cpu)
{
	rdmsr_warn(MSR_MCG_STATUS);
	for (u32 i = 0; i < nbanks; i++) {
		u64 st = rdmsr_warn(MSR_MC0_CTL + 4 * i + 1);
		if (st & ST_VAL) {
			printk("@vmce bootlog cpu=%u bank=%u status=%#lx\n", cpu, i, st);
			wrmsr_warn(MSR_MC0_CTL + 4 * i + 1, 0);
		}
	}
}

static u32 cmci_discover(void)
{
	u32 owned = 0;
	for (u32 i = 0; i < nbanks; i++) {
		u64 ctl2 = rdmsr_warn(MSR_MC0_CTL2 + i);
		if (ctl2 & CMCI_EN)
			continue; /* another CPU owns it */
		wrmsr_warn(MSR_MC0_CTL2 + i, (ctl2 & ~0x7fffull) | CMCI_EN | 1);
		if (rdmsr_warn(MSR_MC0_CTL2 + i) & CMCI_EN)
			owned |= 1u << i;
	}
	return owned;
}

void mcheck_cpu_init(u32 cpu)
{
	u32 family, model;
	identify(&family, &model);
	u64 cap = rdmsr_warn(MSR_MCG_CAP);
	u32 n = (u32)(cap & 0xff);
	if (n > 32)
		n = 32;
	if (cpu == 0) {
		mcg_cap = cap;
		nbanks = n;
		ser = !!(cap & MCG_SER_P);
		int intel_rendezvous = !vendor_is_amd && (family > 6 || (family == 6 && model >= 0xe));
		monarch_timeout_us = bi->monarch_timeout_us != MONARCH_DEFAULT ? bi->monarch_timeout_us
					: intel_rendezvous ? 1000000 : 0;
		for (u32 i = 0; i < n; i++)
			bank_on[i] = 1;
		/* Intel family 6 before model 0x1a: never touch bank 0 (the "bank 0 quirk"). */
		if (!vendor_is_amd && family == 6 && model < 0x1a && n)
			bank_on[0] = 0;
	}
	poll_boot_errors(cpu);
	int mce_on = !(bi->flags & BI_NO_CR4_MCE);
	write_cr4(mce_on ? read_cr4() | CR4_MCE : read_cr4() & ~CR4_MCE);
	if (cap & MCG_CTL_P)
		wrmsr_warn(MSR_MCG_CTL, ~0ull);
	u32 cmci = 0;
	if (!vendor_is_amd && (cap & MCG_CMCI_P))
		cmci = cmci_discover();
	u32 lmce = 0;
	if (!vendor_is_amd && ser && (cap & MCG_LMCE_P)) {
		u64 fc = rdmsr_warn(MSR_FEATURE_CONTROL);
		if ((fc & 1) && (fc & (1ull << 20))) {
			wrmsr_warn(MSR_MCG_EXT_CTL, 1);
			lmce = 1;
		}
	}
	u32 used = 0;
	for (u32 i = 0; i < n; i++) {
		if (!bank_on[i])
			continue;
		wrmsr_warn(MSR_MC0_CTL + 4 * i, ~0ull);
		wrmsr_warn(MSR_MC0_CTL + 4 * i + 1, 0);
		if (rdmsr_warn(MSR_MC0_CTL + 4 * i))
			used |= 1u << i;
		else if (cpu == 0)
			bank_on[i] = 0; /* a bank whose CTL reads 0 is unused */
	}
	atomic_set(&mca_ready[cpu], 1);
	printk("@vmce mca cpu=%u vendor=%s family=%#x model=%#x mcg_cap=%#lx banks=%u used=%#x "
	       "cmci=%#x lmce=%u cr4_mce=%u monarch_timeout_us=%lu\n",
	       cpu, vendor_is_amd ? "amd" : "intel", family, model, cap, n, used, cmci, lmce,
	       mce_on, monarch_timeout_us);
}

/* -- grading --------------------------------------------------------------------------- */

static enum ctx error_context(const struct frame *f, u64 mcgst)
{
	if ((f->cs & 3) == 3)
		return IN_USER;
	(void)mcgst; /* no MCE-safe fix-up areas in this kernel: never IN_KERNEL_RECOV */
	return IN_KERNEL;
}

static u8 grade_intel(u64 status, u64 mcgst, enum ctx ctx, const char **msg)
{
	for (const struct severity *s = severities;; s++) {
		if ((status & s->mask) != s->result || (mcgst & s->mcgmask) != s->mcgres)
			continue;
		if ((s->ser == SER_REQUIRED && !ser) || (s->ser == NO_SER && ser))
			continue;
		if (s->ctx && s->ctx != ctx)
			continue;
		*msg = s->msg;
		if (s->sev >= SEV_UC && ctx == IN_KERNEL)
			return SEV_PANIC;
		return s->sev;
	}
}

static u8 grade_amd(u64 status, enum ctx ctx, const char **msg)
{
	*msg = 0;
	if (status & ST_PCC) {
		*msg = "Processor Context Corrupt";
		return SEV_PANIC;
	}
	if (status & ST_DEFERRED)
		return SEV_UCNA;
	if (!(status & ST_UC))
		return SEV_KEEP;
	if ((status & ST_OVER) && !amd_overflow_recov) {
		*msg = "Overflowed uncorrected error without MCA Overflow Recovery";
		return SEV_PANIC;
	}
	if (!amd_succor) {
		*msg = "Uncorrected error without MCA Recovery";
		return SEV_PANIC;
	}
	if (ctx == IN_KERNEL) {
		*msg = "Uncorrected unrecoverable error in kernel context";
		return SEV_PANIC;
	}
	return SEV_AR;
}

static u8 grade(u64 status, u64 mcgst, enum ctx ctx, const char **msg)
{
	return vendor_is_amd ? grade_amd(status, ctx, msg) : grade_intel(status, mcgst, ctx, msg);
}

/* -- reporting and panic --------------------------------------------------------------- */

static void print_record(const struct mce_rec *r)
{
	printk("mce: [Hardware Error]: CPU %u: Machine Check%s: %lx Bank %u: %016lx\n", r->cpu,
	       (r->mcg_status & MCG_MCIP) ? " Exception" : "", r->mcg_status, r->bank, r->status);
	if (r->rip)
		printk("mce: [Hardware Error]: RIP%s %02lx:<%016lx>\n",
		       (r->mcg_status & MCG_EIPV) ? "" : " !INEXACT!", r->cs, r->rip);
	printk("mce: [Hardware Error]: TSC %lx ADDR %lx MISC %lx\n", rdtsc(), r->addr, r->misc);
}

static void mce_panic(const char *msg, const struct mce_rec *r, const char *why)
{
	if (atomic_inc(&mce_paniced) > 1) {
		for (;;) /* another CPU is panicking: wait for it */
			hlt();
	}
	console_panic_takeover();
	for (u32 c = 0; c < bi->ncpus; c++)
		if (cpu_has_rec[c] && &cpu_rec[c] != r)
			print_record(&cpu_rec[c]);
	if (r)
		print_record(r);
	if (why)
		printk("mce: [Hardware Error]: Machine check: %s\n", why);
	panic(msg);
}

static void cpu_list(char *out, u32 size)
{
	u32 n = 0;
	for (u32 c = 0; c < bi->ncpus && n + 4 < size; c++) {
		if (atomic_read(&cpu_entered[c]))
			continue;
		if (n)
			out[n++] = ',';
		if (c >= 10)
			out[n++] = (char)('0' + c / 10);
		out[n++] = (char)('0' + c % 10);
	}
	out[n] = 0;
}

static void mce_timed_out(u64 deadline, const char *msg)
{
	if (rdtsc() < deadline)
		return;
	char missing[3 * MAX_CPUS + 4];
	cpu_list(missing, sizeof(missing));
	if (atomic_read(&mce_paniced) == 0)
		printk("mce: CPUs not responding to MCE broadcast (may include false positives): %s\n",
		       missing);
	mce_panic(msg, 0, 0);
}

/* -- rendezvous ------------------------------------------------------------------------ */

static int mce_start(u32 cpu, u32 *no_way_out)
{
	if (!monarch_timeout_us)
		return -1;
	u64 deadline = tsc_deadline_us(monarch_timeout_us);
	__atomic_add_fetch(&global_nwo, *no_way_out, __ATOMIC_SEQ_CST);
	u32 order = atomic_inc(&mce_callin);
	atomic_set(&cpu_entered[cpu], 1);
	while (atomic_read(&mce_callin) != bi->ncpus) {
		mce_timed_out(deadline, "Timeout: Not all CPUs entered broadcast exception handler");
		cpu_relax();
	}
	*no_way_out = atomic_read(&global_nwo);
	if (order == 1) {
		atomic_set(&mce_executing, 1);
	} else {
		while (atomic_read(&mce_executing) < order) {
			mce_timed_out(deadline,
				      "Timeout: Subject CPUs unable to finish machine check processing");
			cpu_relax();
		}
	}
	return (int)order;
}

static void mce_reign(void)
{
	u8 worst = 0;
	const char *msg = 0;
	const struct mce_rec *rec = 0;
	for (u32 c = 0; c < bi->ncpus; c++) {
		if (cpu_worst[c] > worst) {
			worst = cpu_worst[c];
			msg = cpu_msg[c];
			rec = cpu_has_rec[c] ? &cpu_rec[c] : 0;
		}
	}
	if (worst >= SEV_PANIC)
		mce_panic("Fatal machine check", rec, msg);
	if (worst <= SEV_KEEP)
		mce_panic("Fatal machine check from unknown source", 0, 0);
}

static void mce_reset(void)
{
	atomic_set(&global_nwo, 0);
	atomic_set(&mce_callin, 0);
	for (u32 c = 0; c < bi->ncpus; c++) {
		atomic_set(&cpu_entered[c], 0);
		cpu_has_rec[c] = 0; /* a later panic must not print this #MC's records */
	}
	atomic_set(&mce_executing, 0);
}

static int mce_end(int order)
{
	if (order < 0)
		return -1;
	u64 deadline = tsc_deadline_us(monarch_timeout_us);
	atomic_inc(&mce_executing);
	if (order == 1) {
		while (atomic_read(&mce_executing) <= bi->ncpus) {
			mce_timed_out(deadline,
				      "Timeout: Monarch CPU unable to finish machine check processing");
			cpu_relax();
		}
		mce_reign();
		mce_reset();
		return 0;
	}
	while (atomic_read(&mce_executing) != 0) {
		mce_timed_out(deadline, "Timeout: Monarch CPU did not finish machine check processing");
		cpu_relax();
	}
	return 0;
}

/* -- the handler ----------------------------------------------------------------------- */

static int usable_address(const struct mce_rec *r)
{
	if (!(r->status & ST_ADDRV))
		return 0;
	if (vendor_is_amd)
		return 1;
	return (r->status & ST_MISCV) && (r->misc & 0x3f) <= 12 && ((r->misc >> 6) & 7) == 2;
}

void do_machine_check(struct frame *f)
{
	u32 cpu = this_cpu();
	if (!atomic_read(&mca_ready[cpu])) {
		printk("CPU#%u: Unexpected int18 (Machine Check)\n", cpu);
		return;
	}
	console_defer(1);
	u64 mcgst = mce_rdmsr(MSR_MCG_STATUS);
	enum ctx ctx = error_context(f, mcgst);
	printk("@vmce mce-enter cpu=%u mcg_status=%#lx cs=%#lx rip=%#lx ctx=%s cr4_mce=%u\n", cpu,
	       mcgst, f->cs, f->rip, ctx == IN_USER ? "user" : "kernel",
	       (read_cr4() & CR4_MCE) ? 1u : 0u);
	u32 lmce = vendor_is_amd ? 1 : !!(mcgst & MCG_LMCES);
	u32 kill_current_task = !(mcgst & MCG_RIPV);
	u32 no_way_out = 0;
	const char *nwo_msg = 0;
	struct mce_rec nwo_rec = {0};

	for (u32 i = 0; i < nbanks; i++) {
		if (!bank_on[i])
			continue;
		u64 st = mce_rdmsr(MSR_MC0_CTL + 4 * i + 1);
		if (!(st & ST_VAL))
			continue;
		const char *msg = 0;
		if (grade(st, mcgst, ctx, &msg) >= SEV_PANIC) {
			no_way_out = 1;
			nwo_msg = msg;
			nwo_rec = (struct mce_rec){st, (st & ST_ADDRV) ? mce_rdmsr(MSR_MC0_CTL + 4 * i + 2) : 0,
						   (st & ST_MISCV) ? mce_rdmsr(MSR_MC0_CTL + 4 * i + 3) : 0,
						   mcgst, f->rip, f->cs, i, cpu, SEV_PANIC, msg};
		}
	}
	if (lmce && no_way_out)
		mce_panic("Fatal local machine check", &nwo_rec, nwo_msg);

	int order = lmce ? -1 : mce_start(cpu, &no_way_out);

	u8 worst = 0;
	const char *worst_msg = 0;
	u32 logged = 0;
	struct mce_rec rec = {0};
	u32 to_clear = 0;
	for (u32 i = 0; i < nbanks; i++) {
		if (!bank_on[i])
			continue;
		u64 st = mce_rdmsr(MSR_MC0_CTL + 4 * i + 1);
		if (!(st & ST_VAL))
			continue;
		if (!no_way_out && !(ser ? (st & ST_S) : (st & ST_UC)))
			continue;
		const char *msg = 0;
		u8 sev = grade(st, mcgst, ctx, &msg);
		if ((sev == SEV_KEEP || sev == SEV_UCNA) && !no_way_out)
			continue;
		to_clear |= 1u << i;
		if (sev == SEV_NO)
			continue;
		struct mce_rec r = {st, (st & ST_ADDRV) ? mce_rdmsr(MSR_MC0_CTL + 4 * i + 2) : 0,
				    (st & ST_MISCV) ? mce_rdmsr(MSR_MC0_CTL + 4 * i + 3) : 0,
				    mcgst, f->rip, f->cs, i, cpu, sev, msg};
		if (ser && (r.status & ST_MISCV) && (r.misc & 0x3f) <= 63)
			r.addr &= ~((1ull << (r.misc & 0x3f)) - 1);
		printk("@vmce mce cpu=%u bank=%u status=%#lx addr=%#lx misc=%#lx mcg_status=%#lx "
		       "sev=%s ctx=%s msg=\"%s\"\n",
		       cpu, i, r.status, r.addr, r.misc, mcgst, sev_name[sev],
		       ctx == IN_USER ? "user" : "kernel", msg ? msg : "");
		logged++;
		if (sev >= worst) {
			worst = sev;
			worst_msg = msg;
			rec = r;
		}
	}
	cpu_worst[cpu] = worst;
	cpu_msg[cpu] = worst_msg;
	cpu_rec[cpu] = rec;
	cpu_has_rec[cpu] = logged != 0;

	if (!no_way_out)
		for (u32 i = 0; i < nbanks; i++)
			if (to_clear & (1u << i))
				mce_wrmsr(MSR_MC0_CTL + 4 * i + 1, 0);

	if (!lmce) {
		if (mce_end(order) < 0) {
			if (!no_way_out)
				no_way_out = worst >= SEV_PANIC;
			if (no_way_out)
				mce_panic("Fatal machine check on current CPU", logged ? &rec : 0,
					  worst_msg);
		}
	} else if (worst >= SEV_PANIC) {
		mce_panic("Local fatal machine check!", &rec, worst_msg);
	}

	console_defer(0);
	if (order < 0)
		cpu_has_rec[cpu] = 0; /* no rendezvous reset will clear it */
	if (logged && atomic_inc(&taint_printed) == 1)
		printk("Disabling lock debugging due to kernel taint\n");

	if (worst == SEV_AR || kill_current_task) {
		if (ctx == IN_USER) {
			if (!kill_current_task && usable_address(&rec))
				memory_failure(rec.addr >> 12, 1, cpu);
			printk("@vmce kill cpu=%u task=usertask%u reason=%s\n", cpu, cpu,
			       kill_current_task ? "no-restart-ip" : "action-required");
			restart_user_task(f);
		}
	}
	if (logged && worst == SEV_AO) {
		printk("mce: [Hardware Error]: Machine check events logged\n");
		if (usable_address(&rec))
			memory_failure(rec.addr >> 12, 0, cpu);
	}
	if (!(bi->flags & BI_KEEP_MCIP))
		mce_wrmsr(MSR_MCG_STATUS, 0);
	printk("@vmce mce-exit cpu=%u worst=%s\n", cpu, sev_name[worst]);
}
