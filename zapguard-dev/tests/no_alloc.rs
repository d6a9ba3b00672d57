//! The DMA engine allocates nothing per step: a job that misses the IOTLB on every page (so
//! every step walks, fills and evicts), with the validator on, runs without touching the heap,
//! with no event sink, with the binary trace writer and with the JSON Lines one.
//!
//! A global allocator counts this thread's allocations; it is the only test in this binary so
//! that nothing else shares the count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io;

use shared_regs::dma::{DMA_COPY, DMA_ST_OK};
use shared_regs::pte::PAGE_SIZE as PG;
use shared_regs::regs::{STAT_IOTLB_EVICTIONS, STAT_VIOLATIONS};
use zapguard_dev::{JsonTraceWriter, TraceWriter};
use zapguard_model::events::Events;
use zapguard_model::testkit::{job, Rig};
use zapguard_model::{DeviceConfig, NoEvents};

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: every call is forwarded to the system allocator unchanged; the count is a
// thread-local `Cell` with a const initialiser and no destructor, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with `layout`, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SRC: u64 = 0x7f00_0000_0000;
const DST: u64 = 0x7f00_4000_0000;
const PAGES: u64 = 128;

/// Allocations made by one 512 KiB copy on a rig that already ran one.
fn allocations_per_job<E: Events>(events: E) -> u64 {
    let mut r = Rig::new(DeviceConfig::default(), events);
    r.bind(1, 0);
    for p in 0..PAGES {
        r.map_page(1, SRC + p * PG);
        r.map_page(1, DST + p * PG);
    }
    let j = job(DMA_COPY, 1, SRC + 0x80, DST + 0x100, (PAGES - 1) * PG, 0);
    let warm = r.dma(j);
    assert_eq!(warm.status, DMA_ST_OK);
    let st = r.submit(j);
    let before = ALLOCS.with(Cell::get);
    r.run();
    let n = ALLOCS.with(Cell::get) - before;
    assert_eq!(r.status(st).status, DMA_ST_OK);
    assert!(r.stat(STAT_IOTLB_EVICTIONS) > 0, "a thrashing IOTLB");
    assert_eq!(r.stat(STAT_VIOLATIONS), 0);
    n
}

#[test]
fn dma_steps_do_not_allocate() {
    assert_eq!(allocations_per_job(NoEvents), 0, "no event sink");
    assert_eq!(
        allocations_per_job(TraceWriter::new(io::sink()).expect("trace writer")),
        0,
        "tracing to a writer"
    );
    assert_eq!(
        allocations_per_job(JsonTraceWriter::new(io::sink())),
        0,
        "tracing JSON to a writer"
    );
}
