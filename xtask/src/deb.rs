//! `cargo xtask deb`: the Debian package, target/debian/udpmon_VERSION_ARCH.deb, built by
//! cargo-deb from `[package.metadata.deb]` in udpmon/Cargo.toml and the files in packaging/.
//! The man page and the completions come from udpmon's own CLI through the `assets` example
//! (udpmon/examples/assets.rs): xtask does not link udpmon.
use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{
    bootstrap,
    build::{self, workspace_root},
    util::run,
};

/// Where the generated man page and completions go; `[package.metadata.deb]` takes them from
/// here (cargo-deb maps the `target/release/` prefix to the real target directory).
const ASSETS: &str = "target/release/udpmon-assets";

/// Builds udpmon, its man page and completions, and the package; returns the .deb's path.
pub fn build() -> anyhow::Result<PathBuf> {
    let path = bootstrap::build_env()?;
    let cargo_deb = bootstrap::cargo_deb()?;
    println!("[deb] cargo build --release -p udpmon");
    run(build::cargo(&path).args(["build", "--release", "-p", "udpmon"]))?;

    let assets = workspace_root().join(ASSETS);
    if assets.exists() {
        fs::remove_dir_all(&assets).with_context(|| format!("removing {}", assets.display()))?;
    }
    println!("[deb] man page and completions from the CLI (example assets)");
    run(build::cargo(&path)
        .args([
            "run",
            "--release",
            "-p",
            "udpmon",
            "--example",
            "assets",
            "--",
        ])
        .arg(&assets))?;
    // -n: no name or time stamp in the header, so the same page gives the same bytes.
    run(Command::new("gzip")
        .args(["-9", "-n", "-f"])
        .arg(assets.join("udpmon.8")))?;

    println!("[deb] cargo deb -p udpmon");
    let out = build::cargo(&format!("{}:{path}", cargo_deb.display()))
        .args(["deb", "-p", "udpmon", "--no-build"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo deb")?;
    if !out.status.success() {
        bail!("cargo deb failed: {}", out.status);
    }
    // cargo-deb prints the package's path on standard output.
    let deb = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .context("cargo deb printed no .deb path")?;
    if !deb.is_file() {
        bail!("cargo deb named {}, which does not exist", deb.display());
    }
    println!("[deb] {}", deb.display());
    Ok(deb)
}
