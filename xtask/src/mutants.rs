//! `just mutants`: break the driver in small plausible ways, one at a time, and count how many
//! breakages the guest suite and the device notice.
//!
//! The mutants are data (`kmod/mutants.json`): the file, the exact text (it must occur exactly
//! once), its replacement, the rule it breaks and the guest tests to run (an exact filter,
//! `=name|name`). For each, the runner applies it, rebuilds only the module, boots the guest
//! with those tests, restores the source (always, even on error), and records whether it was
//! killed: a guest test failed, or a run check failed (a kernel splat, an unexpected device
//! violation, a module that did not unload). A mutant that does not build is an error, not a
//! kill. A mutant that survives breaks a rule no test or device check sees yet.
//!
//! Measured honestly: before the mutants, each distinct (filter, knobs, flavor) runs once on the
//! unbroken driver and must pass with at least one test run, or the mutants that use it are
//! errors; and a mutant claimed equivalent is run too, and must survive.

use crate::vm;
use crate::{script, vm_checks, vm_config, Artifacts, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One mutant, as `kmod/mutants.json` lists it.
#[derive(Clone, Debug)]
pub struct Mutant {
    pub id: String,
    pub file: String,
    pub find: String,
    pub replace: String,
    pub rule: String,
    pub filter: String,
    /// Why the mutant cannot change behaviour, if it cannot: it is listed, not run, and not
    /// counted in the kill rate.
    pub equivalent: Option<String>,
    /// Device knobs for its run (`zg.knobs=`, e.g. `iotlb_keep=1`): the one that makes the
    /// broken rule observable.
    pub knobs: Option<String>,
    /// The guest kernel flavor for its run (`debug`: the one whose dma-debug or lockdep sees
    /// the broken rule); the default kernel without it.
    pub flavor: Option<String>,
}

/// What became of a mutant.
#[derive(Debug)]
pub struct Outcome {
    pub id: String,
    pub verdict: Verdict,
    /// The tests or checks that killed it, why it survived, or the error.
    pub by: String,
    pub took: Duration,
}

/// A mutant's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Killed,
    Survived,
    /// It could not be judged: it does not build, or its filter fails on the unbroken driver.
    Error,
}

impl Outcome {
    pub fn killed(&self) -> bool {
        self.verdict == Verdict::Killed
    }
}

/// A mutant's guest run ends after this long: some make the device fault forever.
const MUTANT_TIMEOUT: Duration = Duration::from_secs(120);

/// The mutants `just test` runs (each must be killed) so that the recipe cannot rot: a
/// shootdown that leaves a PTE, and a protection event answered by a downgrade.
const SMOKE: [&str; 2] = ["zap-keeps-leaf", "protection-vma-write-protects"];

/// The mutants listed in `kmod/mutants.json`.
pub fn load(root: &Path) -> Result<Vec<Mutant>> {
    let path = root.join("kmod/mutants.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let list: Vec<Value> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    list.iter()
        .map(|m| {
            let s = |k: &str| {
                m.get(k)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| format!("{}: a mutant lacks `{k}`: {m}", path.display()))
            };
            Ok(Mutant {
                id: s("id")?,
                file: s("file")?,
                find: s("find")?,
                replace: s("replace")?,
                rule: s("rule")?,
                filter: s("filter")?,
                equivalent: m
                    .get("equivalent")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                knobs: m.get("knobs").and_then(Value::as_str).map(str::to_string),
                flavor: m.get("flavor").and_then(Value::as_str).map(str::to_string),
            })
        })
        .collect()
}

/// `text` with the mutant applied; an error unless its `find` occurs exactly once.
pub fn apply(m: &Mutant, text: &str) -> Result<String> {
    match text.matches(&m.find).count() {
        1 => Ok(text.replacen(&m.find, &m.replace, 1)),
        n => Err(format!(
            "mutant {}: its text occurs {n} times in {} (must be exactly once)",
            m.id, m.file
        )),
    }
}

/// Puts a source file back as it was when dropped.
struct Restore {
    path: PathBuf,
    text: String,
}

impl Drop for Restore {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.text) {
            eprintln!(
                "xtask: RESTORE FAILED for {}: {e}; run `git checkout {}`",
                self.path.display(),
                self.path.display()
            );
        }
    }
}

