//! Builds the eBPF programs (nightly, bpfel target, bpf-linker) and leaves the
//! object in OUT_DIR, where `capture::loader` embeds it with `include_bytes!`.
fn main() -> anyhow::Result<()> {
    if std::env::var_os("CARGO_FEATURE_FUZZING").is_some() {
        // The fuzz targets load no programs (see the feature in Cargo.toml).
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        std::fs::write(out.join("nodeward-ebpf"), [])?;
        return Ok(());
    }
    let ebpf = aya_build::Package {
        name: "nodeward-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
