//! The IOTLB: a bounded cache of device translations, tagged by ASID, holding 4 KiB and 2 MiB
//! pages side by side.
//!
//! Entries live in a dense slab threaded on a doubly linked list (oldest or least recently used
//! first) and are indexed by a hash map keyed by (ASID, page number), with 4 KiB and 2 MiB page
//! numbers kept apart. So:
//!
//! - lookup: at most two hash probes (4 KiB, then 2 MiB) and an O(1) list move for LRU;
//! - insert and eviction: O(1) for every policy (removal swaps the last slot into the hole);
//! - range invalidation: O(min(pages in the range, entries));
//! - ASID and global invalidation: O(entries).
//!
//! With [`Iotlb::set_keep`] (the device's `IOTLB_KEEP` test knob) a full IOTLB evicts nothing:
//! [`Iotlb::insert`] then leaves a new entry out (counted in [`IotlbStats::not_cached`]), so
//! cached entries stay until an invalidation drops them.
//!
//! Keys are guest-chosen VAs, so the map's hash is keyed with a per-cache random seed: a guest
//! cannot aim its VAs at one bucket. The seed changes nothing observable (iteration and
//! replacement follow the slab and the list, not the map).

use shared_regs::pte;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

/// A cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbEntry {
    /// Address-space ID.
    pub asid: u32,
    /// First VA of the page (aligned to `size`).
    pub va_base: u64,
    /// [`pte::PAGE_SIZE`] or [`pte::HUGE_PAGE_SIZE`].
    pub size: u64,
    /// Guest-physical address of the page frame.
    pub pa_base: u64,
    /// The device may write through this entry.
    pub writable: bool,
    /// The leaf's D bit was set when the entry was filled.
    pub dirty: bool,
    /// Unique translation id assigned by the device (tracked by the ledger).
    pub id: u64,
    /// The validator's snapshot of the CPU PTE's dirty bit at fill time (opaque here).
    pub cpu_dirty_at_fill: bool,
}

impl IotlbEntry {
    /// Last VA covered (inclusive, so a page at the top of the space does not overflow).
    fn last(&self) -> u64 {
        self.va_base.saturating_add(self.size.saturating_sub(1))
    }

    /// Whether the entry shares a byte with `[va, last]`.
    fn overlaps(&self, asid: u32, va: u64, last: u64) -> bool {
        self.asid == asid && self.va_base <= last && va <= self.last()
    }
}

/// Which entry a full IOTLB evicts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// The least recently looked up or inserted.
    #[default]
    Lru,
    /// The least recently inserted (hits do not refresh).
    Fifo,
    /// A pseudo-random entry, from a generator seeded with `seed`: the same sequence of
    /// operations evicts the same entries.
    Random {
        /// Generator seed (any value, 0 included).
        seed: u64,
    },
}

/// IOTLB counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbStats {
    /// Lookups that found an entry.
    pub hits: u64,
    /// Lookups that found none.
    pub misses: u64,
    /// Entries evicted to make room.
    pub evictions: u64,
    /// Entries dropped by invalidation.
    pub invalidated: u64,
    /// Entries not cached because the IOTLB was full and [`Iotlb::set_keep`] forbade an
    /// eviction.
    pub not_cached: u64,
}

const PAGE_SHIFT: u32 = pte::PAGE_SIZE.trailing_zeros();
const HUGE_SHIFT: u32 = pte::HUGE_PAGE_SIZE.trailing_zeros();
/// Marks a 2 MiB page number; 4 KiB page numbers never reach bit 63.
const HUGE_TAG: u64 = 1 << 63;
/// No slot (list end). Slot indices stay below it because capacity is clamped to it.
const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    asid: u32,
    page: u64,
}

fn key_4k(asid: u32, va: u64) -> Key {
    Key {
        asid,
        page: va >> PAGE_SHIFT,
    }
}

fn key_2m(asid: u32, va: u64) -> Key {
    Key {
        asid,
        page: va >> HUGE_SHIFT | HUGE_TAG,
    }
}

