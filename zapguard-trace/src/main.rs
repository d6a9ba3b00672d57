//! `zapguard-trace`: inspect a zapguard device trace.
//!
//! ```text
//! zapguard-trace summary [TRACE]            per-ASID and overall summary
//! zapguard-trace filter  [TRACE] [--asid N] [--kind K]... [--va LO-HI] [--from NS] [--to NS]
//!                        [--cmd POS] [--table]
//! zapguard-trace check   [TRACE]            offline invariant check; exit 1 on a finding
//! zapguard-trace perfetto [TRACE] [--from NS] [--to NS] [-o OUT]   Chrome/Perfetto timeline JSON
//! zapguard-trace svg [TRACE] [--from NS] [--to NS] [-o OUT]   the same timeline, drawn
//! zapguard-trace json [TRACE]               the trace as JSON Lines (a binary one decoded)
//! ```
//!
//! Every subcommand reads both formats (binary `trace.zgt`, or JSON Lines), told apart by the
//! first byte. With no subcommand, `summary`. TRACE defaults to the latest run's
//! (`target/zapguard/runs/latest/trace.zgt`, or `trace.jsonl` in a run from before the binary
//! format); `-` reads stdin. Damage (malformed lines; in a binary trace, missing chunks, corrupt
//! chunks skipped to the next good one, a chunk cut short) is reported on stderr with the event
//! number where it is, decoding goes on, and the exit status is 2 unless `--allow-damage`. A trace or window without events is not an error:
//! stderr says so, and `perfetto` and `svg` still write a valid file saying so; a window whose
//! `--from` is not before its `--to` is (exit status 2).

use clap::{Parser, Subcommand};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use zapguard_trace::{check::Checker, filter, perfetto, reader, summary::Summary};

/// The latest run's trace (relative to the repository root, where `just` runs).
const LATEST: &str = "target/zapguard/runs/latest/trace.zgt";
/// The latest run's trace in runs from before the binary format.
const LATEST_JSON: &str = "target/zapguard/runs/latest/trace.jsonl";

/// `path`, or the latest run's trace.
fn or_latest(path: Option<PathBuf>) -> PathBuf {
    path.unwrap_or_else(|| {
        let bin = PathBuf::from(LATEST);
        if !bin.exists() && std::path::Path::new(LATEST_JSON).exists() {
            PathBuf::from(LATEST_JSON)
        } else {
            bin
        }
    })
}

