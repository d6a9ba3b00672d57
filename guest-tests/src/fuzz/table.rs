//! The calls and the errnos docs/uapi.md allows for each: [`Api`], [`Node`] and [`TABLE`], whose
//! rows quote the docs/uapi.md lines (`R_*`, `H_*`) that document each errno.

use std::fmt;

/// What a call is, for the errno table and the counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    Open,
    OpenHmm,
    Close,
    GetInfo,
    Map,
    Dma,
    Snapshot,
    Stats,
    /// The unprivileged child's open of its context's debugfs `inject` file.
    DebugfsUnpriv,
    /// A number no node serves.
    Unknown,
    HmmRead,
    HmmReadUnlocked,
    HmmWrite,
    HmmSnapshot,
    /// test_hmm's commands that need device memory.
    HmmUnsupported,
}

pub(super) const APIS: [Api; 15] = [
    Api::Open,
    Api::OpenHmm,
    Api::Close,
    Api::GetInfo,
    Api::Map,
    Api::Dma,
    Api::Snapshot,
    Api::Stats,
    Api::DebugfsUnpriv,
    Api::Unknown,
    Api::HmmRead,
    Api::HmmReadUnlocked,
    Api::HmmWrite,
    Api::HmmSnapshot,
    Api::HmmUnsupported,
];
pub(super) const NAPI: usize = APIS.len();

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Api::Open => "open(/dev/zapguard)",
            Api::OpenHmm => "open(/dev/zapguard_hmm0)",
            Api::Close => "close",
            Api::GetInfo => "GET_INFO",
            Api::Map => "MAP",
            Api::Dma => "DMA",
            Api::Snapshot => "SNAPSHOT",
            Api::Stats => "STATS",
            Api::DebugfsUnpriv => "open(debugfs inject, unprivileged)",
            Api::Unknown => "unknown ioctl",
            Api::HmmRead => "HMM_DMIRROR_READ",
            Api::HmmReadUnlocked => "HMM_DMIRROR_READ_UNLOCKED",
            Api::HmmWrite => "HMM_DMIRROR_WRITE",
            Api::HmmSnapshot => "HMM_DMIRROR_SNAPSHOT",
            Api::HmmUnsupported => "HMM_DMIRROR_(migrate|exclusive|release|flags)",
        })
    }
}

/// Which node a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Node {
    /// `/dev/zapguard`.
    Zg,
    /// `/dev/zapguard_hmm0` (test_hmm's uAPI).
    Hmm,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Node::Zg => "/dev/zapguard",
            Node::Hmm => "/dev/zapguard_hmm0",
        })
    }
}

/// One row of [`TABLE`]: the errnos `apis` may return on `node`, each with the docs/uapi.md text that
/// documents it (whitespace-normalised; a unit test finds each in docs/uapi.md).
pub(crate) struct Row {
    pub(crate) apis: &'static [Api],
    pub(crate) node: Node,
    pub(crate) allowed: &'static [(i32, &'static str)],
}

use libc::{E2BIG, EACCES, EBUSY, EFAULT, EINVAL, ENOMEM, ENOTTY, EPERM, ETIMEDOUT};

// docs/uapi.md's "Errors, by call" table (the `| errno | when |` rows), line by line.
const R_EINVAL: (i32, &str) = (
    EINVAL,
    "| `EINVAL` | empty, unaligned or wrapping ranges, unknown ops, flags or reserved fields",
);
const R_EINVAL_EXITED: (i32, &str) = (EINVAL, "a context whose process has exited |");
const R_EFAULT: (i32, &str) = (
    EFAULT,
    "| `EFAULT` | addresses the device cannot translate; faults on unmapped or `PROT_NONE` memory; a bad argument pointer",
);
const R_EFAULT_PTR: (i32, &str) = (EFAULT, "a bad argument pointer");
const R_EPERM: (i32, &str) = (
    EPERM,
    "| `EPERM` | a write fault on read-only memory; a context used from another process",
);
const R_EACCES_DEBUGFS: (i32, &str) = (
    EACCES,
    "| `EACCES` | opening a test build's debugfs `inject` file without root (debugfs is root-only)",
);
const R_ENOMEM: (i32, &str) = (
    ENOMEM,
    "| `ENOMEM` | `MAP` or a device fault needing more page-table pages",
);
const R_EBUSY_OPEN: (i32, &str) = (
    EBUSY,
    "| `EBUSY` | `open()` when every ASID is in use, or the process already has `max_contexts` contexts",
);
const R_EBUSY_MAP: (i32, &str) = (
    EBUSY,
    "`MAP` that kept colliding with invalidations for 2 s, or a device fault whose service was overtaken by invalidations 256 times",
);
const R_EBUSY_SNAPSHOT: (i32, &str) = (
    EBUSY,
    "`SNAPSHOT` whose walk kept colliding with invalidations for 2 s |",
);
const R_ENOMEM_OPEN: (i32, &str) = (
    ENOMEM,
    "`open()` when the pool has no page left for the context's root table;",
);
const R_ETIMEDOUT: (i32, &str) = (
    ETIMEDOUT,
    "| `ETIMEDOUT` | `DMA` whose device fault was not served within `job_timeout_ms`",
);
const R_ENOTTY: (i32, &str) = (ENOTTY, "| `ENOTTY` | unknown ioctls |");
const R_EINVAL_SIZE: (i32, &str) = (
    EINVAL,
    "a `size` below the structure's 1.0 size (`ZG_*_SIZE_VER0`) or a non-zero `pad`",
);
const R_E2BIG: (i32, &str) = (
    E2BIG,
    "| `E2BIG` | a `size` above 4096 (`ZG_SIZE_MAX`), or a structure larger than the driver's whose bytes past the driver's size are not all zero",
);
// The test_hmm-compatible nodes ("The kernel's own hmm-tests, unmodified": its "Errors:").
const H_EINVAL: (i32, &str) = (
    EINVAL,
    "Errors: `EINVAL` (unaligned `addr`, zero or too many pages: more than 64 MiB of data or 2^20 pages of snapshot, unknown commands, a context whose process has exited)",
);
const H_EFAULT: (i32, &str) = (
    EFAULT,
    "`EFAULT` (unmapped or `PROT_NONE` pages, a bad `ptr`)",
);
const H_EPERM: (i32, &str) = (
    EPERM,
    "`EPERM` (WRITE of read-only memory, another process)",
);
const H_EBUSY: (i32, &str) = (
    EBUSY,
    "`EBUSY` (invalidations kept undoing 16 fault passes in a row)",
);
const H_UNSUPPORTED: (i32, &str) = (
    EINVAL,
    "| migration, exclusive access, `RELEASE`, `FLAGS` | `EINVAL`",
);

