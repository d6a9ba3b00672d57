//! `filter`: select events; output stays JSON Lines, or becomes a table.

use crate::{field_str, field_u64, kind};
use serde_json::Value;

/// What to keep (all conditions must hold; `None` means "any").
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// ASID of the event.
    pub asid: Option<u64>,
    /// Kinds to keep.
    pub kinds: Vec<String>,
    /// VA range `[lo, hi)`: events whose `[va, va + len)` overlaps it.
    pub va: Option<(u64, u64)>,
    /// Time window `[from, to)` in `t_ns`.
    pub time: Option<(u64, u64)>,
    /// Command-queue position (`cmd` field).
    pub cmd: Option<u64>,
}

impl Filter {
    /// Whether `v` passes.
    pub fn keeps(&self, v: &Value) -> bool {
        if self.asid.is_some_and(|a| field_u64(v, "asid") != Some(a)) {
            return false;
        }
        if !self.kinds.is_empty() && !self.kinds.iter().any(|k| k == kind(v)) {
            return false;
        }
        if let Some((lo, hi)) = self.va {
            let Some(va) = field_u64(v, "va") else {
                return false;
            };
            let len = field_u64(v, "len").unwrap_or(1).max(1);
            if va >= hi || va.saturating_add(len) <= lo {
                return false;
            }
        }
        if let Some((from, to)) = self.time {
            let t = field_u64(v, "t_ns").unwrap_or(0);
            if t < from || t >= to {
                return false;
            }
        }
        if self.cmd.is_some_and(|c| field_u64(v, "cmd") != Some(c)) {
            return false;
        }
        true
    }
}

/// Parses `LO-HI` (decimal or `0x` hex, HI exclusive) or a single address.
pub fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let num = |t: &str| {
        let t = t.trim();
        match t.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => t.parse(),
        }
        .map_err(|e| format!("bad number {t:?}: {e}"))
    };
    match s.split_once('-') {
        Some((a, b)) => {
            let (lo, hi) = (num(a)?, num(b)?);
            if hi <= lo {
                return Err(format!("empty range {s:?}"));
            }
            Ok((lo, hi))
        }
        None => {
            let a = num(s)?;
            Ok((a, a.saturating_add(1)))
        }
    }
}

/// A register's value as people read it: flag registers by flag name (`CMDQ_EN | EVTQ_EN`).
fn register_value(reg: Option<&str>, n: u64) -> String {
    use shared_regs::flags::{names, Caps, Cr0, IrqCtrl};
    let bits = n as u32;
    match reg {
        Some("CR0" | "CR0ACK") => format!("{} ({n:#x})", names::<Cr0>(bits)),
        Some("IRQ_CTRL") => format!("{} ({n:#x})", names::<IrqCtrl>(bits)),
        Some("CAPS") => format!("{} ({n:#x})", names::<Caps>(bits)),
        _ => n.to_string(),
    }
}

/// One event as a table row: time, kind, asid, then the other fields.
pub fn table_row(v: &Value) -> String {
    let t = field_u64(v, "t_ns").unwrap_or(0);
    let asid = field_u64(v, "asid").map_or("-".into(), |a| a.to_string());
    let mut rest = Vec::new();
    if let Some(obj) = v.as_object() {
        for (k, x) in obj {
            if matches!(k.as_str(), "t_ns" | "seq" | "kind" | "asid") {
                continue;
            }
            let shown = match (k.as_str(), x.as_u64()) {
                ("va" | "pa" | "cpu_pa" | "src" | "dst" | "iova", Some(n)) => format!("{n:#x}"),
                ("value", Some(n)) => register_value(field_str(v, "reg"), n),
                _ => x.as_str().map_or_else(|| x.to_string(), str::to_string),
            };
            rest.push(format!("{k}={shown}"));
        }
    }
    format!(
        "{:>14.6} {:<16} {:>5}  {}",
        t as f64 / 1e6,
        field_str(v, "kind").unwrap_or("?"),
        asid,
        rest.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flag_registers_read_by_name_in_the_table() {
        let w = json!({"t_ns": 1, "kind": "bar_write", "reg": "CR0", "value": 15});
        assert!(
            table_row(&w).contains("value=CMDQ_EN | EVTQ_EN | DMAQ_EN | CTX_EN (0xf)"),
            "{}",
            table_row(&w)
        );
        let other = json!({"t_ns": 1, "kind": "bar_write", "reg": "CMDQ_PROD", "value": 15});
        assert!(table_row(&other).contains("value=15"));
    }

    #[test]
    fn each_condition_filters() {
        let e =
            json!({"t_ns": 500, "kind": "dma_access", "asid": 2, "va": 8192, "len": 512, "cmd": 7});
        assert!(Filter::default().keeps(&e));
        let f = |f: Filter| f.keeps(&e);
        assert!(f(Filter {
            asid: Some(2),
            ..Default::default()
        }));
        assert!(!f(Filter {
            asid: Some(3),
            ..Default::default()
        }));
        assert!(f(Filter {
            kinds: vec!["fault".into(), "dma_access".into()],
            ..Default::default()
        }));
        assert!(!f(Filter {
            kinds: vec!["fault".into()],
            ..Default::default()
        }));
        assert!(f(Filter {
            va: Some((8192 + 511, 9000)),
            ..Default::default()
        }));
        assert!(!f(Filter {
            va: Some((8192 + 512, 9000)),
            ..Default::default()
        }));
        assert!(f(Filter {
            time: Some((500, 501)),
            ..Default::default()
        }));
        assert!(!f(Filter {
            time: Some((0, 500)),
            ..Default::default()
        }));
        assert!(!f(Filter {
            cmd: Some(8),
            ..Default::default()
        }));
    }

    #[test]
    fn ranges_and_rows() {
        assert_eq!(parse_range("0x1000-0x2000"), Ok((0x1000, 0x2000)));
        assert_eq!(parse_range("4096"), Ok((4096, 4097)));
        assert!(parse_range("5-5").is_err());
        assert!(parse_range("zz").is_err());
        let row = table_row(
            &json!({"t_ns": 2_000_000, "kind": "fault", "asid": 1, "va": 4096, "result": "not_present"}),
        );
        assert!(
            row.contains("fault")
                && row.contains("va=0x1000")
                && row.contains("result=not_present"),
            "{row}"
        );
    }
}