/// Runs one mutant; the source is restored before this returns.
fn run_one(root: &Path, art: &Artifacts, m: &Mutant, timeout: Duration) -> Result<Outcome> {
    let start = Instant::now();
    let path = root.join(&m.file);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mutated = apply(m, &text)?;
    let _restore = Restore {
        path: path.clone(),
        text,
    };
    std::fs::write(&path, mutated).map_err(|e| format!("{}: {e}", path.display()))?;
    let outcome = |verdict, by: String| Outcome {
        id: m.id.clone(),
        verdict,
        by,
        took: start.elapsed(),
    };
    let run = match guest_run(root, art, m, &format!("mutant-{}", m.id), timeout)? {
        Err(e) => return Ok(outcome(Verdict::Error, e)),
        Ok(r) => r,
    };
    if run.by.is_empty() {
        let why = format!(
            "{} tests (filter `{}`) and every run check passed",
            run.ran, m.filter
        );
        return Ok(outcome(Verdict::Survived, why));
    }
    Ok(outcome(Verdict::Killed, run.by.join(", ")))
}

/// What a guest run of a module build saw: the failed tests and run checks, and how many tests
/// ran.
struct GuestRun {
    by: Vec<String>,
    ran: usize,
}

/// Builds the module from the source as it is now, boots the guest with `m`'s filter, knobs and
/// flavor (logs in `runs/<dir>`) and reports what failed; `Ok(Err(..))` if the module does not
/// build.
fn guest_run(
    root: &Path,
    art: &Artifacts,
    m: &Mutant,
    dir: &str,
    timeout: Duration,
) -> Result<std::result::Result<GuestRun, String>> {
    let flavored;
    let art = match &m.flavor {
        Some(f) => {
            flavored = crate::flavor_artifacts(root, art, f)?;
            &flavored
        }
        None => art,
    };
    let mo = root.join("target/zapguard/kmod-mutant");
    std::fs::create_dir_all(&mo).map_err(|e| format!("{}: {e}", mo.display()))?;
    let built = Command::new("make")
        .args(["-s", "-C"])
        .arg(&art.ktree)
        .arg(format!("M={}", root.join("kmod").display()))
        .arg(format!("MO={}", mo.display()))
        .args(["LLVM=-19", "ZAPGUARD_TEST=1", "modules"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("make: {e}"))?;
    if !built.status.success() {
        let err = String::from_utf8_lossy(&built.stderr);
        let first = err
            .lines()
            .find(|l| l.contains("error"))
            .unwrap_or("no error line");
        return Ok(Err(format!("the module does not build: {first}")));
    }
    let hmm_tests = script(root, "images/hmm-tests/build.sh")
        .arg(&art.ktree)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("hmm-tests: {e}"))?;
    let out = script(root, "images/initramfs/build.sh")
        .arg(&art.ktree)
        .arg(mo.join("zapguard.ko"))
        .arg(&art.guest_tests)
        .arg(String::from_utf8_lossy(&hmm_tests.stdout).trim())
        .args(&art.examples)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("initramfs: {e}"))?;
    if !out.status.success() {
        return Err(format!("mutant {}: initramfs build failed", m.id));
    }
    let initramfs = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());

    let dir = root.join("target/zapguard/runs").join(dir);
    let _ = std::fs::remove_dir_all(&dir);
    let mut args = vec![
        "zg.run=tests".into(),
        format!("zg.filter={}", m.filter),
        format!("zg.flavor={}", art.flavor),
    ];
    args.extend(m.knobs.iter().map(|k| format!("zg.knobs={k}")));
    let mut cfg = vm_config(art, dir.clone(), args, timeout, vm::Echo::Silent);
    cfg.initramfs = initramfs;
    let o = vm::run(&cfg).map_err(|e| format!("{}: VM run: {e}", dir.display()))?;
    let mut by: Vec<String> = o
        .results
        .iter()
        .filter(|r| r.outcome == crate::ktap::Outcome::Fail)
        .map(|r| r.name.clone())
        .collect();
    let checks = vm_checks(
        &o,
        &crate::trace::analyse(&o.trace, &o.trace_expectations, &o.violation_windows),
        false,
    );
    by.extend(checks.iter().filter(|c| !c.ok).map(|c| c.name.to_string()));
    let ran = o
        .results
        .iter()
        .filter(|r| r.outcome != crate::ktap::Outcome::Skip)
        .count();
    Ok(Ok(GuestRun { by, ran }))
}

