//! Builds the eBPF programs (nightly, bpfel target, bpf-linker) and leaves the
//! object in OUT_DIR, where `capture::loader` embeds it with `include_bytes!`.
fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "nodeward-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
