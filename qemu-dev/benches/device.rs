//! Device benchmarks (being written).
fn main() {}
