/*
 * Console: a line-buffered printk to the 16550 at COM1.
 *
 * The VMM's UART is always ready, so the guest writes THR without polling LSR (one exit per
 * byte instead of two). One lock serialises lines across CPUs; a CPU that takes a #MC while
 * it holds the lock re-enters it, so a machine check can always print.
 */
#include <stdarg.h>
#include "kernel.h"

static volatile u32 console_owner = 0xffffffffu;
static volatile u32 console_depth;

static void lock(void)
{
	u32 me = this_cpu();
	if (atomic_read(&console_owner) == me) {
		console_depth++;
		return;
	}
	for (;;) {
		u32 free = 0xffffffffu;
		if (__atomic_compare_exchange_n(&console_owner, &free, me, 0, __ATOMIC_ACQUIRE,
						__ATOMIC_RELAXED))
			break;
		cpu_relax();
	}
	console_depth = 1;
}

static void unlock(void)
{
	if (--console_depth == 0)
		__atomic_store_n(&console_owner, 0xffffffffu, __ATOMIC_RELEASE);
}

/* After a panic, other CPUs may be stuck holding the lock forever. */
void console_break_locks(void)
{
	__atomic_store_n(&console_owner, this_cpu(), __ATOMIC_RELEASE);
	console_depth = 1;
}

struct buf {
	char data[256];
	u32 len;
};

static void put(struct buf *b, char c)
{
	if (b->len < sizeof(b->data) - 1)
		b->data[b->len++] = c;
}

static void put_str(struct buf *b, const char *s)
{
	if (!s)
		s = "(null)";
	while (*s)
		put(b, *s++);
}

static void put_num(struct buf *b, u64 v, u32 base, int width, char pad, int neg)
{
	char tmp[24];
	int n = 0;
	do {
		u32 d = (u32)(v % base);
		tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	if (neg)
		tmp[n++] = '-';
	while (n < width--)
		put(b, pad);
	while (n)
		put(b, tmp[--n]);
}

static void format(struct buf *b, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			put(b, *fmt);
			continue;
		}
		fmt++;
		int alt = 0, width = 0, longs = 0;
		char pad = ' ';
		if (*fmt == '#') {
			alt = 1;
			fmt++;
		}
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') {
			longs++;
			fmt++;
		}
		u64 v;
		switch (*fmt) {
		case 's':
			put_str(b, va_arg(ap, const char *));
			break;
		case 'c':
			put(b, (char)va_arg(ap, int));
			break;
		case 'd': {
			long long s = longs ? va_arg(ap, long long) : va_arg(ap, int);
			put_num(b, s < 0 ? (u64)-s : (u64)s, 10, width, pad, s < 0);
			break;
		}
		case 'u':
			v = longs ? va_arg(ap, u64) : va_arg(ap, u32);
			put_num(b, v, 10, width, pad, 0);
			break;
		case 'x':
			v = longs ? va_arg(ap, u64) : va_arg(ap, u32);
			if (alt)
				put_str(b, "0x");
			put_num(b, v, 16, width, pad, 0);
			break;
		case '%':
			put(b, '%');
			break;
		default:
			put(b, '?');
		}
	}
}

/* The CPU that panics owns the console; every other CPU stops at its next printk. */
static volatile u32 panic_cpu = 0xffffffffu;

void console_panic_takeover(void)
{
	u32 me = this_cpu(), none = 0xffffffffu;
	if (!__atomic_compare_exchange_n(&panic_cpu, &none, me, 0, __ATOMIC_SEQ_CST,
					 __ATOMIC_SEQ_CST) && none != me) {
		for (;;) /* another CPU is already panicking */
			hlt();
	}
	/* Let a CPU that is in the middle of a line finish it (bounded), then take the lock. */
	for (u32 i = 0; i < 100000 && atomic_read(&console_owner) != 0xffffffffu &&
			atomic_read(&console_owner) != me; i++)
		cpu_relax();
	console_break_locks();
	console_defer(0);
}

/*
 * Deferred lines: while a CPU is in the #MC rendezvous it must not wait for the console lock
 * (the holder may be another CPU that is waiting for it in the rendezvous), so its lines are
 * kept and printed after the rendezvous, as Linux logs to a buffer in #MC context.
 */
#define DEFER_LINES 8
static struct buf deferred[MAX_CPUS][DEFER_LINES];
static u32 ndeferred[MAX_CPUS];
static u32 deferring[MAX_CPUS];

static void emit(const struct buf *b)
{
	lock();
	for (u32 i = 0; i < b->len; i++)
		outb(COM1, (u8)b->data[i]);
	unlock();
}

void console_defer(int on)
{
	u32 me = this_cpu();
	deferring[me] = (u32)on;
	if (on)
		return;
	for (u32 i = 0; i < ndeferred[me]; i++)
		emit(&deferred[me][i]);
	ndeferred[me] = 0;
}

void printk(const char *fmt, ...)
{
	u32 me = this_cpu();
	u32 owner = atomic_read(&panic_cpu);
	if (owner != 0xffffffffu && owner != me) {
		for (;;)
			hlt();
	}
	struct buf b;
	b.len = 0;
	va_list ap;
	va_start(ap, fmt);
	format(&b, fmt, ap);
	va_end(ap);
	if (deferring[me]) {
		if (ndeferred[me] < DEFER_LINES)
			deferred[me][ndeferred[me]++] = b;
		return;
	}
	emit(&b);
}
