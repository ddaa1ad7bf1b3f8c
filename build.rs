//! Compiles the kernel path's XDP program (src/kernel_path/relay.bpf.c) when the `kernel-path`
//! feature is on; without it this does nothing and no C compiler is needed.

use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "src/kernel_path/relay.bpf.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=TURNPIKE_BPF_CLANG");
    if std::env::var_os("CARGO_FEATURE_KERNEL_PATH").is_none() {
        return;
    }
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        panic!("the kernel-path feature is Linux only (XDP); build without it elsewhere");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("relay.bpf.o");
    let clang = std::env::var("TURNPIKE_BPF_CLANG").unwrap_or_else(|_| "clang".into());
    // The UAPI headers of the host's architecture hold asm/types.h; the BPF target has none of its own.
    let multiarch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86_64-linux-gnu",
        Ok("aarch64") => "aarch64-linux-gnu",
        Ok("riscv64") => "riscv64-linux-gnu",
        _ => "",
    };
    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"]);
    if !multiarch.is_empty() {
        cmd.arg(format!("-I/usr/include/{multiarch}"));
    }
    cmd.args(["-c", SOURCE, "-o"]).arg(&out);
    match cmd.status() {
        Ok(status) if status.success() => {}
        Ok(status) => {
            panic!("{clang} failed to compile {SOURCE} ({status}); it needs libbpf's headers (Debian: libbpf-dev)")
        }
        Err(e) => panic!(
            "the kernel-path feature needs clang to compile {SOURCE}: {e} (Debian: apt-get install clang libbpf-dev; \
             or build without --features kernel-path)"
        ),
    }
}