#[derive(Parser)]
#[command(name = "zapguard-trace", about = "Inspect a zapguard device trace")]
struct Cli {
    /// What to do (default: summary of the latest run's trace).
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Exit with status 0 although the trace is damaged (malformed lines; in a binary trace,
    /// gaps, corrupt chunks, a chunk cut short). Without it, damage is exit status 2.
    #[arg(long, global = true)]
    allow_damage: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Per-ASID and overall summary.
    Summary { trace: Option<PathBuf> },
    /// Print the events that match, as JSON Lines (or a table).
    Filter {
        trace: Option<PathBuf>,
        /// Only this ASID.
        #[arg(long)]
        asid: Option<u64>,
        /// Only these kinds (repeatable).
        #[arg(long = "kind")]
        kinds: Vec<String>,
        /// Only events whose [va, va+len) overlaps LO-HI (hex with 0x, HI exclusive).
        #[arg(long, value_parser = filter::parse_range)]
        va: Option<(u64, u64)>,
        /// Only events at or after this t_ns.
        #[arg(long)]
        from: Option<u64>,
        /// Only events before this t_ns.
        #[arg(long)]
        to: Option<u64>,
        /// Only events of this command-queue position.
        #[arg(long)]
        cmd: Option<u64>,
        /// A readable table instead of JSON Lines.
        #[arg(long)]
        table: bool,
    },
    /// Re-verify the device's invariants offline; exit 1 with the offending lines on failure.
    Check { trace: Option<PathBuf> },
    /// Export a Chrome/Perfetto trace-event JSON (open it in ui.perfetto.dev).
    Perfetto {
        trace: Option<PathBuf>,
        /// Only events at or after this t_ns.
        #[arg(long)]
        from: Option<u64>,
        /// Only events before this t_ns.
        #[arg(long)]
        to: Option<u64>,
        /// Output file (default: the trace's name with `.perfetto.json`).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Print the trace as JSON Lines (a binary trace decoded, byte for byte what the JSON
    /// writer writes).
    Json { trace: Option<PathBuf> },
    /// Draw the timeline of a time window as an SVG (t_ns bounds; default: the whole trace).
    Svg {
        trace: Option<PathBuf>,
        /// Window start, t_ns.
        #[arg(long)]
        from: Option<u64>,
        /// Window end, t_ns.
        #[arg(long)]
        to: Option<u64>,
        /// Output file (default: the trace's name with `.svg`).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

fn open(path: Option<PathBuf>) -> Result<Box<dyn BufRead>, String> {
    let path = or_latest(path);
    if path.as_os_str() == "-" {
        return Ok(Box::new(BufReader::new(std::io::stdin())));
    }
    let f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Box::new(BufReader::with_capacity(1 << 20, f)))
}

/// The `[from, to)` window of `--from`/`--to` (`None`: neither given); an empty one is an
/// error, not a silently empty output.
/// A time window in ns (`None`: the whole trace).
type Window = Option<(u64, u64)>;

fn window(from: Option<u64>, to: Option<u64>) -> Result<Window, String> {
    if from.is_none() && to.is_none() {
        return Ok(None);
    }
    let (from, to) = (from.unwrap_or(0), to.unwrap_or(u64::MAX));
    if from >= to {
        return Err(format!(
            "empty window: --from {from} is not before --to {to}"
        ));
    }
    Ok(Some((from, to)))
}

/// Says on stderr that there was nothing to show (stdout stays what scripts parse).
fn nothing(what: &str) {
    eprintln!("zapguard-trace: {what}");
}

/// A timeline export's window, input path and output path (default: the input's path with
/// extension `ext`).
fn timeline_target(
    from: Option<u64>,
    to: Option<u64>,
    trace: &Option<PathBuf>,
    output: Option<PathBuf>,
    ext: &str,
) -> Result<(Window, PathBuf, PathBuf), String> {
    let window = window(from, to)?;
    let input = or_latest(trace.clone());
    let output = output.unwrap_or_else(|| input.with_extension(ext));
    Ok((window, input, output))
}

/// Says on stderr that the `what` written to `output` shows no event (`shown` is 0).
fn say_if_empty(shown: u64, output: &std::path::Path, window: Window, what: &str) {
    if shown == 0 {
        nothing(&format!(
            "{}: {}; wrote {what} that says so",
            output.display(),
            perfetto::empty_note(window)
        ));
    }
}

/// Writes `text` to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.to_string()),
        _ => Ok(()),
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    let mut failed = false;
    let bad = match cli.cmd.unwrap_or(Cmd::Summary { trace: None }) {
        Cmd::Svg {
            trace,
            from,
            to,
            output,
        } => {
            let (window, input, output) = timeline_target(from, to, &trace, output, "svg")?;
            let (svg, seen) =
                zapguard_trace::svg::from_trace(open(trace)?, window, &input.display().to_string())
                    .map_err(|e| e.to_string())?;
            std::fs::write(&output, svg).map_err(|e| format!("{}: {e}", output.display()))?;
            say_if_empty(seen.shown, &output, window, "an SVG");
            emit(&format!("{}\n", output.display()))?;
            seen.bad
        }
        Cmd::Perfetto {
            trace,
            from,
            to,
            output,
        } => {
            let (window, _, output) = timeline_target(from, to, &trace, output, "perfetto.json")?;
            // The input first: a missing trace must not leave an empty output behind.
            let input = open(trace)?;
            let file =
                std::fs::File::create(&output).map_err(|e| format!("{}: {e}", output.display()))?;
            let (_, seen) = perfetto::export(input, BufWriter::new(file), window)
                .map_err(|e| format!("{}: {e}", output.display()))?;
            say_if_empty(seen.shown, &output, window, "a timeline");
            emit(&format!(
                "{}: {} trace events; open it in https://ui.perfetto.dev\n",
                output.display(),
                seen.written
            ))?;
            seen.bad
        }
        Cmd::Json { trace } => {
            let mut out = BufWriter::new(std::io::stdout().lock());
            let mut io_err = None;
            let mut n = 0u64;
            let bad = reader::for_each_line(open(trace)?, |_, line| {
                n += 1;
                if io_err.is_none() {
                    io_err = out
                        .write_all(line)
                        .and_then(|()| out.write_all(b"\n"))
                        .err();
                }
            })
            .map_err(|e| e.to_string())?;
            // A closed pipe (`| head`) is not an error.
            match io_err.or_else(|| out.flush().err()) {
                Some(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.to_string()),
                _ => {}
            }
            if n == 0 {
                nothing("no events in this trace");
            }
            bad
        }
        Cmd::Summary { trace } => {
            let mut s = Summary::default();
            let bad =
                reader::for_each_event(open(trace)?, |_, v| s.add(v)).map_err(|e| e.to_string())?;
            s.bad_lines = bad.clone();
            emit(&s.to_string())?;
            if s.events == 0 {
                nothing("no events in this trace");
            }
            bad
        }
        Cmd::Filter {
            trace,
            asid,
            kinds,
            va,
            from,
            to,
            cmd,
            table,
        } => {
            let f = filter::Filter {
                asid,
                kinds,
                va,
                time: window(from, to)?,
                cmd,
            };
            let mut out = BufWriter::new(std::io::stdout().lock());
            let mut io_err = None;
            let mut kept = 0u64;
            let bad = reader::for_each_event(open(trace)?, |_, v| {
                if io_err.is_some() || !f.keeps(v) {
                    return;
                }
                kept += 1;
                let r = if table {
                    writeln!(out, "{}", filter::table_row(v))
                } else {
                    writeln!(out, "{v}")
                };
                io_err = r.err();
            })
            .map_err(|e| e.to_string())?;
            // A closed pipe (`| head`) is not an error.
            match io_err.or_else(|| out.flush().err()) {
                Some(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.to_string()),
                _ => {}
            }
            if kept == 0 {
                nothing(if f.time.is_some() {
                    "no events match in this window"
                } else {
                    "no events match"
                });
            }
            bad
        }
        Cmd::Check { trace } => {
            let mut c = Checker::default();
            let mut n = 0u64;
            let bad = reader::for_each_event(open(trace)?, |line, v| {
                n += 1;
                c.add(line, v);
            })
            .map_err(|e| e.to_string())?;
            if n == 0 {
                nothing("no events in this trace: nothing to check");
            }
            c.finish();
            let mut text = String::new();
            for f in c.findings.iter().take(50) {
                text += &format!("{f}\n");
            }
            if c.findings.len() > 50 {
                text += &format!("... and {} more\n", c.findings.len() - 50);
            }
            text += &format!(
                "check: {} finding(s): {} device violation(s), {} offline ledger violation(s); \
                 {} verdict(s) recomputed from the facts the trace records, {} disagreement(s)\n",
                c.findings.len(),
                c.device_violations,
                c.ledger_violations,
                c.recomputed,
                c.disagreements
            );
            emit(&text)?;
            failed = !c.findings.is_empty();
            bad
        }
    };
    for b in bad.iter().take(50) {
        eprintln!("damage at event {}: {}", b.line, b.why);
    }
    if bad.len() > 50 {
        eprintln!("... and {} more", bad.len() - 50);
    }
    if !bad.is_empty() && !cli.allow_damage {
        eprintln!(
            "zapguard-trace: the trace is damaged ({} place(s)); --allow-damage to accept it",
            bad.len()
        );
    }
    Ok(if failed {
        ExitCode::from(1)
    } else if !cli.allow_damage && !bad.is_empty() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn main() -> ExitCode {
    run(Cli::parse()).unwrap_or_else(|e| {
        eprintln!("zapguard-trace: {e}");
        ExitCode::from(2)
    })
}