/// Runs `m`'s filter, knobs and flavor on the unbroken driver: `Err` unless every test and run
/// check passes and at least one test ran.
fn baseline(
    root: &Path,
    art: &Artifacts,
    m: &Mutant,
    timeout: Duration,
) -> Result<std::result::Result<(), String>> {
    let dir = format!("mutant-baseline-{}", m.id);
    Ok(match guest_run(root, art, m, &dir, timeout)? {
        Err(e) => Err(e),
        Ok(r) if r.ran == 0 => Err(format!("filter `{}` runs no test", m.filter)),
        Ok(r) if !r.by.is_empty() => Err(format!(
            "filter `{}` fails on the unbroken driver: {}",
            m.filter,
            r.by.join(", ")
        )),
        Ok(_) => Ok(()),
    })
}

/// Runs the mutants whose id contains `only` (all without it); prints the table. Returns
/// (killed, not killed): survivors, errors, and equivalents that were killed count against.
pub fn run(root: &Path, art: &Artifacts, only: Option<&str>) -> Result<(usize, usize)> {
    let all = load(root)?;
    let chosen: Vec<&Mutant> = all
        .iter()
        .filter(|m| only.is_none_or(|o| m.id.contains(o)))
        .collect();
    let bad_baselines = baselines(root, art, &chosen)?;
    let mut outcomes = Vec::new();
    for (i, m) in chosen.iter().enumerate() {
        eprintln!(
            "==> mutant {}/{}: {} ({}; tests `{}`{}{}{})",
            i + 1,
            chosen.len(),
            m.id,
            m.rule,
            m.filter,
            m.knobs
                .as_ref()
                .map_or(String::new(), |k| format!(", knobs {k}")),
            m.flavor
                .as_ref()
                .map_or(String::new(), |f| format!(", {f} kernel")),
            m.equivalent
                .as_ref()
                .map_or(String::new(), |_| ", claimed equivalent: must survive"
                    .into())
        );
        let o = match bad_baselines.get(&setup(m)) {
            Some(why) => Outcome {
                id: m.id.clone(),
                verdict: Verdict::Error,
                by: why.clone(),
                took: Duration::ZERO,
            },
            None => run_one(root, art, m, MUTANT_TIMEOUT)?,
        };
        eprintln!(
            "    {} in {:.0}s: {}",
            label(m, &o),
            o.took.as_secs_f32(),
            o.by
        );
        outcomes.push((*m, o));
    }
    print_table(&all, &outcomes);
    let judged: Vec<_> = outcomes
        .iter()
        .filter(|(m, _)| m.equivalent.is_none())
        .collect();
    let killed = judged.iter().filter(|(_, o)| o.killed()).count();
    let errors = outcomes
        .iter()
        .filter(|(_, o)| o.verdict == Verdict::Error)
        .count();
    let false_equivalents = outcomes
        .iter()
        .filter(|(m, o)| m.equivalent.is_some() && o.killed())
        .count();
    println!(
        "killed {killed} of {} non-equivalent ({:.0}%); {errors} error(s); {false_equivalents} \
         equivalence claim(s) disproved",
        judged.len(),
        100.0 * killed as f64 / judged.len().max(1) as f64
    );
    Ok((killed, judged.len() - killed + errors + false_equivalents))
}

/// A mutant's run setup: its filter, knobs and kernel flavor.
type Setup = (String, Option<String>, Option<String>);

/// [`Setup`] of `m`.
fn setup(m: &Mutant) -> Setup {
    (m.filter.clone(), m.knobs.clone(), m.flavor.clone())
}

/// Runs each distinct setup of `chosen` once on the unbroken driver; returns the ones that
/// failed, with why.
fn baselines(
    root: &Path,
    art: &Artifacts,
    chosen: &[&Mutant],
) -> Result<std::collections::BTreeMap<Setup, String>> {
    let mut seen = std::collections::BTreeMap::new();
    let mut bad = std::collections::BTreeMap::new();
    for m in chosen {
        if seen.insert(setup(m), ()).is_some() {
            continue;
        }
        let t = Instant::now();
        let r = baseline(root, art, m, MUTANT_TIMEOUT)?;
        eprintln!(
            "==> baseline `{}`{}: {} in {:.0}s",
            m.filter,
            m.knobs
                .as_ref()
                .map_or(String::new(), |k| format!(", knobs {k}")),
            r.as_ref().map_or_else(|e| e.as_str(), |_| "passes"),
            t.elapsed().as_secs_f32()
        );
        if let Err(e) = r {
            bad.insert(setup(m), format!("baseline: {e}"));
        }
    }
    Ok(bad)
}

