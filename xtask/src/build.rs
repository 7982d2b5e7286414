//! Builds of the workspace, always with bpf-linker on PATH.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{bootstrap, util::run};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `cargo` in the workspace root with bpf-linker on PATH.
pub fn cargo(path: &str) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(workspace_root()).env("PATH", path);
    c
}

/// Builds the release binary; returns its path.
pub fn release() -> anyhow::Result<PathBuf> {
    let path = bootstrap::build_env()?;
    println!("[build] cargo build --release -p udpmon");
    run(cargo(&path).args(["build", "--release", "-p", "udpmon"]))?;
    Ok(workspace_root().join("target/release/udpmon"))
}

/// The target of the static binaries that go into the VMs.
const MUSL: &str = "x86_64-unknown-linux-musl";

/// The static (musl) udpmon alone: the one binary of its container image.
pub fn musl_udpmon(path: &str) -> anyhow::Result<PathBuf> {
    println!("[build] static udpmon ({MUSL})");
    run(cargo(path).args(["build", "--release", "-p", "udpmon", "--target", MUSL]))?;
    Ok(workspace_root()
        .join("target")
        .join(MUSL)
        .join("release/udpmon"))
}

/// Static (musl) builds of udpmon and of its system-test binary, for the VMs.
pub fn musl_binaries(path: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let udpmon = musl_udpmon(path)?;
    println!("[build] static system tests ({MUSL})");
    let out = cargo(path)
        .args([
            "test",
            "--release",
            "-p",
            "udpmon",
            "--test",
            "system",
            "--no-run",
            "--message-format=json",
            "--target",
            MUSL,
        ])
        .output()
        .context("building the system tests")?;
    if !out.status.success() {
        bail!(
            "building the static system tests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let test_bin = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "system")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("no executable for the system tests in cargo's output")?;
    Ok((udpmon, test_bin))
}

/// Static (musl) builds of udpmon and of xtask itself, for the in-VM bench (`xtask
/// bench-guest`, which reuses the host bench's load generator).
pub fn musl_bench_binaries(path: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    println!("[build] static udpmon and xtask ({MUSL})");
    run(cargo(path).args([
        "build",
        "--release",
        "-p",
        "udpmon",
        "-p",
        "xtask",
        "--target",
        MUSL,
    ]))?;
    let dir = workspace_root().join("target").join(MUSL).join("release");
    Ok((dir.join("udpmon"), dir.join("xtask")))
}

pub fn lint() -> anyhow::Result<()> {
    let path = bootstrap::build_env()?;
    // clippy --all-targets builds the dev-dependencies: the CRI bindings run protoc.
    bootstrap::apt(&["protobuf-compiler"])?;
    lint_with(&path)
}

pub fn lint_with(path: &str) -> anyhow::Result<()> {
    println!("[lint] cargo fmt --check");
    run(cargo(path).args(["fmt", "--all", "--check"]))?;
    println!("[lint] clippy (userspace crates)");
    run(cargo(path).args([
        "clippy",
        "-p",
        "udpmon",
        "-p",
        "udpmon-common",
        "-p",
        "xtask",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    println!("[lint] clippy (eBPF crate, bpfel-unknown-none)");
    run(cargo(path)
        .args([
            "+nightly",
            "clippy",
            "-p",
            "udpmon-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        ))?;
    Ok(())
}
