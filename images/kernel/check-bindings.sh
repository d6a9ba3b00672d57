#!/usr/bin/env bash
# Checks that every struct in the kernel's Rust bindings has the layout clang gives it.
#
#   check-bindings.sh [--self-test] [KERNEL_TREE]      (default tree: the output of build.sh)
#
# The kernel runs bindgen with --no-layout-tests, so a struct whose Rust layout differs from C's
# compiles silently and every field after the difference is read at the wrong offset (with
# CONFIG_SCHEDSTATS=n the empty, 64-byte-aligned `struct sched_statistics` shifted task_struct::mm).
# This re-runs the exact bindgen command Kbuild recorded for rust/bindings/bindings_generated.rs,
# with layout tests on and into a temp dir (the tree is never written), then type-checks the result
# with rustc: bindgen 0.73 emits each layout test as a compile-time `const _` assertion, so any
# mismatch is a compile error naming the type ("Size of T", "Alignment of T", "Offset of field: T::f").
# rustc stops each type's assertion block at its first failure, so expect one line per broken type.
#
# --self-test proves the check can fail: it also generates the bindings without our
# `--opaque-type sched_statistics` and exits 0 only if those fail on sched_statistics/task_struct
# and the real ones pass.
source "$(dirname "$0")/../lib.sh"
here="$REPO_ROOT/images/kernel"

self_test=0
tree=
for a in "$@"; do
    case "$a" in
        --self-test) self_test=1 ;;
        -h|--help) sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p}}' "$0"; exit 0 ;;
        -*) die "unknown option: $a" ;;
        *) [ -z "$tree" ] || die "more than one kernel tree given"; tree=$a ;;
    esac
done
[ -n "$tree" ] || tree=$("$here/build.sh")
[ -d "$tree" ] || die "kernel tree $tree not found"
tree=$(cd "$tree" && pwd)
cmdfile="$tree/rust/bindings/.bindings_generated.rs.cmd"
[ -f "$cmdfile" ] || die "$cmdfile not found (is $tree a built kernel tree with CONFIG_RUST=y?)"
for t in bindgen rustc python3; do command -v "$t" >/dev/null || die "$t not found on PATH"; done

# A pass is recorded next to the tree, keyed by this script and the toolchain; the kernel tree
# itself is keyed by all of its inputs, so any change that could alter the bindings reruns the check.
stamp="$(dirname "$tree")/bindings-check-$(hash_inputs "$0" "$(bindgen --version 2>&1)" "$(rustc --version)")-$self_test.ok"
if [ -f "$stamp" ]; then
    sed 's/$/ [cached pass for this kernel tree]/' "$stamp"
    exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/zapguard-bindings.XXXXXX")
trap 'rm -rf "$work"' EXIT
# say LINE: print a result line and keep it for the pass record.
say() { echo "$*"; echo "$*" >> "$work/summary"; }
passed() { cp "$work/summary" "$stamp"; exit 0; }

# The recorded command, split into words the way the shell would (without running anything):
# bindgen's argv, then the post-processing command after ';' as "--;post;" + its argv.
python3 - "$cmdfile" > "$work/argv" <<'EOF' || die "cannot parse $cmdfile"
import shlex, sys
key = "savedcmd_rust/bindings/bindings_generated.rs := "
line = next((l[len(key):] for l in open(sys.argv[1]) if l.startswith(key)), None)
if line is None:
    sys.exit(f"no '{key.strip()}' line")
# Undo Kbuild's make-escaping of the saved command ($(pound) is '#', $$ is '$').
words = shlex.split(line.replace("$(pound)", "#").replace("$$", "$"))
cmds, cur = [], []
for w in words:
    if w == ";":
        cmds.append(cur); cur = []
    else:
        cur.append(w)
cmds.append(cur)
cmds = [c for c in cmds if c]
if len(cmds) > 2 or not cmds[0] or cmds[0][0] != "bindgen":
    sys.exit(f"unexpected command shape: {cmds!r}")
out = cmds[0]
if len(cmds) == 2:
    out += ["--;post;"] + cmds[1]
sys.stdout.write("\0".join(out) + "\0")
EOF
mapfile -d '' -t recorded < "$work/argv"

