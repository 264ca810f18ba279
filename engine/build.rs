//! Compiles the XDP steering program (bpf/steer.c) with clang into OUT_DIR, where the engine
//! embeds it, and the packet-rate benchmark's programs (../benches/bpf/pps.c), which only that
//! benchmark embeds. clang and libbpf's headers (Debian: clang, libbpf-dev) are build
//! dependencies.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CLANG");
    compile_bpf("bpf/steer.c", "steer.o");
    compile_bpf("../benches/bpf/pps.c", "pps.o");
}

fn compile_bpf(source: &str, object: &str) {
    println!("cargo:rerun-if-changed={source}");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join(object);
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    // <linux/bpf.h> pulls in <asm/types.h>, which Debian keeps under the multiarch directory
    // that a `-target bpf` compile does not search by itself.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".to_owned());
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let status = Command::new(&clang)
        .args([
            "-O2",
            "-g",
            "-Wall",
            "-Werror",
            "-target",
            "bpf",
            "-idirafter",
        ])
        .arg(&multiarch)
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("{clang} failed to compile {source} ({status})"),
        Err(error) => panic!(
            "cannot run {clang} to compile {source}: {error}; install clang and libbpf-dev \
             (scripts/install-deps does)"
        ),
    }
}
