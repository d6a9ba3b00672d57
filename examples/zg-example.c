// SPDX-License-Identifier: GPL-2.0
/*
 * zg-example: a device job on your own memory through /dev/zapguard, using only zapguard.h.
 *
 * It opens a context, lets the device copy a buffer it never saw (the driver serves the device's
 * faults, as for a CPU page fault), checks the copy and the device's checksum, unmaps the source
 * (the driver shoots the device TLB down before the kernel frees the pages), and reads the
 * context's counters. Exit status 0 means every step did what it should.
 *
 * Build (static: the guest has no C library):
 *   gcc -static -O2 -Wall -I target/zapguard/include examples/zg-example.c -o zg-example
 * Run in the guest:
 *   just run --exec target/zapguard/examples/zg-example [PAGES]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "zapguard.h"

#define PAGE 4096ul

static int fail(const char *what)
{
	fprintf(stderr, "zg-example: %s: %s\n", what, strerror(errno));
	return 1;
}

/* The device's DMA_CHECKSUM: FNV-1a 64. */
static uint64_t fnv1a64(const unsigned char *p, size_t n)
{
	uint64_t h = ZG_FNV_OFFSET;

	while (n--) {
		h ^= *p++;
		h *= ZG_FNV_PRIME;
	}
	return h;
}

/* Runs one job and reports its status. */
static int job(int fd, struct zg_dma *d, const char *what)
{
	if (ioctl(fd, ZG_IOC_DMA, d) != 0) {
		fprintf(stderr, "zg-example: %s: %s (status %u, fault reason %u, %llu bytes done)\n",
			what, strerror(errno), d->status, d->fault_reason,
			(unsigned long long)d->bytes_done);
		return 1;
	}
	printf("zg-example: %s: %llu bytes in %llu us, %u device faults\n", what,
	       (unsigned long long)d->bytes_done, (unsigned long long)d->elapsed_ns / 1000,
	       d->faults);
	return 0;
}

int main(int argc, char **argv)
{
	size_t pages = argc > 1 ? strtoul(argv[1], NULL, 0) : 64;
	size_t len = pages * PAGE;
	/* Every argument says which size of the structure this program was built with. */
	struct zg_info info = { .size = sizeof(info) };
	struct zg_stats st = { .size = sizeof(st) };
	unsigned char *src, *dst;
	uint64_t violations = 0;
	size_t i;
	int fd;

	if (pages == 0 || len > ZG_DMA_MAX_LEN) {
		fprintf(stderr, "zg-example: PAGES must be 1..%llu\n", ZG_DMA_MAX_LEN / PAGE);
		return 2;
	}
	fd = open("/dev/zapguard", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return fail("open /dev/zapguard");
	if (ioctl(fd, ZG_IOC_GET_INFO, &info) != 0)
		return fail("GET_INFO");
	printf("zg-example: uAPI %u.%u, device ABI %u.%u, %u IOTLB entries, %u ASIDs\n",
	       info.uapi_version >> 16, info.uapi_version & 0xffff, info.version >> 16,
	       info.version & 0xffff, info.iotlb_entries, info.asid_count);
	/* Same major version: every later minor version keeps this program working. */
	if (info.uapi_version >> 16 != ZG_UAPI_VERSION >> 16) {
		fprintf(stderr, "zg-example: driver speaks uAPI %u.x, this header %u.x\n",
			info.uapi_version >> 16, (unsigned)(ZG_UAPI_VERSION >> 16));
		return 1;
	}

	src = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	dst = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (src == MAP_FAILED || dst == MAP_FAILED)
		return fail("mmap");
	for (size_t b = 0; b < len; b++)
		src[b] = (unsigned char)(b * 7 + b / PAGE);

	/* No MAP first: the device faults on both buffers and the driver serves the faults. */
	struct zg_dma copy = { .size = sizeof(copy), .op = ZG_DMA_COPY, .src = (uintptr_t)src,
			       .dst = (uintptr_t)dst, .len = len };
	if (job(fd, &copy, "DMA_COPY"))
		return 1;
	if (memcmp(src, dst, len) != 0) {
		fprintf(stderr, "zg-example: the copy differs from the source\n");
		return 1;
	}
	struct zg_dma sum = { .size = sizeof(sum), .op = ZG_DMA_CHECKSUM, .src = (uintptr_t)dst,
			      .len = len };
	if (job(fd, &sum, "DMA_CHECKSUM"))
		return 1;
	if (sum.result != fnv1a64(dst, len)) {
		fprintf(stderr, "zg-example: device checksum %#llx, CPU %#llx\n",
			(unsigned long long)sum.result, (unsigned long long)fnv1a64(dst, len));
		return 1;
	}

	/* munmap: the driver's invalidation callback shoots down the device's entries. */
	if (munmap(src, len) != 0)
		return fail("munmap");
	if (ioctl(fd, ZG_IOC_STATS, &st) != 0)
		return fail("STATS");
	for (i = 0; i < ZG_VIOL_CLASSES; i++)
		violations += st.violations[i];
	printf("zg-example: asid %u: %llu invalidations, %llu pages zapped, %llu SYNC waits, "
	       "%llu device faults (%llu pages), %llu violations\n",
	       st.asid, (unsigned long long)st.invalidations, (unsigned long long)st.pages_zapped,
	       (unsigned long long)st.sync_waits, (unsigned long long)st.faults,
	       (unsigned long long)st.fault_pages, (unsigned long long)violations);
	if (st.pages_zapped < pages || violations != 0) {
		fprintf(stderr, "zg-example: expected >= %zu pages zapped and no violation\n", pages);
		return 1;
	}
	printf("zg-example: ok\n");
	return 0;
}
