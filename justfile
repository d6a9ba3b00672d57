# zapguard: the two commands a newcomer needs.
#   just run    build what is missing, boot the guest with the zapguard device, run the guest
#               tests, show the results and the device-trace summary
#   just test   host tests + the same VM run; the last line is "N passed, N failed"

# Show the recipes.
default:
    @just --list

# Build everything, boot the guest, run the guest tests (--filter F: substring of test names;
# --exec PROG [ARGS...]: your static program instead, --add FILE: more files for /user;
# --flavor debug|kasan|kcsan: another guest kernel; --knobs P=V,...: device knobs for the run).
run *ARGS:
    cargo xtask run {{ARGS}}

# Host tests (cargo test) + the VM runs; exits non-zero on any failure. `--flavor kcsan`: host
# tests and the guest suite on that kernel only (the KCSAN kernel is not part of the default run).
test *ARGS:
    cargo xtask test {{ARGS}}

# Boot the guest to an interactive shell (driver loaded; 'poweroff -f' to leave; --add FILE puts
# files in /user).
shell *ARGS:
    cargo xtask shell {{ARGS}}

# Break the driver one mutant at a time (kmod/mutants.json) and print which tests or checks killed
# each (`just mutants --filter ID`: only those whose id contains ID). About a minute per mutant.
mutants *ARGS:
    cargo xtask mutants {{ARGS}}

# The guest image as one reproducible archive to hand over (kernel, initramfs, static device,
# run.sh, README): target/zapguard/zapguard-image-<commit>.tar.gz.
image:
    cargo xtask image

# Build every artifact (QEMU, kernel, module, device, guest tests, initramfs) and print the paths.
build:
    cargo xtask build

# Inspect a device trace (default: summary of the latest run's): summary|filter|check|json|perfetto|svg [TRACE] ...
trace *ARGS:
    cargo run --quiet --release -p zapguard-trace -- {{ARGS}}

# Formatting and lints: host crates, the module import graphs (no new cycle), and the module
# (rustfmt + the kernel's CLIPPY=1 build of the test build and of the production build).
check:
    cargo fmt --all -- --check
    rustfmt --edition 2021 --check kmod/zapguard.rs
    cargo clippy --workspace --all-targets -- -D warnings
    cargo xtask cycles
    make -s -C "$(bash images/kernel/build.sh)" M="$PWD/kmod" MO="$PWD/target/zapguard/clippy" LLVM=-19 ZAPGUARD_TEST=1 CLIPPY=1 W=1 modules
    make -s -C "$(bash images/kernel/build.sh)" M="$PWD/kmod" MO="$PWD/target/zapguard/clippy-production" LLVM=-19 CLIPPY=1 W=1 modules

# Benchmarks in the guest (mirror, shootdown, device DMA vs test_hmm and the hardware's limits):
# prints a table of ratios and writes target/zapguard/bench.json (`just bench --filter dma_copy`:
# only the benchmarks whose name contains it, written to bench-partial.json).
bench *ARGS:
    cargo xtask bench {{ARGS}}

# Fuzz the driver's uAPI from inside the guest: N random calls (default 100000) from 4 processes x 2 threads, then the run checks (`--seed S` replays a run).
fuzz-guest N="100000" *ARGS:
    cargo xtask fuzz-guest {{N}} {{ARGS}}

# Device-model microbenchmarks on the host (IOTLB, page walk, DMA copy vs memcpy).
bench-device:
    cargo bench -p zapguard-dev --bench device

# Fuzz the device model with libFuzzer for SECS seconds (installs nightly + cargo-fuzz if needed).
fuzz SECS="60":
    rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
    command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
    cd zapguard-model && cargo +nightly fuzz run device -- -max_total_time={{SECS}} -len_control=0
