//! The committed libFuzzer corpus of the device model (`zapguard-model/fuzz/corpus/device`,
//! grown and minimised by `just fuzz`, see the README) replayed as a plain test: every input
//! must run without a panic or a broken invariant, so a finding fixed once stays fixed, and
//! `cargo test` covers the deep states the fuzzer reached without nightly or cargo-fuzz.

use std::path::Path;

#[test]
fn committed_corpus_runs_clean() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/device");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    inputs.sort();
    assert!(
        inputs.len() >= 50,
        "the corpus has only {} inputs; regenerate it (README: `just fuzz`)",
        inputs.len()
    );
    for path in inputs {
        let data = std::fs::read(&path).expect("corpus input");
        // A panic names the input: `cargo +nightly fuzz run device <path>` reproduces it.
        eprintln!("{}", path.display());
        zapguard_model::fuzzing::run(&data);
    }
}