# generate OUT [MUTATION]: run the recorded bindgen with layout tests into OUT. MUTATION
# "no-opaque-sched_statistics" also drops `--opaque-type sched_statistics` (the self-test).
generate() {
    local out=$1 mutation=${2:-} i=0 n=${#recorded[@]} w in_clang=0 saw_nlt=0 saw_o=0 saw_opaque=0
    local -a args=() post=()
    while [ "$i" -lt "$n" ]; do
        w=${recorded[i]}; i=$((i + 1))
        if [ "$w" = "--;post;" ]; then post=("${recorded[@]:i}"); break; fi
        if [ "$in_clang" -eq 1 ]; then
            case "$w" in
                # The dependency file would be written into the tree; it has no effect on the output.
                -Wp,-MD,*|-Wp,-MMD,*) continue ;;
            esac
            args+=("$w"); continue
        fi
        case "$w" in
            --) in_clang=1 ;;
            --no-layout-tests) saw_nlt=1; continue ;;
            -o) saw_o=1; i=$((i + 1)); args+=(-o "$out"); continue ;;
            # Derives of pin_init's MaybeZeroable (a proc macro only Kbuild provides): no layout effect.
            --with-derive-custom-struct|--with-derive-custom-union|--with-derive-custom-enum)
                i=$((i + 1)); continue ;;
            --with-derive-custom-*=*) continue ;;
            # #[cfi_encoding] needs a nightly feature and only affects CFI type hashes, not layout.
            --with-attribute-custom-*)
                local v=$w
                case "$w" in *=*) ;; *) v=${recorded[i]}; i=$((i + 1)) ;; esac
                case "$v" in *cfi_encoding*) continue ;; esac
                args+=("$w"); [ "$v" = "$w" ] || args+=("$v"); continue ;;
            --opaque-type)
                if [ "${recorded[i]:-}" = sched_statistics ]; then
                    saw_opaque=1
                    if [ "$mutation" = no-opaque-sched_statistics ]; then i=$((i + 1)); continue; fi
                fi ;;
        esac
        args+=("$w")
    done
    [ "$saw_o" -eq 1 ] && [ "$in_clang" -eq 1 ] || die "recorded bindgen command has no '-o' or no '--'"
    [ "$saw_nlt" -eq 1 ] || log "bindings: note: recorded command had no --no-layout-tests"
    if [ -n "$mutation" ] && [ "$saw_opaque" -eq 0 ]; then
        die "self-test: recorded command has no '--opaque-type sched_statistics' (is our patch applied?)"
    fi
    (cd "$tree" && "${args[@]}") > "$work/bindgen.log" 2>&1 || {
        cat "$work/bindgen.log" >&2; die "bindgen failed"; }
    # The recorded post-processing (a sed over the output file), retargeted at OUT.
    if [ "${#post[@]}" -gt 0 ]; then
        [ "${post[0]}" = sed ] || die "unexpected post-processing command: ${post[*]}"
        local last=$((${#post[@]} - 1))
        [ "${post[last]}" = rust/bindings/bindings_generated.rs ] || die "unexpected sed target: ${post[last]}"
        post[last]=$out
        "${post[@]}" || die "post-processing failed: ${post[*]}"
    fi
}

# The kernel's own `ffi` crate (C type aliases, e.g. c_char = u8), built once as metadata.
rustc_flags=(--edition=2021 --target=x86_64-unknown-linux-gnu --emit=metadata --cap-lints=allow)
rustc "${rustc_flags[@]}" --crate-type=rlib --crate-name=ffi -o "$work/libffi.rmeta" "$tree/rust/ffi.rs" \
    || die "cannot build the kernel's rust/ffi.rs"
# lib.rs's manual definitions of the blocklisted types (`type __kernel_size_t = usize;` ...).
manual=$(grep -E '^\s*type __kernel_[A-Za-z0-9_]+ = [A-Za-z0-9_:]+;' "$tree/rust/bindings/lib.rs") \
    || die "no blocklisted-type definitions found in rust/bindings/lib.rs"

# check FILE: type-check FILE like rust/bindings/lib.rs does. Writes rustc's rendered errors to
# rustc.log and the failing layout assertions (unique) to failures; returns 1 when every error is a
# failed layout assertion (E0080 on a "Size/Alignment/Offset of" line), 2 on any other compile error.
check() {
    local file=$1 dir st=0
    dir=$(dirname "$file")
    cat > "$dir/lib.rs" <<EOF
#![no_std]
#![allow(warnings, clippy::all, improper_ctypes, non_camel_case_types, non_snake_case, non_upper_case_globals)]
pub mod bindings_raw {
$manual
    include!("$(basename "$file")");
}
EOF
    rustc "${rustc_flags[@]}" --error-format=json --crate-type=rlib --crate-name=bindings \
        --extern ffi="$work/libffi.rmeta" -o "$dir/libbindings.rmeta" "$dir/lib.rs" \
        2> "$dir/rustc.json" || st=$?
    [ "$st" -ne 0 ] || return 0
    python3 - "$dir" <<'EOF' || return $?
import json, re, sys
d = sys.argv[1]
label = re.compile(r'"((?:Size|Alignment|Offset) of [^"]*)"\]\[')
fails, other, log = set(), 0, []
for line in open(f"{d}/rustc.json"):
    try:
        m = json.loads(line)
    except ValueError:
        log.append(line); other += 1; continue      # not a diagnostic: rustc itself failed
    if m.get("$message_type", "diagnostic") != "diagnostic" or m.get("level") != "error":
        continue
    log.append(m.get("rendered") or m.get("message", "") + "\n")
    if m["message"].startswith("aborting due to"):
        continue
    text = "".join(t["text"] for sp in m.get("spans", []) for t in sp.get("text", []))
    hit = label.search(text)
    if (m.get("code") or {}).get("code") == "E0080" and hit:
        fails.add(hit.group(1))
    else:
        other += 1
open(f"{d}/rustc.log", "w").write("".join(log))
open(f"{d}/failures", "w").write("".join(f + "\n" for f in sorted(fails)))
sys.exit(2 if other or not fails else 1)
EOF
}

secs() { local ds=$((($2 - $1) / 100000000)); echo "$((ds / 10)).$((ds % 10))"; }
count_assertions() { grep -cE '^\s*\["(Size|Alignment|Offset) of ' "$1" || true; }

# run_check NAME [MUTATION]: generate + check, logging timings. Sets $rc, $dir.
run_check() {
    local name=$1 mutation=${2:-} t0 t1 t2
    dir="$work/$name"; mkdir -p "$dir"
    t0=$(date +%s%N)
    generate "$dir/bindings_generated.rs" "$mutation"
    t1=$(date +%s%N)
    rc=0; check "$dir/bindings_generated.rs" || rc=$?
    t2=$(date +%s%N)
    log "bindings ($name): bindgen $(secs "$t0" "$t1")s, rustc $(secs "$t1" "$t2")s," \
        "$(count_assertions "$dir/bindings_generated.rs") layout assertions"
    if [ "$rc" -eq 2 ]; then
        head -n 60 "$dir/rustc.log" >&2
        die "bindings ($name) failed to compile for a reason other than layout (see above)"
    fi
}

report_failures() { # DIR
    log "layout mismatches between bindgen's Rust and clang's C ($(wc -l < "$1/failures")):"
    sed 's/^/    /' "$1/failures" >&2
    log "first rustc errors:"
    head -n 16 "$1/rustc.log" | sed 's/^/    /' >&2
}

run_check real
real_rc=$rc real_dir=$dir
n=$(count_assertions "$real_dir/bindings_generated.rs")
[ "$n" -gt 0 ] || die "no layout assertions found in the generated bindings (bindgen output format changed?)"
if [ "$real_rc" -ne 0 ]; then
    report_failures "$real_dir"
    die "bindings layout check: $n layout assertions type-checked, $(wc -l < "$real_dir/failures") failures"
fi
say "bindings layout check: $n layout assertions type-checked, 0 failures"
[ "$self_test" -eq 1 ] || passed

run_check mutated no-opaque-sched_statistics
[ "$rc" -eq 1 ] || die "self-test: bindings without --opaque-type sched_statistics PASSED the check; it cannot catch the bug"
report_failures "$dir"
grep -qE '(sched_statistics|task_struct)' "$dir/failures" \
    || die "self-test: the mutated bindings failed, but not on sched_statistics/task_struct"
say "bindings layout self-test: OK (without --opaque-type sched_statistics: $(wc -l < "$dir/failures") layout failures incl. sched_statistics/task_struct; real bindings: 0)"
passed