/// The key of a well-formed entry: a 4 KiB or 2 MiB page aligned to its size.
fn entry_key(e: &IotlbEntry) -> Option<Key> {
    match e.size {
        pte::PAGE_SIZE if e.va_base.is_multiple_of(pte::PAGE_SIZE) => {
            Some(key_4k(e.asid, e.va_base))
        }
        pte::HUGE_PAGE_SIZE if e.va_base.is_multiple_of(pte::HUGE_PAGE_SIZE) => {
            Some(key_2m(e.asid, e.va_base))
        }
        _ => None,
    }
}

/// A keyed multiply-xorshift hash for [`Key`]: much cheaper than SipHash on the hit path, and
/// unpredictable without the seed.
#[derive(Clone, Debug)]
struct SeededHash(u64);

impl BuildHasher for SeededHash {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(self.0)
    }
}

struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(31);
    }

    fn finish(&self) -> u64 {
        // murmur3's finaliser: spreads every input bit into the bucket bits.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ h >> 33
    }
}

/// splitmix64: tiny, full-period, good enough to pick victims.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ z >> 30).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ z >> 27).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ z >> 31
}

#[derive(Clone, Debug)]
struct Slot {
    entry: IotlbEntry,
    key: Key,
    prev: u32,
    next: u32,
}

/// The IOTLB.
///
/// # Invariants
///
/// `map` holds exactly one `key -> index` pair per slot, with `slots[index].key == key`; the list
/// from `head` to `tail` visits every slot once; `slots.len() <= capacity < NIL`.
#[derive(Clone, Debug)]
pub struct Iotlb {
    slots: Vec<Slot>,
    map: HashMap<Key, u32, SeededHash>,
    /// Least recently used (LRU) or inserted (FIFO, Random): the next victim for LRU/FIFO.
    head: u32,
    tail: u32,
    capacity: usize,
    policy: Policy,
    /// A full IOTLB evicts nothing: new entries are left out.
    keep: bool,
    rng: u64,
    stats: IotlbStats,
}

impl Iotlb {
    /// An empty IOTLB of `capacity` entries (0 is taken as 1).
    pub fn new(capacity: usize, policy: Policy) -> Self {
        let capacity = capacity.clamp(1, NIL as usize);
        // Capacity is host configuration, but do not trust it for a huge up-front allocation.
        let prealloc = capacity.min(1 << 16);
        let seed = RandomState::new().build_hasher().finish();
        Self {
            slots: Vec::with_capacity(prealloc),
            // Twice the entries: removals leave tombstones, and when they use up the table,
            // hashbrown rehashes in place only while it is at most half full; otherwise it
            // reallocates. So a full IOTLB churning on the DMA path never allocates.
            map: HashMap::with_capacity_and_hasher(2 * prealloc, SeededHash(seed)),
            head: NIL,
            tail: NIL,
            capacity,
            policy,
            keep: false,
            rng: match policy {
                Policy::Random { seed } => seed,
                _ => 0,
            },
            stats: IotlbStats::default(),
        }
    }

    /// Index of the entry covering `va` for `asid`; a 4 KiB entry wins over a 2 MiB one.
    fn find(&self, asid: u32, va: u64) -> Option<u32> {
        self.map
            .get(&key_4k(asid, va))
            .or_else(|| self.map.get(&key_2m(asid, va)))
            .copied()
    }

    /// Looks up the entry covering `va` for `asid`, counting a hit or a miss; a hit refreshes
    /// the entry for LRU.
    pub fn lookup(&mut self, asid: u32, va: u64) -> Option<IotlbEntry> {
        let Some(i) = self.find(asid, va) else {
            self.stats.misses += 1;
            return None;
        };
        self.stats.hits += 1;
        if self.policy == Policy::Lru && i != self.tail {
            self.unlink(i);
            self.push_back(i);
        }
        self.slots.get(i as usize).map(|s| s.entry)
    }

    /// The entry covering `va` for `asid`, without counting or refreshing it (diagnostics).
    pub fn peek(&self, asid: u32, va: u64) -> Option<&IotlbEntry> {
        self.slots
            .get(self.find(asid, va)? as usize)
            .map(|s| &s.entry)
    }

