//! `musubi-desktop`: the facility desktop app. `--export-bindings` writes the TypeScript bindings
//! and exits (used by developers; a test checks the committed file is current).

#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,musubi=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if std::env::args().any(|a| a == "--export-bindings") {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(musubi_desktop::BINDINGS_PATH);
        musubi_desktop::export_bindings(&path)?;
        println!("wrote {}", path.display());
        return Ok(());
    }
    musubi_desktop::run()
}