/// How a mutant's outcome reads in the table.
fn label(m: &Mutant, o: &Outcome) -> &'static str {
    match (o.verdict, m.equivalent.is_some()) {
        (Verdict::Error, _) => "ERROR",
        (Verdict::Killed, true) => "NOT EQUIVALENT",
        (Verdict::Survived, true) => "equivalent",
        (Verdict::Killed, false) => "killed",
        (Verdict::Survived, false) => "SURVIVED",
    }
}

/// The outcome table, then the kill rate of each driver file.
fn print_table(all: &[Mutant], outcomes: &[(&Mutant, Outcome)]) {
    println!(
        "\nmutants ({} of {} in kmod/mutants.json)",
        outcomes.len(),
        all.len()
    );
    println!("  {:<38} {:<14} {:>6}  by", "mutant", "result", "time");
    for (m, o) in outcomes {
        println!(
            "  {:<38} {:<14} {:>5.0}s  {}",
            o.id,
            label(m, o),
            o.took.as_secs_f32(),
            o.by
        );
    }
    let mut files: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for (m, o) in outcomes.iter().filter(|(m, _)| m.equivalent.is_none()) {
        let e = files.entry(m.file.as_str()).or_default();
        e.0 += usize::from(o.killed());
        e.1 += 1;
    }
    println!("  per file (killed of non-equivalent):");
    for (f, (k, n)) in files {
        println!(
            "    {f:<20} {k} of {n} ({:.0}%)",
            100.0 * k as f64 / n.max(1) as f64
        );
    }
}

/// `just test`'s smoke run: the [`SMOKE`] mutants, each of which must be killed.
pub fn smoke(root: &Path, art: &Artifacts) -> Result<(usize, usize)> {
    let t = crate::step("mutation smoke (just mutants on two mutants; each must be killed)");
    let all = load(root)?;
    let mut checks = Vec::new();
    for id in SMOKE {
        let m = all
            .iter()
            .find(|m| m.id == id)
            .ok_or_else(|| format!("smoke mutant {id} is not in kmod/mutants.json"))?;
        let o = run_one(root, art, m, MUTANT_TIMEOUT)?;
        checks.push((id, o));
    }
    eprintln!("    {:.1}s", t.elapsed().as_secs_f32());
    let checks: Vec<crate::Check> = checks
        .into_iter()
        .map(|(id, o)| crate::Check {
            name: id,
            ok: o.killed(),
            detail: o.by,
        })
        .collect();
    Ok(crate::print_checks("mutation smoke:    ", &checks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_mutant_applies_exactly_once() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let all = load(root).unwrap();
        assert!(all.len() >= 10);
        for m in &all {
            let text = std::fs::read_to_string(root.join(&m.file)).unwrap();
            let out = apply(m, &text).unwrap();
            assert_ne!(out, text, "{}", m.id);
        }
        let ids: std::collections::BTreeSet<_> = all.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids.len(), all.len(), "mutant ids are unique");
        assert!(
            SMOKE.iter().all(|id| ids.contains(id)),
            "smoke mutants exist"
        );
        for k in all.iter().filter_map(|m| m.knobs.as_deref()) {
            crate::check_knobs(k).unwrap();
        }
    }

    /// Every filter is exact (`=name|name`) and names guest tests that exist, so a renamed or
    /// new test never silently changes what a mutant runs.
    #[test]
    fn every_filter_names_existing_guest_tests_exactly() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let main = std::fs::read_to_string(root.join("guest-tests/src/main.rs")).unwrap();
        let list = &main[main.find("const TESTS").unwrap()..];
        let list = &list[list.find("tests![").unwrap() + 7..list.find("];").unwrap()];
        let tests: std::collections::BTreeSet<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty() && !n.starts_with("//"))
            .collect();
        assert!(
            tests.len() > 100 && tests.contains("dev_node_exists"),
            "{tests:?}"
        );
        for m in load(root).unwrap() {
            let names = m.filter.strip_prefix('=').unwrap_or_else(|| {
                panic!(
                    "{}: filter `{}` is not exact (`=name|name`)",
                    m.id, m.filter
                )
            });
            for n in names.split('|') {
                assert!(tests.contains(n), "{}: no guest test `{n}`", m.id);
            }
        }
    }
}