    /// Inserts `e` and returns the entry it pushed out, if any:
    ///
    /// - the previous entry for the same (ASID, `va_base`, `size`), replaced in place (not an
    ///   eviction; the new entry counts as the most recent for every policy); or
    /// - when full, the victim chosen by the policy (counted in `evictions`).
    ///
    /// When full and [`Self::keep`] is set, nothing is evicted: `e` is not cached (counted in
    /// `not_cached`) and `None` is returned. A replacement in place still happens.
    ///
    /// An entry whose size is not 4 KiB or 2 MiB, or whose `va_base` is not aligned to its
    /// size, is not cached (nothing the device's walker produces).
    pub fn insert(&mut self, e: IotlbEntry) -> Option<IotlbEntry> {
        let key = entry_key(&e)?;
        if let Some(&i) = self.map.get(&key) {
            let old = self
                .slots
                .get_mut(i as usize)
                .map(|s| std::mem::replace(&mut s.entry, e));
            if i != self.tail {
                self.unlink(i);
                self.push_back(i);
            }
            return old;
        }
        let full = self.slots.len() >= self.capacity;
        if full && self.keep {
            self.stats.not_cached += 1;
            return None;
        }
        let victim = if full { self.evict() } else { None };
        let i = self.slots.len() as u32;
        self.slots.push(Slot {
            entry: e,
            key,
            prev: NIL,
            next: NIL,
        });
        self.map.insert(key, i);
        self.push_back(i);
        victim
    }

    fn evict(&mut self) -> Option<IotlbEntry> {
        let victim = match self.policy {
            Policy::Lru | Policy::Fifo => self.head,
            Policy::Random { .. } => {
                let r = splitmix64(&mut self.rng);
                // Multiply-shift: an unbiased-enough index in [0, len) without a division.
                ((u128::from(r) * self.slots.len() as u128) >> 64) as u32
            }
        };
        let e = self.remove(victim)?;
        self.stats.evictions += 1;
        Some(e)
    }

    /// Drops every entry of `asid` sharing a byte with `[va, va + len)` (a 2 MiB entry only
    /// partly covered included). The end saturates at `u64::MAX`; `len == 0` drops nothing.
    /// Returns the dropped entries, in no particular order.
    pub fn invalidate_range(&mut self, asid: u32, va: u64, len: u64) -> Vec<IotlbEntry> {
        let mut out = Vec::new();
        let Some(last) = len.checked_sub(1).map(|l| va.saturating_add(l)) else {
            return out;
        };
        let (first_4k, last_4k) = (va >> PAGE_SHIFT, last >> PAGE_SHIFT);
        if last_4k - first_4k < self.slots.len() as u64 {
            // Fewer pages than entries: probe each 4 KiB and 2 MiB page number of the range.
            let keys_4k = (first_4k..=last_4k).map(|p| Key { asid, page: p });
            let keys_2m = (va >> HUGE_SHIFT..=last >> HUGE_SHIFT).map(|p| Key {
                asid,
                page: p | HUGE_TAG,
            });
            for key in keys_4k.chain(keys_2m) {
                if let Some(&i) = self.map.get(&key) {
                    out.extend(self.remove(i));
                }
            }
        } else {
            self.remove_where(&mut out, |e| e.overlaps(asid, va, last));
        }
        self.stats.invalidated += out.len() as u64;
        out
    }

    /// Drops every entry of `asid`; returns them.
    pub fn invalidate_asid(&mut self, asid: u32) -> Vec<IotlbEntry> {
        let mut out = Vec::new();
        self.remove_where(&mut out, |e| e.asid == asid);
        self.stats.invalidated += out.len() as u64;
        out
    }

    /// Drops every entry; returns them.
    pub fn invalidate_all(&mut self) -> Vec<IotlbEntry> {
        let out: Vec<IotlbEntry> = self.slots.drain(..).map(|s| s.entry).collect();
        self.map.clear();
        self.head = NIL;
        self.tail = NIL;
        self.stats.invalidated += out.len() as u64;
        out
    }

    /// The counters.
    pub fn stats(&self) -> IotlbStats {
        self.stats
    }

    /// Number of entries cached.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no entry is cached.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Maximum number of entries.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The replacement policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Sets whether a full IOTLB keeps its entries (evicts nothing) and leaves new ones out
    /// instead. Entries already cached are not touched either way.
    pub fn set_keep(&mut self, keep: bool) {
        self.keep = keep;
    }

    /// Whether a full IOTLB keeps its entries (see [`Self::set_keep`]).
    pub fn keep(&self) -> bool {
        self.keep
    }

