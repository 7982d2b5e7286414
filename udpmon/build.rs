//! Builds the eBPF object (nightly + bpf-linker, through aya-build) so that `include_bytes!`
//! can embed it in the udpmon binary, and names its programs and maps for the loader
//! (`ebpf_names.rs`): userspace refers to them through these constants, so renaming a
//! kernel program or map fails to compile instead of failing to load on some kernel.
use std::{
    fmt::Write as _,
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "udpmon-ebpf")
        .ok_or_else(|| anyhow!("udpmon-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("udpmon-ebpf manifest has no parent"))?;
    // aya-build builds under OUT_DIR, which differs for every profile and host target (clippy,
    // tests, release, musl): each would build the same eBPF object, core library included,
    // from scratch. One directory serves them all, and the nested cargo rebuilds only what
    // changed. Build scripts of two profiles can run at once: the lock keeps each one's
    // build and copy apart from the other's.
    let out = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
    let shared = shared_dir(&out)?;
    std::fs::create_dir_all(&shared).with_context(|| format!("creating {}", shared.display()))?;
    let lock = File::create(shared.join(".lock"))
        .and_then(|f| f.lock().map(|()| f))
        .with_context(|| format!("locking {}", shared.display()))?;
    // SAFETY: the build script has no other thread; aya-build reads OUT_DIR, and only it.
    unsafe { std::env::set_var("OUT_DIR", &shared) };
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )?;
    // SAFETY: as above.
    unsafe { std::env::set_var("OUT_DIR", &out) };
    let obj = out.join("udpmon");
    if shared != out {
        std::fs::copy(shared.join("udpmon"), &obj)
            .with_context(|| format!("copying the eBPF object to {}", obj.display()))?;
    }
    drop(lock);
    write_names(&obj, &out.join("ebpf_names.rs"))
}

/// Where every profile's build scripts build the eBPF object: under the target directory,
/// one directory per architecture and byte order, which the object depends on. Cargo tags
/// the target directory with CACHEDIR.TAG, and with `--target` also its `<triple>`
/// directory inside: the nearest tagged ancestor of OUT_DIR, or its parent if tagged too.
/// Without a tag, OUT_DIR.
fn shared_dir(out: &Path) -> anyhow::Result<PathBuf> {
    let cfg = |key: &str| std::env::var(key).with_context(|| key.to_owned());
    let (arch, endian) = (
        cfg("CARGO_CFG_TARGET_ARCH")?,
        cfg("CARGO_CFG_TARGET_ENDIAN")?,
    );
    let tagged = |d: &&Path| d.join("CACHEDIR.TAG").is_file();
    let target = out
        .ancestors()
        .find(tagged)
        .map(|d| d.parent().filter(tagged).unwrap_or(d));
    Ok(match target {
        Some(target) => target.join("ebpf").join(format!("{arch}-{endian}")),
        None => out.to_path_buf(),
    })
}

/// One constant per program (a function in a section of its own: subprograms live in
/// `.text`), per map (the `maps` section) and per global of the eBPF object at `obj`.
fn write_names(obj: &Path, dst: &Path) -> anyhow::Result<()> {
    let data = std::fs::read(obj).with_context(|| format!("reading {}", obj.display()))?;
    let file = object::File::parse(&*data).context("parsing the eBPF object")?;
    let (mut programs, mut maps, mut globals) = (Vec::new(), Vec::new(), Vec::new());
    for sym in file.symbols() {
        let (Ok(name), Some(index)) = (sym.name(), sym.section_index()) else {
            continue;
        };
        let section = file.section_by_index(index)?;
        let section = section.name()?;
        if sym.kind() == SymbolKind::Text && sym.is_global() && section != ".text" {
            programs.push(name.to_owned());
        } else if section == "maps" {
            maps.push(name.to_owned());
        } else if sym.kind() == SymbolKind::Data
            && sym.is_global()
            && [".rodata", ".data", ".bss"]
                .iter()
                .any(|s| section.starts_with(s))
        {
            globals.push(name.to_owned());
        }
    }
    for v in [&mut programs, &mut maps, &mut globals] {
        v.sort();
        v.dedup();
    }
    if programs.is_empty() || maps.is_empty() {
        anyhow::bail!("{}: no programs or no maps found", obj.display());
    }
    let mut src = String::from("// Generated by udpmon/build.rs from the eBPF object.\n");
    for (module, names) in [("program", &programs), ("map", &maps), ("global", &globals)] {
        writeln!(src, "pub mod {module} {{")?;
        for n in names {
            writeln!(src, "    pub const {}: &str = {n:?};", n.to_uppercase())?;
        }
        writeln!(src, "}}")?;
    }
    std::fs::write(dst, src).with_context(|| format!("writing {}", dst.display()))
}