/// The errnos each call may return, from docs/uapi.md. A call whose errno is not in its row
/// fails the run; a call that must fail must also fail with an errno its reason explains
/// ([`Cause`]), and a few must succeed. `EIO` and `ENODEV` (a failed or unbound device) are
/// documented for every call, but the fuzz never fails or unbinds the device, so no row
/// accepts them.
///
/// [`Cause`]: super::verdict::Cause
pub(crate) const TABLE: &[Row] = &[
    // open(): docs/uapi.md EBUSY row ("`open()` when every ASID is in use, or ... `max_contexts`"),
    // EIO and ENODEV rows ("any call (and `open()`)").
    Row {
        apis: &[Api::Open],
        node: Node::Zg,
        allowed: &[R_EBUSY_OPEN, R_ENOMEM_OPEN],
    },
    // GET_INFO: a bad argument pointer (EFAULT row); EIO/ENODEV ("any call").
    Row {
        apis: &[Api::GetInfo],
        node: Node::Zg,
        allowed: &[R_EFAULT_PTR, R_EINVAL_SIZE, R_E2BIG],
    },
    // MAP: every row that names ranges, faults, contexts, page-table pages or MAP.
    Row {
        apis: &[Api::Map],
        node: Node::Zg,
        allowed: &[
            R_EINVAL,
            R_EINVAL_EXITED,
            R_EFAULT,
            R_EPERM,
            R_ENOMEM,
            R_EBUSY_MAP,
            R_E2BIG,
        ],
    },
    // DMA: as MAP (a device fault is served like a MAP: "or a device fault", "(or a fault)"),
    // plus ETIMEDOUT ("`DMA` whose device fault was not served within `job_timeout_ms`").
    Row {
        apis: &[Api::Dma],
        node: Node::Zg,
        allowed: &[
            R_EINVAL,
            R_EINVAL_EXITED,
            R_EFAULT,
            R_EPERM,
            R_ENOMEM,
            R_EBUSY_MAP,
            R_ETIMEDOUT,
            R_E2BIG,
        ],
    },
    // SNAPSHOT: ranges (EINVAL), untranslatable addresses and bad pointers (EFAULT), another
    // process (EPERM), a walk invalidations kept overtaking (EBUSY), EIO/ENODEV.
    Row {
        apis: &[Api::Snapshot],
        node: Node::Zg,
        allowed: &[
            R_EINVAL,
            R_EINVAL_EXITED,
            R_EFAULT,
            R_EPERM,
            R_EBUSY_SNAPSHOT,
            R_E2BIG,
        ],
    },
    // STATS: only a bad pointer; "every call answers `EIO` ..., `STATS` keeps answering"
    // ("When the device fails").
    Row {
        apis: &[Api::Stats],
        node: Node::Zg,
        allowed: &[R_EFAULT_PTR, R_EINVAL_SIZE, R_E2BIG],
    },
    // The unprivileged child's open of its debugfs `inject` file: EACCES.
    Row {
        apis: &[Api::DebugfsUnpriv],
        node: Node::Zg,
        allowed: &[R_EACCES_DEBUGFS],
    },
    // Numbers /dev/zapguard does not serve, including test_hmm's: "| `ENOTTY` | unknown ioctls |".
    Row {
        apis: &[
            Api::Unknown,
            Api::HmmRead,
            Api::HmmReadUnlocked,
            Api::HmmWrite,
            Api::HmmSnapshot,
            Api::HmmUnsupported,
        ],
        node: Node::Zg,
        allowed: &[R_ENOTTY],
    },
    // The test_hmm node: "Each open file is a context, like one of `/dev/zapguard`", so its
    // open() is /dev/zapguard's (the EBUSY, EIO and ENODEV rows).
    Row {
        apis: &[Api::OpenHmm],
        node: Node::Hmm,
        allowed: &[R_EBUSY_OPEN, R_ENOMEM_OPEN],
    },
    // Its data and snapshot commands: docs/uapi.md's "Errors:" for the node.
    Row {
        apis: &[
            Api::HmmRead,
            Api::HmmReadUnlocked,
            Api::HmmWrite,
            Api::HmmSnapshot,
        ],
        node: Node::Hmm,
        allowed: &[H_EINVAL, H_EFAULT, H_EPERM, H_EBUSY],
    },
    // Commands that need device memory, unknown commands, and /dev/zapguard's numbers:
    // "migration, exclusive access, RELEASE, FLAGS | EINVAL" and "unknown commands".
    Row {
        apis: &[
            Api::HmmUnsupported,
            Api::Unknown,
            Api::GetInfo,
            Api::Map,
            Api::Dma,
            Api::Snapshot,
            Api::Stats,
            Api::DebugfsUnpriv,
        ],
        node: Node::Hmm,
        allowed: &[H_UNSUPPORTED, H_EINVAL],
    },
];