    /// Every cached entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &IotlbEntry> {
        self.slots.iter().map(|s| &s.entry)
    }

    /// Removes the entries matching `pred` into `out`. Walks the slab from the end so a removal
    /// only swaps in an already-visited slot.
    fn remove_where(&mut self, out: &mut Vec<IotlbEntry>, pred: impl Fn(&IotlbEntry) -> bool) {
        for i in (0..self.slots.len()).rev() {
            if self.slots.get(i).is_some_and(|s| pred(&s.entry)) {
                out.extend(self.remove(i as u32));
            }
        }
    }

    /// Removes slot `i`, moving the last slot into its place.
    fn remove(&mut self, i: u32) -> Option<IotlbEntry> {
        let idx = i as usize;
        if idx >= self.slots.len() {
            return None;
        }
        self.unlink(i);
        let slot = self.slots.swap_remove(idx);
        self.map.remove(&slot.key);
        if let Some(moved) = self.slots.get(idx) {
            // The former last slot now lives at `i`: repoint its map entry and neighbours.
            let (key, prev, next) = (moved.key, moved.prev, moved.next);
            if let Some(ix) = self.map.get_mut(&key) {
                *ix = i;
            }
            self.set_next(prev, i);
            self.set_prev(next, i);
        }
        Some(slot.entry)
    }

    /// Sets `slots[at].next`, or `head` when `at` is NIL.
    fn set_next(&mut self, at: u32, to: u32) {
        match self.slots.get_mut(at as usize) {
            Some(s) => s.next = to,
            None => self.head = to,
        }
    }

    /// Sets `slots[at].prev`, or `tail` when `at` is NIL.
    fn set_prev(&mut self, at: u32, to: u32) {
        match self.slots.get_mut(at as usize) {
            Some(s) => s.prev = to,
            None => self.tail = to,
        }
    }

    fn unlink(&mut self, i: u32) {
        let Some(s) = self.slots.get_mut(i as usize) else {
            return;
        };
        let (prev, next) = (s.prev, s.next);
        s.prev = NIL;
        s.next = NIL;
        self.set_next(prev, next);
        self.set_prev(next, prev);
    }

    fn push_back(&mut self, i: u32) {
        let tail = self.tail;
        let Some(s) = self.slots.get_mut(i as usize) else {
            return;
        };
        s.prev = tail;
        s.next = NIL;
        self.set_next(tail, i);
        self.tail = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pte::{HUGE_PAGE_SIZE, PAGE_SIZE};

    fn e4k(asid: u32, va: u64, id: u64) -> IotlbEntry {
        IotlbEntry {
            asid,
            va_base: va,
            size: PAGE_SIZE,
            pa_base: 0x100_0000 + id * PAGE_SIZE,
            writable: true,
            dirty: false,
            id,
            cpu_dirty_at_fill: false,
        }
    }

    fn e2m(asid: u32, va: u64, id: u64) -> IotlbEntry {
        IotlbEntry {
            size: HUGE_PAGE_SIZE,
            pa_base: id * HUGE_PAGE_SIZE,
            ..e4k(asid, va, id)
        }
    }

    /// Checks the internal invariants: map <-> slots, and a list visiting every slot once.
    fn check(t: &Iotlb) {
        assert!(t.len() <= t.capacity());
        assert_eq!(t.map.len(), t.slots.len());
        for (k, &i) in &t.map {
            assert_eq!(t.slots[i as usize].key, *k);
            assert_eq!(Some(*k), entry_key(&t.slots[i as usize].entry));
        }
        let mut seen = vec![false; t.slots.len()];
        let (mut cur, mut prev) = (t.head, NIL);
        while cur != NIL {
            assert!(!seen[cur as usize], "list cycle");
            seen[cur as usize] = true;
            assert_eq!(t.slots[cur as usize].prev, prev);
            prev = cur;
            cur = t.slots[cur as usize].next;
        }
        assert_eq!(t.tail, prev);
        assert!(seen.iter().all(|&s| s), "list misses a slot");
    }

    fn ids(mut v: Vec<IotlbEntry>) -> Vec<u64> {
        let mut ids: Vec<u64> = v.drain(..).map(|e| e.id).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn hit_and_miss_counting() {
        let mut t = Iotlb::new(8, Policy::Lru);
        assert!(t.is_empty());
        assert_eq!(t.lookup(1, 0x1000), None);
        assert_eq!(t.insert(e4k(1, 0x1000, 7)), None);
        assert_eq!(t.lookup(1, 0x1fff).map(|e| e.id), Some(7));
        assert_eq!(t.lookup(1, 0x1000).map(|e| e.id), Some(7));
        assert_eq!(t.lookup(1, 0x2000), None);
        assert_eq!(t.lookup(1, 0xfff), None);
        assert_eq!(
            t.stats(),
            IotlbStats {
                hits: 2,
                misses: 3,
                evictions: 0,
                invalidated: 0,
                not_cached: 0,
            }
        );
        // peek counts nothing.
        assert_eq!(t.peek(1, 0x1800).map(|e| e.id), Some(7));
        assert_eq!(t.peek(1, 0x2000), None);
        assert_eq!(t.stats().hits, 2);
        assert_eq!((t.len(), t.capacity()), (1, 8));
        check(&t);
    }

    #[test]
    fn covers_4k_and_2m() {
        let mut t = Iotlb::new(8, Policy::Lru);
        t.insert(e2m(1, 0x4000_0000, 1));
        for va in [0x4000_0000, 0x4000_1234, 0x401f_ffff] {
            assert_eq!(t.lookup(1, va).map(|e| e.id), Some(1), "{va:#x}");
        }
        assert_eq!(t.lookup(1, 0x3fff_ffff), None);
        assert_eq!(t.lookup(1, 0x4020_0000), None);
        // A 4 KiB entry inside the 2 MiB one is the more specific match.
        t.insert(e4k(1, 0x4000_5000, 2));
        assert_eq!(t.lookup(1, 0x4000_5fff).map(|e| e.id), Some(2));
        assert_eq!(t.lookup(1, 0x4000_6000).map(|e| e.id), Some(1));
        // A 4 KiB page number never aliases a 2 MiB one.
        t.insert(e4k(1, 0x200 << 12, 3));
        assert_eq!(t.lookup(1, 0x20_0000).map(|e| e.id), Some(3));
        assert_eq!(t.lookup(1, 0x20_1000), None);
        check(&t);
    }

    #[test]
    fn malformed_entries_are_not_cached() {
        let mut t = Iotlb::new(4, Policy::Lru);
        let mut e = e4k(1, 0x1000, 1);
        e.size = 0x3000;
        assert_eq!(t.insert(e), None);
        assert_eq!(t.insert(e4k(1, 0x1800, 2)), None);
        assert_eq!(t.insert(e2m(1, 0x1000, 3)), None);
        e.size = 0;
        assert_eq!(t.insert(e), None);
        assert!(t.is_empty());
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let mut t = Iotlb::new(3, Policy::Lru);
        for i in 0..3 {
            assert_eq!(t.insert(e4k(1, i * PAGE_SIZE, i)), None);
        }
        t.lookup(1, 0); // 0 is now the most recent; 1 the least.
        assert_eq!(t.insert(e4k(1, 0x10_0000, 10)).map(|e| e.id), Some(1));
        assert_eq!(t.insert(e4k(1, 0x11_0000, 11)).map(|e| e.id), Some(2));
        assert_eq!(t.insert(e4k(1, 0x12_0000, 12)).map(|e| e.id), Some(0));
        assert_eq!(t.stats().evictions, 3);
        assert_eq!(t.len(), 3);
        // A miss does not refresh anything.
        t.lookup(1, 0x5000);
        assert_eq!(t.insert(e4k(1, 0x13_0000, 13)).map(|e| e.id), Some(10));
        check(&t);
    }

    #[test]
    fn fifo_evicts_oldest_inserted() {
        let mut t = Iotlb::new(3, Policy::Fifo);
        for i in 0..3 {
            t.insert(e4k(1, i * PAGE_SIZE, i));
        }
        for _ in 0..5 {
            t.lookup(1, 0); // hits do not matter for FIFO
        }
        assert_eq!(t.insert(e4k(1, 0x10_0000, 10)).map(|e| e.id), Some(0));
        assert_eq!(t.insert(e4k(1, 0x11_0000, 11)).map(|e| e.id), Some(1));
        assert_eq!(t.stats().evictions, 2);
        check(&t);
    }

    fn random_victims(seed: u64) -> Vec<u64> {
        let mut t = Iotlb::new(16, Policy::Random { seed });
        (0..200)
            .filter_map(|i| t.insert(e4k(1, i * PAGE_SIZE, i)).map(|e| e.id))
            .collect()
    }

    #[test]
    fn random_is_deterministic_per_seed() {
        let a = random_victims(42);
        assert_eq!(a.len(), 184);
        assert_eq!(a, random_victims(42));
        assert_ne!(a, random_victims(43));
        assert_ne!(a, (0..184).collect::<Vec<_>>(), "not FIFO");
        assert_eq!(random_victims(0).len(), 184, "seed 0 works");
        // Every id evicted at most once, and only ids that were inserted.
        let mut s = a.clone();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), a.len());
        assert!(s.iter().all(|&id| id < 200));
    }

    #[test]
    fn insert_same_key_replaces_in_place() {
        let mut t = Iotlb::new(2, Policy::Fifo);
        t.insert(e4k(1, 0x1000, 1));
        t.insert(e4k(1, 0x2000, 2));
        let mut new = e4k(1, 0x1000, 3);
        new.dirty = true;
        assert_eq!(
            t.insert(new).map(|e| e.id),
            Some(1),
            "returns the replaced entry"
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t.stats().evictions, 0);
        assert_eq!(t.lookup(1, 0x1000), Some(new));
        // The refilled entry counts as newest: 2 goes first.
        assert_eq!(t.insert(e4k(1, 0x3000, 4)).map(|e| e.id), Some(2));
        // Same VA, other size or ASID: a different key.
        let mut t = Iotlb::new(4, Policy::Lru);
        t.insert(e4k(1, 0x20_0000, 1));
        assert_eq!(t.insert(e2m(1, 0x20_0000, 2)), None);
        assert_eq!(t.insert(e4k(2, 0x20_0000, 3)), None);
        assert_eq!(t.len(), 3);
        check(&t);
    }

    #[test]
    fn capacity_one_and_zero() {
        for cap in [0, 1] {
            let mut t = Iotlb::new(cap, Policy::Lru);
            assert_eq!(t.capacity(), 1);
            assert_eq!(t.insert(e4k(1, 0x1000, 1)), None);
            assert_eq!(t.insert(e4k(1, 0x2000, 2)).map(|e| e.id), Some(1));
            assert_eq!(t.insert(e2m(1, 0, 3)).map(|e| e.id), Some(2));
            assert_eq!(t.lookup(1, 0x1000).map(|e| e.id), Some(3));
            assert_eq!(t.insert(e2m(1, 0, 4)).map(|e| e.id), Some(3));
            assert_eq!(t.stats().evictions, 2);
            assert_eq!(t.len(), 1);
            check(&t);
        }
        let mut t = Iotlb::new(1, Policy::Random { seed: 9 });
        t.insert(e4k(1, 0x1000, 1));
        assert_eq!(t.insert(e4k(1, 0x2000, 2)).map(|e| e.id), Some(1));
        check(&t);
    }

    #[test]
    fn keep_leaves_new_entries_out_of_a_full_iotlb() {
        for policy in [Policy::Lru, Policy::Fifo, Policy::Random { seed: 3 }] {
            let mut t = Iotlb::new(3, policy);
            t.set_keep(true);
            assert!(t.keep());
            for i in 0..3 {
                assert_eq!(t.insert(e4k(1, i * PAGE_SIZE, i)), None, "room: cached");
            }
            assert_eq!(t.stats().not_cached, 0);
            // Full: new pages are left out, nothing is evicted.
            for i in 3..10 {
                assert_eq!(t.insert(e4k(1, i * PAGE_SIZE, i)), None);
                assert_eq!(t.lookup(1, i * PAGE_SIZE), None, "{i} not cached");
            }
            let s = t.stats();
            assert_eq!((s.evictions, s.not_cached, t.len()), (0, 7, 3));
            for i in 0..3 {
                assert_eq!(t.lookup(1, i * PAGE_SIZE).map(|e| e.id), Some(i), "kept");
            }
            // The same page refilled (a write upgrade) still replaces in place.
            let mut up = e4k(1, PAGE_SIZE, 20);
            up.dirty = true;
            assert_eq!(t.insert(up).map(|e| e.id), Some(1));
            assert_eq!(t.lookup(1, PAGE_SIZE), Some(up));
            assert_eq!(t.stats().not_cached, 7);
            // An invalidation makes room, which the next fill takes.
            assert_eq!(ids(t.invalidate_range(1, 0, PAGE_SIZE)), [0]);
            assert_eq!(t.insert(e4k(1, 0x40_0000, 30)), None);
            assert_eq!(t.lookup(1, 0x40_0000).map(|e| e.id), Some(30));
            // Off again: a full IOTLB evicts as before.
            t.set_keep(false);
            assert!(t.insert(e4k(1, 0x50_0000, 31)).is_some());
            assert_eq!(t.stats().evictions, 1);
            check(&t);
        }
    }

    #[test]
    fn asid_isolation() {
        let mut t = Iotlb::new(8, Policy::Lru);
        t.insert(e4k(1, 0x1000, 1));
        t.insert(e4k(2, 0x1000, 2));
        t.insert(e2m(3, 0, 3));
        assert_eq!(t.lookup(1, 0x1000).map(|e| e.id), Some(1));
        assert_eq!(t.lookup(2, 0x1000).map(|e| e.id), Some(2));
        assert_eq!(t.lookup(3, 0x1000).map(|e| e.id), Some(3));
        assert_eq!(t.lookup(4, 0x1000), None);
        assert_eq!(ids(t.invalidate_range(2, 0, u64::MAX)), [2]);
        assert_eq!(ids(t.invalidate_asid(1)), [1]);
        assert_eq!(t.lookup(3, 0x1000).map(|e| e.id), Some(3));
        assert!(t.invalidate_asid(1).is_empty());
        assert_eq!(t.stats().invalidated, 2);
        check(&t);
    }

    #[test]
    fn invalidate_range_boundaries() {
        let mut t = Iotlb::new(16, Policy::Lru);
        t.insert(e4k(1, 0x1000, 1));
        t.insert(e4k(1, 0x2000, 2));
        t.insert(e4k(1, 0x3000, 3));
        t.insert(e2m(1, 0x40_0000, 4));
        // Ranges touching but not overlapping keep both neighbours.
        assert!(t.invalidate_range(1, 0x2000, 0).is_empty(), "empty range");
        assert!(t.invalidate_range(1, 0, 0x1000).is_empty());
        assert!(t.invalidate_range(1, 0x4000, 0x3f_c000).is_empty());
        assert!(t.invalidate_range(1, 0x60_0000, 0x1000).is_empty());
        assert_eq!(t.len(), 4);
        // One byte each side.
        assert_eq!(ids(t.invalidate_range(1, 0x1fff, 2)), [1, 2]);
        // A 2 MiB entry partly covered goes.
        assert_eq!(ids(t.invalidate_range(1, 0x5f_ffff, 1)), [4]);
        assert_eq!(ids(t.invalidate_range(1, 0x3fff, 1)), [3]);
        assert!(t.is_empty());
        assert_eq!(t.stats().invalidated, 4);
        check(&t);
    }

    #[test]
    fn invalidate_range_saturates() {
        let mut t = Iotlb::new(16, Policy::Lru);
        let top = !(PAGE_SIZE - 1);
        t.insert(e4k(1, top, 1));
        t.insert(e4k(1, top - PAGE_SIZE, 2));
        t.insert(e2m(1, !(HUGE_PAGE_SIZE - 1), 3));
        t.insert(e4k(1, 0, 4));
        assert_eq!(t.lookup(1, u64::MAX).map(|e| e.id), Some(1));
        assert!(t.invalidate_range(1, u64::MAX, 0).is_empty());
        // Wraps past the top: clipped there, never to address 0.
        assert_eq!(ids(t.invalidate_range(1, u64::MAX, u64::MAX)), [1, 3]);
        assert_eq!(ids(t.invalidate_range(1, top - 1, 2)), [2]);
        assert_eq!(t.lookup(1, 0).map(|e| e.id), Some(4));
        check(&t);
    }

    #[test]
    fn invalidate_range_probe_and_scan_agree() {
        // Small ranges probe the map, large ones scan; both must drop the same entries.
        for len in [1, 0x1000, 0x5000, 0x20_0000, 0x80_0000, 1 << 40] {
            for va in [0, 0xfff, 0x1000, 0x1f_f000, 0x20_0800, 0x3f_ffff] {
                let mut t = Iotlb::new(64, Policy::Lru);
                let mut expect = vec![];
                for i in 0..24u64 {
                    let e = if i % 3 == 0 {
                        e2m(1, i * HUGE_PAGE_SIZE / 3, i)
                    } else {
                        e4k(1, i * 0x3000, i)
                    };
                    t.insert(e);
                    t.insert(e4k(2, e.va_base, 100 + i));
                    if e.overlaps(1, va, va + len - 1) {
                        expect.push(i);
                    }
                }
                assert_eq!(
                    ids(t.invalidate_range(1, va, len)),
                    expect,
                    "{va:#x}+{len:#x}"
                );
                assert_eq!(t.len(), 48 - expect.len());
                check(&t);
            }
        }
    }

    #[test]
    fn invalidate_all_and_reuse() {
        let mut t = Iotlb::new(4, Policy::Lru);
        for i in 0..4 {
            t.insert(e4k(i as u32, 0x1000, i));
        }
        assert_eq!(ids(t.invalidate_all()), [0, 1, 2, 3]);
        assert!(t.is_empty() && t.iter().next().is_none());
        assert_eq!(t.stats().invalidated, 4);
        check(&t);
        for i in 0..6 {
            t.insert(e4k(1, i * PAGE_SIZE, i));
        }
        assert_eq!(t.len(), 4);
        let mut seen: Vec<u64> = t.iter().map(|e| e.id).collect();
        seen.sort_unstable();
        assert_eq!(seen, [2, 3, 4, 5]);
        check(&t);
    }

    #[test]
    fn mixed_operations_keep_invariants() {
        // A deterministic random mix of every operation, with a naive model alongside.
        for policy in [Policy::Lru, Policy::Fifo, Policy::Random { seed: 5 }] {
            let mut t = Iotlb::new(13, policy);
            let mut model: Vec<IotlbEntry> = vec![];
            let mut rng = 1u64;
            for id in 0..3000u64 {
                let r = splitmix64(&mut rng);
                // Keep mode in stretches of about 512 operations.
                t.set_keep(id >> 9 & 1 == 1);
                let asid = (r & 3) as u32;
                let va = (r >> 8) % 64 * PAGE_SIZE * 7;
                match (r >> 40) % 10 {
                    0..=4 => {
                        let e = if r >> 50 & 1 == 0 {
                            e4k(asid, va, id)
                        } else {
                            e2m(asid, va & !(HUGE_PAGE_SIZE - 1), id)
                        };
                        let (evictions, not_cached) = (t.stats().evictions, t.stats().not_cached);
                        let replaces = model.iter().any(|m| entry_key(m) == entry_key(&e));
                        let out = t.insert(e);
                        if let Some(o) = out {
                            model.retain(|m| m.id != o.id);
                        }
                        if t.stats().not_cached == not_cached {
                            model.push(e);
                        } else {
                            assert!(t.keep() && !replaces && model.len() == t.capacity());
                            assert!(out.is_none());
                        }
                        if t.keep() {
                            assert_eq!(t.stats().evictions, evictions, "kept: no eviction");
                        }
                    }
                    5..=7 => {
                        let got = t.lookup(asid, va);
                        let want = model
                            .iter()
                            .filter(|m| m.asid == asid && m.va_base <= va && va <= m.last())
                            .min_by_key(|m| m.size);
                        assert_eq!(got.as_ref(), want);
                    }
                    8 => {
                        let len = (r >> 20) % 0x40_0000;
                        for o in t.invalidate_range(asid, va, len) {
                            model.retain(|m| m.id != o.id);
                        }
                        if len > 0 {
                            assert!(!model.iter().any(|m| m.overlaps(asid, va, va + len - 1)));
                        }
                    }
                    _ => {
                        t.invalidate_asid(asid);
                        model.retain(|m| m.asid != asid);
                    }
                }
                assert_eq!(t.len(), model.len());
                check(&t);
            }
            let s = t.stats();
            assert!(s.hits > 0 && s.misses > 0 && s.evictions > 0 && s.invalidated > 0);
            assert!(s.not_cached > 0);
        }
    }
}
