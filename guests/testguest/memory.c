/*
 * memory_failure(): what Linux's mm/memory-failure.c reports for a poisoned page, in its words.
 * The guest's own image and stacks are kernel pages; every other page of RAM is free.
 */
#include "kernel.h"

#define MAX_POISONED 64

extern u8 __image_start[], __image_end[];
static u64 poisoned[MAX_POISONED];
static volatile u32 npoisoned;
static volatile u64 corrupted_kb;

static int already_poisoned(u64 pfn)
{
	for (u32 i = 0; i < npoisoned; i++)
		if (poisoned[i] == pfn)
			return 1;
	return 0;
}

void memory_failure(u64 pfn, int action_required, u32 cpu)
{
	if (bi->mem_bytes && pfn >= bi->mem_bytes >> 12) {
		printk("Memory failure: %#lx: memory outside kernel control\n", pfn);
		return;
	}
	if (already_poisoned(pfn)) {
		printk("Memory failure: %#lx: already hardware poisoned\n", pfn);
		return;
	}
	if (npoisoned < MAX_POISONED)
		poisoned[npoisoned++] = pfn;
	corrupted_kb += 4;
	const char *type, *result = "Recovered";
	if (pfn >= (u64)__image_start >> 12 && pfn < (u64)__image_end >> 12) {
		type = "reserved kernel page";
		result = "Ignored";
	} else if (action_required) {
		printk("Memory failure: %#lx: Sending SIGBUS to usertask%u:%u due to hardware memory "
		       "corruption\n", pfn, cpu, task_generation[cpu] + 1);
		type = "dirty LRU page";
	} else {
		type = "free buddy page";
	}
	printk("Memory failure: %#lx: recovery action for %s: %s\n", pfn, type, result);
	printk("@vmce memory-failure cpu=%u pfn=%#lx type=\"%s\" result=%s corrupted_kb=%lu\n", cpu,
	       pfn, type, result, corrupted_kb);
}