/// The errnos `api` may return on `node` (empty: it never fails, or it is never issued there).
pub(crate) fn allowed(api: Api, node: Node) -> &'static [(i32, &'static str)] {
    TABLE
        .iter()
        .find(|r| r.node == node && r.apis.contains(&api))
        .map_or(&[], |r| r.allowed)
}

pub(crate) fn errno_name(e: i32) -> &'static str {
    match e {
        0 => "ok",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::E2BIG => "E2BIG",
        libc::EMFILE => "EMFILE",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EHWPOISON => "EHWPOISON",
        _ => "errno",
    }
}

pub(super) struct Names(pub(super) &'static [(i32, &'static str)]);

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut seen: Vec<i32> = vec![];
        for (e, _) in self.0 {
            if !seen.contains(e) {
                if !seen.is_empty() {
                    f.write_str(", ")?;
                }
                f.write_str(errno_name(*e))?;
                seen.push(*e);
            }
        }
        if seen.is_empty() {
            f.write_str("nothing")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalise(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// Each allowed errno quotes the docs/uapi.md line that documents it.
    #[test]
    fn table_quotes_docs_uapi() {
        let doc = normalise(include_str!("../../../docs/uapi.md"));
        for row in TABLE {
            for (e, quote) in row.allowed {
                assert!(
                    doc.contains(&normalise(quote)),
                    "{:?} on {:?}: docs/uapi.md has no `{quote}`",
                    row.apis,
                    row.node
                );
                // The quote names the errno, or is a clause of the docs/uapi.md row that does.
                let (q, name) = (normalise(quote), errno_name(*e));
                let at = doc.find(&q).unwrap_or(0);
                let in_row = doc[..at].rfind("| `E").is_some_and(|s| {
                    let row = &doc[s..at];
                    row.starts_with(&format!("| `{name}` |")) && !row.contains("| |")
                });
                assert!(
                    q.contains(name) || in_row,
                    "the quote for {name} is not from its docs/uapi.md row: {quote}"
                );
            }
        }
    }

    #[test]
    fn table_covers_every_call_once() {
        for api in APIS {
            for node in [Node::Zg, Node::Hmm] {
                let rows = TABLE
                    .iter()
                    .filter(|r| r.node == node && r.apis.contains(&api))
                    .count();
                assert!(rows <= 1, "{api} on {node}: {rows} rows");
                let needed = !matches!(
                    (api, node),
                    (Api::Close, _) | (Api::Open, Node::Hmm) | (Api::OpenHmm, Node::Zg)
                );
                assert_eq!(rows == 1, needed, "{api} on {node}");
            }
        }
        let names = |a, n| {
            let mut v: Vec<i32> = allowed(a, n).iter().map(|(e, _)| *e).collect();
            v.dedup();
            v
        };
        assert_eq!(names(Api::Unknown, Node::Zg), vec![ENOTTY]);
        assert_eq!(names(Api::HmmRead, Node::Zg), vec![ENOTTY]);
        assert_eq!(names(Api::DebugfsUnpriv, Node::Zg), vec![EACCES]);
        assert_eq!(names(Api::Stats, Node::Zg), vec![EFAULT, EINVAL, E2BIG]);
        assert_eq!(names(Api::Dma, Node::Hmm), vec![EINVAL]);
        assert!(allowed(Api::GetInfo, Node::Zg)
            .iter()
            .all(|(e, _)| *e != EPERM));
    }
}
